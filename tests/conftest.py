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
