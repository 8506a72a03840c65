"""The edge client's round functions (edge.local) on the tiny stream, without Flower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.allocator import allocate
from cloud.strategy import initial_factors
from edge import local
from edge.runtime import EdgeModel, load_local_data
from protocol.config import parse_config
from protocol.instructions import Instruction
from protocol.plan import ExpertPlan
from protocol.updates import decode_eval, decode_probe, decode_router_part, decode_update, skip_reason


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_cfg):
    from simulation.federated import prepare

    root = tmp_path_factory.mktemp("edge")
    # Two clients that both hold every task (near-even split, any share kept).
    cfg = parse_config({"data.cache-dir": str(root / "cache"), "federation.clients": 2,
                        "federation.dirichlet-alpha": 100.0, "federation.min-samples": 1,
                        "federation.no-audio-fraction": 0.0, "federation.local-steps": 3,
                        "federation.router-local-epochs": 2, "federation.rounds-per-task": 2,
                        "federation.method": "dmole-replay"}, base=tiny_cfg)
    cfg, partition, _ = prepare(cfg, root / "run", progress=False)
    em = EdgeModel(cfg, Path(cfg.model.base_path))
    clients = [local.Client(cfg, load_local_data(root / "run" / "clients" / f"client-{c:02d}",
                                                 cfg.data.tasks), root / f"state-{c}", em)
               for c in range(2)]
    return cfg, partition, em, clients


def _plan_with(em: EdgeModel, task: str, scores, plan: ExpertPlan | None = None) -> ExpertPlan:
    plan = plan or ExpertPlan.empty(em.mmap)
    return plan.with_task(allocate(task, scores, em.mmap, kappa=0.5, floor=0.25), 4, 8)


def test_probe_scores_every_module_and_fits_a_router(setup):
    cfg, partition, em, clients = setup
    c = next(c for c in clients if "color" in c.data.train)
    ins = Instruction(phase="probe", task="color", task_index=0, global_round=1, method="dmole-replay",
                      plan=ExpertPlan.empty(em.mmap), router_seed=5)
    content = local.probe(c, ins, {})
    p = decode_probe(content)
    assert set(p.scores) == set(em.mmap) and p.n_samples == len(c.data.train["color"])
    part = decode_router_part(content)
    assert part is not None and part.state is not None and part.histogram is None
    assert part.n_samples < p.n_samples  # the held-out share is kept out of the fit


def test_a_client_without_the_task_skips(setup, tmp_path):
    from edge.runtime import LocalData

    cfg, partition, em, clients = setup
    empty = local.Client(cfg, LocalData("client-x", tmp_path, {}, {}), tmp_path / "state", em)
    for phase in ("probe", "train"):
        ins = Instruction(phase=phase, task="pitch", task_index=3, global_round=10,
                          method="dmole-replay", plan=ExpertPlan.empty(em.mmap), train_round=1, rounds=2)
        content = local.probe(empty, ins, {}) if phase == "probe" else local.train(empty, ins, {}, {})
        assert skip_reason(content) == "no-data"


def test_train_round_sends_only_its_experts_is_deterministic_and_fills_replay(setup):
    cfg, partition, em, clients = setup
    c = next(c for c in clients if "color" in c.data.train and "count" in c.data.train)
    scores = {m: float(i % 5) for i, m in enumerate(em.mmap)}
    plan = _plan_with(em, "count", scores, _plan_with(em, "color", scores))
    experts = {t: initial_factors(plan, t, em.dims, 0) for t in ("color", "count")}
    ins = Instruction(phase="train", task="count", task_index=2, global_round=7, method="dmole-replay",
                      plan=plan, train_round=1, rounds=2, partners={"count": ("color",)})
    u1 = decode_update(local.train(c, ins, experts, {}))
    assert {k.rsplit(".", 1)[0] for k in u1.tensors} == set(plan.modules_of("count"))
    assert u1.modalities <= {"vision", "language", "audio"} and "vision" in u1.modalities
    # the partner went in frozen: the client sends nothing for it
    assert not set(plan.modules_of("color")) - set(plan.modules_of("count")) & \
        {k.rsplit(".", 1)[0] for k in u1.tensors}
    # replay: the earlier task the client holds is in its persisted buffer, added once
    from edge.replay_store import ReplayStore
    store = ReplayStore(c.state_dir / "replay", cfg.replay.buffer_size, None, 0)
    assert store.seen().get("color") == len(c.data.train["color"])
    u2 = decode_update(local.train(c, ins, experts, {}))  # a retried round: same reply
    assert all(np.array_equal(u1.tensors[k], u2.tensors[k]) for k in u1.tensors)
    assert ReplayStore(c.state_dir / "replay", cfg.replay.buffer_size, None, 0).seen() == store.seen()


def test_clients_step_at_federation_client_lr_not_train_lr(setup, tmp_path):
    import dataclasses

    cfg, partition, em, clients = setup
    c = next(c for c in clients if "color" in c.data.train)
    plan = _plan_with(em, "color", {m: float(i % 5) for i, m in enumerate(em.mmap)})
    experts = {"color": initial_factors(plan, "color", em.dims, 0)}
    ins = Instruction(phase="train", task="color", task_index=0, global_round=2, method="dmole",
                      plan=plan, train_round=1, rounds=2)

    def change(train_lr: float, client_lr: float, name: str) -> float:
        run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=train_lr),
                                  federation=dataclasses.replace(cfg.federation, client_lr=client_lr))
        u = decode_update(local.train(local.Client(run, c.data, tmp_path / name, em), ins, experts, {}))
        # how far the expert's B factors (zero at init) moved: grows with the step size
        return sum(float(np.abs(t).sum()) for k, t in u.tensors.items() if k.endswith(".lora_B"))

    base = change(1e-3, 1e-3, "a")
    assert change(5e-2, 1e-3, "b") == pytest.approx(base)  # train.lr is the centralized runners'
    assert change(1e-3, 1e-2, "c") > 3 * base


def test_evaluate_reports_seen_and_next_tasks_only(setup):
    cfg, partition, em, clients = setup
    scores = {m: 1.0 for m in em.mmap}
    plan = _plan_with(em, "color", scores)
    ins = Instruction(phase="evaluate", task="color", task_index=0, global_round=3, method="dmole",
                      plan=plan, seen=("color",))
    import dataclasses
    oracle = dataclasses.replace(cfg, dmole=dataclasses.replace(cfg.dmole, router="oracle"))
    for c in clients:
        c2 = local.Client(oracle, c.data, c.state_dir, em)
        e = decode_eval(local.evaluate(c2, ins, {"color": initial_factors(plan, "color", em.dims, 0)}, {}))
        stream = list(cfg.data.tasks)
        assert set(e.scores) == set(stream[:2]) & set(c.data.test)
        assert all(n == len(c.data.test[t]) for t, (_, n) in e.scores.items())
