"""Federated runs end to end through Flower's simulation engine (Ray), on the tiny stream."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from protocol.config import parse_config
from simulation.federated import run_federated

CONTRACT = {"method", "tasks", "acc_matrix", "avg", "last", "bwt", "forgetting", "bytes_up",
            "bytes_down", "wall_s", "config"}
ROOT = Path(__file__).resolve().parents[1]
COMM = {"bytes_up", "bytes_down", "bytes_up_per_client_round", "full_model_bytes_fp32"}


@pytest.fixture(scope="module")
def fed_cfg(tmp_path_factory, tiny_cfg):
    cache = tmp_path_factory.mktemp("cache")
    return parse_config({"data.cache-dir": str(cache), "federation.clients": 3,
                         "federation.rounds-per-task": 2, "federation.local-steps": 3,
                         "federation.no-audio-fraction": 0.34, "federation.min-clients": 2,
                         "federation.router-local-epochs": 5}, base=tiny_cfg)


@pytest.mark.slow
def test_federated_dmole_writes_metrics_comm_and_a_full_matrix(fed_cfg, tmp_path):
    from cloud.registry import BundleStore
    from protocol.bundle import generate_keypair

    generate_keypair(tmp_path / "bundle.key", tmp_path / "bundle.pub")
    m = run_federated(fed_cfg, tmp_path / "fed", progress=False, registry_dir=tmp_path / "registry",
                      signing_key=tmp_path / "bundle.key")
    on_disk = json.loads((tmp_path / "fed" / "metrics.json").read_text())
    assert CONTRACT <= set(on_disk) and COMM <= set(on_disk["comm"])
    assert on_disk["method"] == "fed-dmole-replay" and m["avg"] == pytest.approx(on_disk["avg"])
    t = len(fed_cfg.data.tasks)
    assert len(on_disk["acc_matrix"]) == t
    assert on_disk["rejected"] == {}
    assert 0 < on_disk["comm"]["bytes_up_per_client_round"] < on_disk["comm"]["full_model_bytes_fp32"]
    # 4 tasks × (1 probe + 2 train) rounds, each logged with its cumulative bytes
    assert [r["round"] for r in on_disk["rounds"]] == list(range(1, 3 * t + 1))
    # experts went only where the data is: audio experts to pitch only, none to arith's vision
    experts = on_disk["dmole"]["plan_experts"]
    assert experts["pitch"].get("audio", 0) > 0 and experts["arith"].get("vision", 0) == 0
    assert all(experts[k].get("audio", 0) == 0 for k in ("color", "arith", "count"))
    assert set(on_disk["dmole"]["thresholds"]) == set(fed_cfg.data.tasks)
    assert (tmp_path / "fed" / "rounds.png").stat().st_size > 1000
    # the edge's replay buffers were persisted on disk by the clients
    assert list((tmp_path / "fed" / "clients").glob("client-*/_state/replay/replay_state.json"))
    # the cloud published one verified bundle per task, each with the tasks learned so far
    store = BundleStore(tmp_path / "registry", tmp_path / "bundle.pub")
    bundles = store.list()
    assert [b.tasks for b in bundles] == [tuple(fed_cfg.data.tasks[: i + 1]) for i in range(t)]
    assert [b.global_round for b in bundles] == [3 * (i + 1) for i in range(t)]
    assert not list((tmp_path / "registry").glob(".incoming-*"))


@pytest.mark.slow
def test_a_run_where_30_percent_of_clients_drop_out_each_round_completes(fed_cfg, tmp_path):
    cfg = parse_config({"federation.dropout": 0.3, "federation.seed": 1}, base=fed_cfg)
    m = run_federated(cfg, tmp_path / "drop", progress=False)
    assert m is not None and len(m["acc_matrix"]) == len(cfg.data.tasks)
    assert m["rejected"]["dropped"] > 0  # messages were withheld, the rounds went on
    assert len(m["rounds"]) == 3 * len(cfg.data.tasks)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_mid_task_resumes_to_the_same_result(fed_cfg, tiny_cfg, tmp_path):
    """kill -9 of the whole ``fedmole simulate`` process tree (server, Ray, ClientApps) in the
    middle of task 2; ``--resume`` finishes it with the uninterrupted run's results, and nothing
    stored before the kill is lost."""
    import subprocess
    import sys
    import time

    from cloud.comm import payload_bytes
    from deploy.launcher import alive, descendants, stop_pid
    from edge.replay_store import ReplayStore
    from protocol.state import CHECKPOINT, load_checkpoint
    from protocol.updates import encode_skip

    cfg = parse_config({"federation.rounds-per-task": 3}, base=fed_cfg)
    full = run_federated(cfg, tmp_path / "full", progress=False)
    base = tiny_cfg.to_flat()
    sets = [f"{k}={','.join(v) if isinstance(v, tuple | list) else v}"
            for k, v in cfg.to_flat().items() if base.get(k) != v]
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "fedmole_cli", "simulate", "--quiet", "--out", str(cut),
           "--config", str(ROOT / "conf" / "tiny.toml"), *[a for kv in sets for a in ("--set", kv)]]
    log = (tmp_path / "cut.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    mid_task_2 = 6  # task 1 = rounds 1–4 (probe + 3 training), task 2 = 5–8
    try:
        deadline = time.time() + 600
        while not ((cut / CHECKPOINT).is_file() and load_checkpoint(cut).round >= mid_task_2):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "cut.log").read_text()[-3000:]
            time.sleep(0.2)
        tree = [proc.pid, *descendants(proc.pid)]
    finally:
        stop_pid(proc.pid, grace=0, sig=signal.SIGKILL)  # kill -9, no clean-up handlers run
        proc.wait()
        log.close()
    deadline = time.time() + 30  # SIGKILLed processes take a moment to finish exiting
    while [p for p in tree if alive(p)] and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in tree if alive(p)], "processes survived the kill"
    # what the kill left: a checkpoint of a finished round with every expert and router so far
    state = load_checkpoint(cut)
    assert mid_task_2 <= state.round < 8 and not (cut / "metrics.json").exists()
    assert set(state.experts) == set(state.plan.tasks) == {"color", "arith"}
    assert set(state.routers) == {"color", "arith"}
    def replay(run):  # client → (tasks in its buffer, samples)
        return {d.parents[1].name: (sorted(s.seen()), len(s)) for d in
                (run / "clients").glob("client-*/_state/replay")
                for s in [ReplayStore(d, cfg.replay.buffer_size, None, 0)]}

    assert all(set(tasks) <= {"color"} for tasks, _ in replay(cut).values())

    resumed = run_federated(cfg, cut, resume=True, progress=False)
    assert resumed is not None and full is not None
    assert np.allclose(np.array(resumed["acc_matrix"], float), np.array(full["acc_matrix"], float),
                       atol=1e-6, equal_nan=True)
    # The same bytes up, round by round, but for one thing: the restarted cloud does not know
    # which nodes hold none of the task's data (Flower node ids are the link's, not stored), so
    # its first training round also reaches those, and each answers with a "no data" skip.
    def up_per_round(run):
        ups = [r["bytes_up"] for r in run["rounds"]]
        return [b - a for a, b in zip([0, *ups], ups, strict=False)]

    first = state.round  # index of the first round after the resume (rounds are 1-based)
    d_full, d_cut = up_per_round(full), up_per_round(resumed)
    assert d_cut[:first] == d_full[:first] and d_cut[first + 1:] == d_full[first + 1:]
    skip = sum(payload_bytes(encode_skip("client-00", resumed["rounds"][first]["task"], "no-data"),
                             {}).values())
    extra = d_cut[first] - d_full[first]
    assert extra % skip == 0 and 0 <= extra // skip < cfg.federation.clients, (extra, skip)
    assert resumed["comm"]["per_modality"]["up"] | {"control": 0} == \
        full["comm"]["per_modality"]["up"] | {"control": 0}
    assert replay(cut) == replay(tmp_path / "full") and replay(cut)