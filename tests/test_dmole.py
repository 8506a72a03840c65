"""Centralized D-MoLE on the tiny stream: outputs, plan, router, frozen older experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from protocol.config import parse_config
from protocol.plan import ExpertPlan
from simulation.centralized import prepare_stream
from simulation.dmole import DmoleLearner, run_dmole
from simulation.methods import make_source


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_cfg):
    cache = tmp_path_factory.mktemp("cache")
    return parse_config({"data.cache-dir": str(cache)}, base=tiny_cfg)


@pytest.mark.slow
def test_older_experts_stay_bit_identical(cfg):
    stream = prepare_stream(cfg, progress=False)
    learner = DmoleLearner(cfg, stream)
    rng = np.random.default_rng(0)
    first, second = cfg.data.tasks[:2]
    learner.plan_task(first, rng)
    learner.fit_router(first)
    learner.train_task(first, rng, make_source("seq-lora", cfg), progress=False, desc="t1")
    snap = {n: p.detach().clone() for n, p in stream.model.named_parameters()
            if f".{first}." in n or "lora_" not in n}
    learner.plan_task(second, rng)
    learner.fit_router(second)
    learner.train_task(second, rng, make_source("seq-lora", cfg), progress=False, desc="t2")
    changed = [n for n, p in stream.model.named_parameters() if n in snap
               and not torch.equal(p, snap[n])]
    assert changed == []  # base and task-1 experts untouched
    moved = [n for n, p in stream.model.named_parameters()
             if f".{second}." in n and "lora_B" in n and p.abs().sum() > 0]
    assert moved  # the new expert did learn
    assert learner.plan.tasks == (first, second)
    assert set(learner.router.tasks) == {first, second}


@pytest.mark.slow
@pytest.mark.parametrize("overrides,replay", [({}, False), ({"dmole.router": "oracle"}, True),
                                              ({"dmole.allocation": "all-modules",
                                                "dmole.router": "none"}, False)])
def test_run_writes_outputs_plan_and_router(cfg, tmp_path, overrides, replay):
    c = parse_config(overrides, base=cfg)
    m = run_dmole(c, tmp_path, replay=replay, progress=False)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["method"] == ("dmole-replay" if replay else "dmole")
    t = len(c.data.tasks)
    assert len(on_disk["acc_matrix"]) == t
    plan = ExpertPlan.load(tmp_path / "plan.json")
    assert plan.tasks == tuple(c.data.tasks)
    per_task = on_disk["dmole"]["per_task"]
    assert [p["task"] for p in per_task] == list(c.data.tasks)
    assert all(p["proxy_s"] > 0 for p in per_task)
    for task in c.data.tasks:
        assert (tmp_path / "experts" / task / "adapter_model.safetensors").is_file()
        n = sum(plan.experts_per_modality(task).values())
        if c.dmole.allocation == "all-modules":
            assert n == len(plan.modality_of)
        else:
            assert n == round(c.dmole.budget_fraction * len(plan.modality_of))
    assert (tmp_path / "router" / "router.json").is_file()
    if c.dmole.allocation == "gradient":  # experts only where the task's data flows
        assert plan.experts_per_modality("arith").get("vision", 0) == 0
        assert plan.experts_per_modality("arith").get("audio", 0) == 0
        assert plan.experts_per_modality("pitch").get("audio", 0) > 0
        assert plan.experts_per_modality("pitch").get("vision", 0) == 0
    arrivals = on_disk["modality_arrivals"]
    assert [(a["modality"], a["first_task"]) for a in arrivals] == [("audio", "pitch")]
    assert set(arrivals[0]["drops"]) == {"color", "arith", "count"}
    if c.dmole.router == "autoencoder":
        assert 0 <= m["dmole"]["router_accuracy"] <= 100
