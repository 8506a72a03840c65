"""Learning happens: on a short real stream, D-MoLE keeps its old tasks and Seq-LoRA does not.

The plumbing tests run a 20-step base that answers nothing; these run the default model on a
base pretrained for 1,000 steps (the default recipe, auxiliary tower losses included) and a
three-task stream where forgetting is easy to provoke: ``color`` then ``count`` share the vision
side and the answer position, so one adapter trained on ``count`` overwrites ``color``;
``arith`` is text only. The bars are the issue's, with wide margins where the method allows
them: D-MoLE's BWT ≥ −2, at least 10 points above Seq-LoRA's, and a higher AVG — centralized
and federated (Flower's simulation engine, 4 IID clients).

Measured on 2 cores (seed 0, one thread): Seq-LoRA AVG 42.6, BWT −58.0 (color 97 → 0);
D-MoLE AVG 63.7, BWT −0.5 (color 84 kept).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.config import parse_config

pytestmark = pytest.mark.slow

STREAM = {
    "data.tasks": "color,count,arith", "data.train-per-task": 300, "data.test-per-task": 100,
    "data.pretrain-size": 8000, "data.pretrain-heldout": 160,
    "pretrain.steps": 1000, "pretrain.target": 0.0,
    "train.steps-per-task": 150, "train.eval-batch-size": 50, "replay.buffer-size": 40,
}
FEDERATED = {
    "federation.clients": 4, "federation.dirichlet-alpha": 100.0, "federation.no-audio-fraction": 0.0,
    "federation.rounds-per-task": 2, "federation.local-epochs": 20.0, "federation.local-steps": 75,
    "federation.router-local-epochs": 100, "federation.min-samples": 8, "federation.min-clients": 2,
    "federation.round-timeout": 300.0,
}


@pytest.fixture(scope="module")
def stream_cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("learning-cache")
    return parse_config({"data.cache-dir": str(cache), **STREAM})


@pytest.fixture(scope="module")
def centralized(stream_cfg, tmp_path_factory) -> dict[str, dict]:
    from simulation.centralized import run_centralized
    from simulation.dmole import run_dmole

    out = tmp_path_factory.mktemp("learning-centralized")
    return {"seq-lora": run_centralized(stream_cfg, "seq-lora", out / "seq-lora", progress=False),
            "dmole": run_dmole(stream_cfg, out / "dmole", progress=False)}


@pytest.fixture(scope="module")
def federated(stream_cfg, centralized, tmp_path_factory) -> dict[str, dict]:
    # After `centralized`: the base is pretrained once, there, and found in the cache here.
    from simulation.federated import run_federated

    out: Path = tmp_path_factory.mktemp("learning-federated")
    runs = {}
    for method in ("fedavg-seq-lora", "dmole-replay"):
        cfg = parse_config({**FEDERATED, "federation.method": method}, base=stream_cfg)
        runs[method] = run_federated(cfg, out / method, progress=False)
    return runs


def _summary(m: dict) -> str:
    return (f"{m['method']}: AVG {m['avg']:.1f}, Last {m['last']:.1f}, BWT {m['bwt']:+.1f}, "
            f"matrix {m['acc_matrix']}")


def test_the_base_has_learned_its_pretraining(centralized):
    # Without a base that sees shapes and reads numbers, nothing below means anything.
    held = centralized["dmole"]["base"]["heldout"]
    assert held["shape"] >= 60 and held["successor"] >= 80 and held["repeat"] >= 60, held


def test_centralized_dmole_keeps_old_tasks_and_seq_lora_forgets(centralized):
    seq, dm = centralized["seq-lora"], centralized["dmole"]
    info = f"{_summary(seq)}\n{_summary(dm)}"
    assert dm["acc_matrix"][0][0] >= 50, "D-MoLE did not learn its first task\n" + info
    assert seq["acc_matrix"][0][0] >= 50, "Seq-LoRA did not learn its first task\n" + info
    assert dm["bwt"] >= -2, info
    assert dm["bwt"] >= seq["bwt"] + 10, info
    assert dm["avg"] > seq["avg"], info


def test_federated_dmole_keeps_old_tasks_and_fedavg_seq_lora_forgets(federated):
    seq, dm = federated["fedavg-seq-lora"], federated["dmole-replay"]
    info = f"{_summary(seq)}\n{_summary(dm)}"
    assert dm["acc_matrix"][0][0] >= 40, "federated D-MoLE did not learn its first task\n" + info
    assert dm["bwt"] >= -2, info
    assert dm["bwt"] >= seq["bwt"] + 10, info
    assert dm["avg"] > seq["avg"], info
