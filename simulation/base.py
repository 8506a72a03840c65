"""The cloud's foundation model: pretrained once on the benchmark's pretraining split, cached.

The base learns perception and word/number primitives (what shape, is there a red circle,
repeat words, the next number, is the digit > 4) with instruction templates that the continual
tasks do not use, so it is competent but scores near zero zero-shot on the stream — the
continual tasks are new skills, as in continual instruction tuning.

The cache key hashes everything the weights depend on (data, model sizes, pretraining
schedule); the folder is written beside its final place and renamed in, so an interrupted
pretraining never leaves a half checkpoint that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mole.backbone import build_backbone, load_backbone, pick_device, save_backbone
from mole.batching import Encoder
from mole.model import MoleModel
from mole.steps import train_steps
from mole.tokenizer import build_word_tokenizer
from protocol.config import RunConfig
from protocol.manifest import load_samples, read_manifest
from simulation.benchmark import benchmark_key, cache_root

BASE_VERSION = "1"


def base_key(cfg: RunConfig) -> str:
    parts = {
        "version": BASE_VERSION,
        # The data's own key carries the generator version: new data → a new base.
        "data": benchmark_key(cfg.data),
        "model": {k: v for k, v in cfg.to_flat().items() if k.startswith("model.")},
        "pretrain": {k: v for k, v in cfg.to_flat().items() if k.startswith("pretrain.")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _vocabulary_texts(data_root: Path) -> list[str]:
    """Every instruction and answer of the stream: the word-level vocabulary's source."""
    stream = json.loads((data_root / "stream.json").read_text())
    texts: list[str] = []
    for folder in ["pretrain", *stream["tasks"]]:
        for r in read_manifest(data_root / folder):
            texts += [r.instruction, r.answer]
    return texts


def pretrain_base(cfg: RunConfig, data_root: Path, progress: bool = True
                  ) -> tuple[MoleModel, object, dict]:
    """Build the backbone from configs and train all its weights on the pretraining split."""
    tok = build_word_tokenizer(_vocabulary_texts(data_root))
    device = pick_device(cfg.train.device)
    model = build_backbone(cfg.model, tok, cfg.data.image_size).to(device)
    enc = Encoder.for_model(tok, model, cfg.model.max_length)
    samples = load_samples(data_root / "pretrain")
    rng = np.random.default_rng(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    for p in model.parameters():
        p.requires_grad = True
    bs = cfg.pretrain.batch_size

    def next_batch(_: int):
        return enc.train_batch([samples[i] for i in rng.integers(0, len(samples), bs)])

    stats = train_steps(model, next_batch, cfg.pretrain.steps, cfg.pretrain.lr,
                        warmup_fraction=cfg.pretrain.warmup_fraction, desc="pretrain base",
                        progress=progress)
    for p in model.parameters():
        p.requires_grad = False
    info = {"key": base_key(cfg), "steps": stats.steps, "first_loss": stats.first_loss,
            "final_loss": stats.last_loss, "seconds": round(stats.seconds, 1),
            "params": sum(p.numel() for p in model.parameters()), "config": cfg.to_flat()}
    return model, tok, info


def ensure_base(cfg: RunConfig, data_root: Path, progress: bool = True) -> Path:
    """Path of the base checkpoint: ``model.base-path`` if set, else the cached pretrained one."""
    if cfg.model.base_path:
        return Path(cfg.model.base_path)
    final = cache_root(cfg.data) / "bases" / base_key(cfg)
    if (final / "config.json").is_file():
        return final
    t0 = time.perf_counter()
    model, tok, info = pretrain_base(cfg, data_root, progress)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_backbone(model.cpu(), tok, tmp, info)  # type: ignore[arg-type]
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a concurrent run finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def load_base(cfg: RunConfig, data_root: Path, progress: bool = True):
    path = ensure_base(cfg, data_root, progress)
    model, tok = load_backbone(path, pick_device(cfg.train.device))
    for p in model.parameters():
        p.requires_grad = False
    return model, tok, path
