"""Federated runs end to end through Flower's simulation engine (Ray), on the tiny stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protocol.config import parse_config
from simulation.federated import run_federated

CONTRACT = {"method", "tasks", "acc_matrix", "avg", "last", "bwt", "forgetting", "bytes_up",
            "bytes_down", "wall_s", "config"}
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
def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_result(fed_cfg, tmp_path):
    cfg = parse_config({"federation.method": "fedavg-replay-lora"}, base=fed_cfg)
    full = run_federated(cfg, tmp_path / "full", progress=False)
    assert run_federated(cfg, tmp_path / "cut", progress=False, stop_after_round=3) is None
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run_federated(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed is not None and full is not None
    assert np.allclose(np.array(resumed["acc_matrix"], float), np.array(full["acc_matrix"], float),
                       atol=1e-6, equal_nan=True)
    assert resumed["comm"]["bytes_up"] == full["comm"]["bytes_up"]
