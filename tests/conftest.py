"""Shared fixtures: tiny models built from configs (no downloads), tiny samples, a tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("what color is the shape red green blue how many 1 2 3 plus 4 7 describe image a circle "
         "which note is played c e g")


# The learnable scenario's data and pretraining: the default model pretrained briefly on a stream
# of 2 tasks, one per modality (color: vision, beats: audio). tests/test_deploy.py and
# tests/test_learning.py both use it with the session's one cache below, so the base (the base
# key hashes these keys and the model's) is pretrained once per test session, not once per file.
# The colour–shape binding loss is off (explicit, whatever the default): neither task asks about
# binding, the loss made a default base's pretraining 188–274 s against 172–197 s in a suite that
# must fit in 30 min, and the learning and deployment margins were measured without it.
LEARNABLE_BASE = {"data.tasks": "color,beats", "data.train-per-task": 300,
                  "data.test-per-task": 100, "data.pretrain-size": 4000,
                  "data.pretrain-heldout": 160, "pretrain.steps": 800, "pretrain.target": 0.0,
                  "pretrain.binding-aux-weight": 0.0, "train.eval-batch-size": 50}


@pytest.fixture(scope="session")
def learnable_cache(tmp_path_factory) -> Path:
    """One data + base cache for every test on the learnable scenario."""
    return tmp_path_factory.mktemp("learnable-cache")


@pytest.fixture(scope="session")
def tiny_cfg():
    from protocol.config import load_config

    return load_config(ROOT / "conf" / "tiny.toml")


@pytest.fixture()
def tiny_model(tiny_cfg):
    import torch

    from mole.backbone import build_backbone
    from mole.tokenizer import build_word_tokenizer

    torch.manual_seed(0)
    tok = build_word_tokenizer([WORDS])
    return build_backbone(tiny_cfg.model, tok, 32), tok


def tone(freq: float, seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    """(T,) float32: a plain sine, the simplest audio sample."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_samples(n_img: int = 6, n_txt: int = 3, n_aud: int = 0):
    from protocol.manifest import Sample

    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    out = []
    for i in range(n_img):
        name = list(colors)[i % 3]
        img = np.full((32, 32, 3), colors[name], np.uint8)
        out.append(Sample(id=f"img{i}", task="color", instruction="what color is the shape",
                          answer=name, image=img, audio=None))
    for i in range(n_txt):
        out.append(Sample(id=f"txt{i}", task="arith", instruction="what is 3 plus 4", answer="7",
                          image=None, audio=None))
    notes = {"c": 261.6, "e": 329.6, "g": 392.0}
    for i in range(n_aud):
        name = list(notes)[i % 3]
        out.append(Sample(id=f"aud{i}", task="pitch", instruction="which note is played",
                          answer=name, image=None, audio=tone(notes[name])))
    return out


def build_tiny_run(root: Path, tiny_cfg, overrides: dict | None = None) -> Path:
    """A federated run folder (metrics.json + checkpoint.safetensors) of the tiny stream: the
    real base, plan and routers, experts with random non-zero factors (so each one changes the
    answers), routers fitted on each task's real router features with τ at their 0.9 quantile,
    and a co-activation partner — what `fedmole simulate` leaves, in seconds. ``overrides``:
    more config keys (a checkpoint as ``model.base-path``, its tasks)."""
    import json

    import torch

    from cloud.allocator import allocate
    from cloud.strategy import initial_factors
    from edge.runtime import EdgeModel, load_local_data
    from mole.router import ae_state, fit_autoencoder, reconstruction_error, threshold
    from protocol.config import parse_config
    from protocol.plan import ExpertPlan
    from protocol.state import GlobalState, save_checkpoint
    from simulation.federated import prepare

    cfg = parse_config({"data.cache-dir": str(root / "cache"), "federation.clients": 2,
                        "federation.dirichlet-alpha": 100.0, "federation.min-samples": 1,
                        "federation.no-audio-fraction": 0.0, **(overrides or {})}, base=tiny_cfg)
    run = root / "run"
    cfg, _, _ = prepare(cfg, run, progress=False)
    em = EdgeModel(cfg, Path(cfg.model.base_path))
    data = load_local_data(run / "clients" / "client-00", cfg.data.tasks)
    rng = np.random.default_rng(0)
    plan = ExpertPlan.empty(em.mmap)
    state = GlobalState(plan=plan, method="dmole-replay", round=7)
    weights = [cfg.dmole.router_vision_weight, 1.0, cfg.dmole.router_audio_weight]
    for i, task in enumerate(cfg.data.tasks):
        scores = {m: float(rng.random()) for m in em.mmap}
        plan = plan.with_task(allocate(task, scores, em.mmap, kappa=0.5, floor=0.25),
                              cfg.lora.rank, cfg.lora.alpha)
        f = initial_factors(plan, task, em.dims, i)
        for k in f:
            if k.endswith("lora_B"):
                f[k] = rng.normal(0, 0.3, f[k].shape).astype(np.float32)
        state.experts[task] = f
        z = em.features(data, "train", task)
        ae = fit_autoencoder(z, hidden=cfg.dmole.router_hidden, epochs=30, val_fraction=0.0, seed=i)
        state.routers[task] = ae_state(ae)
        state.thresholds[task] = threshold(reconstruction_error(ae, z), 0.9)
    state.plan = plan
    state.partners = {t: [] for t in cfg.data.tasks}
    state.partners[cfg.data.tasks[2]] = [cfg.data.tasks[0]]
    save_checkpoint(state, run)
    (run / "metrics.json").write_text(json.dumps({"config": cfg.to_flat(), "method": state.method}))
    del weights, torch
    return run
