"""The SmolLM2 base (``model.lm = "smollm2-135m"``): a real pretrained instruct LM, frozen,
behind a SigLIP tower and projector that are pretrained here on the benchmark's pretraining
split — LLaVA's stage-1 recipe (align the vision side to a frozen LM), at this project's size.

Only the image samples of the pretraining split are used: with the LM frozen a text-only or
audio sample has no gradient to give (the base has no audio tower; audio tasks are refused up
front). The loss is the answer tokens' under the checkpoint's own chat template (mole.chat), so
the image tokens also learn to steer the frozen LM towards the benchmark's short answers.
``fedmole_base.json`` records what the project's own base records (weights digest, held-out
exact match per image template, zero-shot row, machine) plus the GGUF's digest; the held-out bar
``pretrain.target`` applies to the mean over the image templates.

Cached like the project's own base, under ``CACHE/smol/``: the converted LM once
(``smol/lm``), each pretrained base under a key of everything its weights depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mole.backbone import BASE_INFO, load_backbone, pick_device, weights_digest
from mole.batching import Encoder
from mole.smol import build_smol_vlm, convert_lm
from mole.smoothing import CALIBRATION
from mole.steps import train_steps
from protocol.config import RunConfig
from protocol.llava_format import TaskSamples, read_records, record_to_json, write_records
from simulation.benchmark import cache_root, ensure_benchmark
from simulation.benchmark.generate import GENERATOR_VERSION, HELDOUT_FILE, PRETRAIN_FILE

SMOL_VERSION = "2"  # 2: keyed on the pretraining split only, not the stream's tasks
CALIBRATION_DIR = "calibration"
CALIBRATION_PROMPTS = 128  # image and text prompts shipped with the base (write_calibration)
log = logging.getLogger(__name__)


def smol_key(cfg: RunConfig) -> str:
    """What the base's weights depend on: the LM, the vision side's sizes, the pretraining
    schedule and the pretraining split — not the stream's tasks or their sizes (the split has
    its own random stream, simulation/benchmark/generate.py), so ``--set data.tasks=…`` or
    another ``test-per-task`` reuses the base instead of pretraining it again (20 min on 2
    cores). The zero-shot row in its info is of the tasks of the run that pretrained it."""
    flat = cfg.to_flat()
    d = cfg.data
    parts = {"version": SMOL_VERSION, "lm": cfg.model.lm,
             "data": {"generator": GENERATOR_VERSION, "seed": d.seed,
                      "pretrain_size": d.pretrain_size, "pretrain_heldout": d.pretrain_heldout,
                      "image_size": d.image_size},
             "vision": {k: v for k, v in flat.items()
                        if k.startswith("model.vision-") or k == "model.patch-size"},
             "max_length": cfg.model.max_length,
             "pretrain": {k: v for k, v in flat.items() if k.startswith("pretrain.")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _image_rows(samples: TaskSamples) -> list[int]:
    return [i for i, r in enumerate(samples.records) if r.images and r.audio is None]


def ensure_smol_base(cfg: RunConfig, progress: bool = True) -> Path:
    """The pretrained SmolLM2 base's folder, pretrained first (on ``pretrain.threads`` torch
    threads, as the project's own base) when it is not cached."""
    from simulation.base import torch_threads

    final = cache_root(cfg.data) / "smol" / "bases" / smol_key(cfg)
    if not (final / BASE_INFO).is_file():
        with torch_threads(cfg.pretrain.threads):
            _pretrain_smol(cfg, final, progress)
    write_calibration(final, ensure_benchmark(cfg.data))
    return final


