"""Bench: training step time and peak memory of the default model (LoRA experts and full).

Writes JSON: {"device", "torch", "threads", "batch_size", "params_total", "lora_trainable",
"lora_step_ms_p50", "lora_step_ms_p90", "full_step_ms_p50", "lora_vs_full_speed_ratio",
"peak_rss_mb", "peak_cuda_mb", ...}. Steps are timed after warm-up, LoRA and full steps
interleaved so machine noise hits both alike; compare the ratio, not absolute times.

    .venv/bin/python bench/train_step.py --out runs/bench/train_step.json [--steps 40]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import finish  # noqa: E402
from mole.backbone import build_backbone, pick_device  # noqa: E402
from mole.batching import Encoder  # noqa: E402
from mole.experts import ExpertModel  # noqa: E402
from mole.modality import modality_map  # noqa: E402
from mole.tokenizer import build_word_tokenizer  # noqa: E402
from protocol.config import RunConfig, load_config  # noqa: E402
from simulation.data import open_tasks  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    cfg: RunConfig = load_config(args.config)
    device = pick_device(cfg.train.device)
    data = open_tasks(cfg)
    samples = [s for t in cfg.data.tasks for s in data[t].train]
    tok = build_word_tokenizer([w for s in samples for w in (s.instruction, s.answer)])
    torch.manual_seed(0)
    model = build_backbone(cfg.model, tok, cfg.data.image_size).to(device)
    enc = Encoder.for_model(tok, model, cfg.model.max_length)
    rng = np.random.default_rng(0)
    bs = cfg.train.batch_size
    batches = [enc.train_batch([samples[i] for i in rng.integers(0, len(samples), bs)]).to(device)
               for _ in range(8)]
    em = ExpertModel(model)
    em.add_expert("bench", list(modality_map(model)), cfg.lora)

    # One optimizer per mode, built once: the timed region is forward + backward + update.
    em.activate(["bench"], trainable="bench")
    lora_opt = torch.optim.AdamW(em.trainable_parameters(), lr=1e-4)
    base_params = [p for n, p in model.named_parameters() if "lora_" not in n]
    full_opt = torch.optim.AdamW(base_params, lr=1e-4)

    def step(mode: str, k: int) -> float:
        if mode == "lora":
            em.activate(["bench"], trainable="bench")
            opt = lora_opt
        else:
            em.activate([])
            for p in base_params:
                p.requires_grad = True
            opt = full_opt
        b = batches[k % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, loss = model(**b.model_inputs(), labels=b.labels)
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000

    model.train()
    for k in range(5):  # warm-up
        step("lora", k)
        step("full", k)
    times: dict[str, list[float]] = {"lora": [], "full": []}
    for k in range(args.steps):
        times["lora"].append(step("lora", k))
        times["full"].append(step("full", k))
    em.activate(["bench"], trainable="bench")
    lora_p50 = statistics.median(times["lora"])
    full_p50 = statistics.median(times["full"])
    res = {
        "device": str(device),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": bs,
        "seq_len": int(batches[0].input_ids.shape[1]),
        "params_total": sum(p.numel() for p in model.parameters()),
        "lora_trainable": sum(p.numel() for p in em.trainable_parameters()),
        "steps_timed": args.steps,
        "lora_step_ms_p50": round(lora_p50, 2),
        "lora_step_ms_p90": round(float(np.percentile(times["lora"], 90)), 2),
        "full_step_ms_p50": round(full_p50, 2),
        "lora_vs_full_speed_ratio": round(full_p50 / lora_p50, 3),
        "lora_steps_per_s": round(1000 / lora_p50, 2),
        "peak_rss_mb": round(_rss_mb(), 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if device.type == "cuda" else None,
    }
    # A LoRA step must not cost more than a full-parameter step: it skips the base's weight
    # gradients and their optimizer state.
    finish(res, args.out, {"lora_vs_full_speed_ratio": (res["lora_vs_full_speed_ratio"], ">=", 1.0)})


if __name__ == "__main__":
    main()