def write_calibration(base: Path, data_root: Path, n: int = CALIBRATION_PROMPTS) -> None:
    """Ship ``n`` image and text prompts of the pretraining split with ``base``
    (``calibration.json`` and its images under ``calibration/``, the field's format): the cloud
    calibrates the int8 decoder's smoothing on them (mole.smoothing) without holding client
    data. The training split, so no benchmark prompt (test sets, held-out split) is among them;
    no audio (this base has no audio tower). Written once: an older cached base gets it on its
    next use."""
    if (base / CALIBRATION).is_file():
        return
    records = [r for r in read_records(data_root / PRETRAIN_FILE).records if r.audio is None][:n]
    (base / CALIBRATION_DIR).mkdir(exist_ok=True)
    out = []
    for r in records:
        images = [f"{CALIBRATION_DIR}/{r.id}-{k}{p.suffix}" for k, p in enumerate(r.images)]
        for p, rel in zip(r.images, images, strict=True):
            shutil.copyfile(p, base / rel)
        out.append(record_to_json(r, images, None))
    write_records(base / CALIBRATION, out)  # last and atomic: its presence means complete


def _pretrain_smol(cfg: RunConfig, final: Path, progress: bool) -> Path:
    from simulation.base import _mean, data_digest, heldout_accuracy, machine_info, zero_shot_row

    root = final.parent.parent
    t0 = time.perf_counter()
    lm_dir = convert_lm(root / "lm")
    data_root = ensure_benchmark(cfg.data)
    pc, m = cfg.pretrain, cfg.model
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_smol_vlm(lm_dir, tmp, image_size=cfg.data.image_size, patch_size=m.patch_size,
                   vision_hidden=m.vision_hidden, vision_layers=m.vision_layers,
                   vision_heads=m.vision_heads, seed=pc.seed)
    model, proc = load_backbone(tmp, pick_device(cfg.train.device))
    enc = Encoder.for_any(proc, model, cfg.model.max_length)
    hf = model.llava
    for p in hf.parameters():
        p.requires_grad = False
    trained = [hf.model.vision_tower, hf.model.multi_modal_projector]
    for mod in trained:
        for p in mod.parameters():
            p.requires_grad = True
    samples = TaskSamples.read("pretrain", data_root / PRETRAIN_FILE)
    rows = _image_rows(samples)
    held = TaskSamples.read("pretrain", data_root / HELDOUT_FILE)
    held_rows = [held[i] for i in _image_rows(held)]
    rng = np.random.default_rng(pc.seed)
    torch.manual_seed(pc.seed)

    def next_batch(_: int):
        return enc.train_batch([samples[rows[int(i)]] for i in rng.integers(0, len(rows),
                                                                           pc.batch_size)])

    stats = train_steps(model, next_batch, pc.steps, pc.lr, warmup_fraction=pc.warmup_fraction,
                        desc="pretrain the SmolLM2 base's vision side", progress=progress)
    for p in hf.parameters():
        p.requires_grad = False
    model.eval()
    acc = heldout_accuracy(model, enc, held_rows, cfg.train.eval_batch_size,
                           cfg.train.max_new_tokens)
    met = _mean(acc) >= pc.target
    if not met:
        log.warning("the SmolLM2 base missed the held-out bar (mean %.1f%% < %g%%): %s",
                    _mean(acc), pc.target, acc)
    lm_info = json.loads((lm_dir / "fedmole_smol.json").read_text())
    hf.save_pretrained(tmp, safe_serialization=True)
    info = {
        "key": smol_key(cfg), "lm": cfg.model.lm, "gguf_sha256": lm_info.get("gguf_sha256"),
        "seed": pc.seed, "steps": pc.steps, "target": pc.target, "target_met": met,
        "heldout": acc, "heldout_mean": round(_mean(acc), 2),
        "first_loss": stats.first_loss, "final_loss": stats.last_loss,
        "train_seconds": round(stats.seconds, 1),
        "seconds_per_step": round(stats.seconds / max(1, stats.steps), 3),
        "params": sum(p.numel() for p in hf.parameters()),
        "trained_params": sum(p.numel() for mod in trained for p in mod.parameters()),
        "zero_shot": zero_shot_row(model, enc, data_root, cfg),
        "data_sha256": data_digest(data_root), "machine": machine_info(), "config": cfg.to_flat(),
        "weights_sha256": weights_digest(model.cpu()),
    }
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    (tmp / BASE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final
