"""Bench: the GPU check — one training step per model family on the device, and a short
federated run with clients on a GPU share.

For machines that have a GPU (it also runs on CPU, where ``--require-cuda`` makes it fail). Per
family (tiny random-init LLaVA-1.5 layout, Qwen2-VL, Idefics3 checkpoints built offline by
tests/vlm_fixtures.py) it loads the checkpoint through its family on ``pick_device`` with
``model.dtype`` auto (bf16 on CUDA), takes LoRA training steps on a batch of the tiny stream
(loss finite, experts changed, experts still fp32) and answers the batch with ``generate``. Then
``fedmole train --method dmole`` and ``fedmole simulate`` (``federation.client-gpus`` 0.5 when
CUDA is present; skipped, and said so, where flwr / Ray are not installed) on conf/tiny.toml with
each family's checkpoint. Writes JSON::

    {"device", "cuda", "gpu_name", "dtype", "torch",
     "families": {NAME: {"load_s", "step_ms_p50", "loss_first", "loss_last", "lora_dtype",
                         "peak_cuda_mb", "generate_ms", "ok"}},
     "centralized" / "federated": {NAME: {"wall_s", "rc", "ok"}}, "targets", "ok"}

    .venv/bin/python bench/gpu_check.py --out runs/bench/gpu_check.json [--require-cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import finish  # noqa: E402
from mole.backbone import load_backbone, pick_device, pick_dtype  # noqa: E402
from mole.batching import Encoder  # noqa: E402
from mole.experts import ExpertModel  # noqa: E402
from mole.modality import modality_map  # noqa: E402
from protocol.config import LoraConfig  # noqa: E402
from protocol.manifest import Sample  # noqa: E402
from tests.vlm_fixtures import BUILDERS  # noqa: E402


def _samples(n: int = 8) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(id=f"s{i}", task="t", instruction="what colour is the shape",
                   answer=["red", "green", "blue"][i % 3],
                   image=rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) if i % 2 == 0
                   else None) for i in range(n)]


def _peak_cuda_mb(device: torch.device) -> float | None:
    return (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda" else None)


def check_family(path: Path, device: torch.device, dtype: torch.dtype, steps: int) -> dict:
    t0 = time.perf_counter()
    model, proc = load_backbone(path, device, dtype)
    load_s = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad = False
    enc = Encoder.for_any(proc, model, 64)
    em = ExpertModel(model)
    em.add_expert("t", list(modality_map(model)), LoraConfig(rank=4, alpha=8, dropout=0.0))
    em.activate(["t"], trainable="t")
    params = em.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = enc.train_batch(_samples()).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    model.train()
    for _ in range(steps):
        t = time.perf_counter()
        _, loss = model(**batch.model_inputs(), labels=batch.labels)
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - t))
        losses.append(float(loss))
    model.eval()
    changed = any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    prompts = enc.prompt_batch(_samples()).to(device)
    t = time.perf_counter()
    answers = model.generate(prompts.input_ids, prompts.attention_mask, prompts.pixel_values, 4,
                             None, prompts.extras)
    gen_ms = 1000 * (time.perf_counter() - t)
    lora_dtypes = sorted({str(p.dtype) for p in params})
    ok = (all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] and changed
          and lora_dtypes == ["torch.float32"] and len(answers) == len(_samples()))
    return {"load_s": round(load_s, 2), "step_ms_p50": round(statistics.median(times[1:] or times), 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "lora_dtype": lora_dtypes, "base_dtype": str(dtype), "experts_changed": changed,
            "peak_cuda_mb": _peak_cuda_mb(device), "generate_ms": round(gen_ms, 1), "ok": ok}


def have_federation() -> bool:
    """Flower's simulation needs flwr and Ray (a GPU machine's image may lack them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("flwr", "ray"))


def check_run(command: str, path: Path, cache: Path, out: Path, client_gpus: float) -> dict:
    """``fedmole simulate`` (or ``train --method dmole``) on the tiny stream with this base."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    extra = (["--set", f"federation.client-gpus={client_gpus}"] if command == "simulate"
             else ["--method", "dmole"])
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedmole_cli", command, "--config", str(ROOT / "conf" / "tiny.toml"),
         "--out", str(out), "--quiet", "--set", f"model.base-path={path}",
         "--set", f"data.cache-dir={cache}", "--set", "data.tasks=color,arith", *extra],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    wall = time.perf_counter() - t
    metrics = out / "metrics.json"
    ok = proc.returncode == 0 and metrics.is_file() and (out / "peft").is_dir()
    res = {"wall_s": round(wall, 1), "rc": proc.returncode, "ok": ok}
    if not ok:
        res["stderr_tail"] = proc.stderr[-2000:]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--require-cuda", action="store_true",
                    help="fail (exit 3) when no CUDA device is present")
    ap.add_argument("--families", default=",".join(BUILDERS))
    args = ap.parse_args()
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    cuda = device.type == "cuda"
    res: dict = {"device": str(device), "cuda": cuda, "dtype": str(dtype),
                 "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
                 "torch": torch.__version__, "python": platform.python_version(),
                 "families": {}, "centralized": {}, "federated": {}}
    federated = have_federation()
    if not federated:  # reported, not hidden: the JSON says the federated run was not made
        res["federated_skipped"] = "flwr / ray are not installed on this machine"
    names = [n for n in args.families.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in names:
            path = BUILDERS[name](root / name)
            res["families"][name] = check_family(path, device, dtype, args.steps)
            print(name, json.dumps(res["families"][name]), flush=True)
            res["centralized"][name] = check_run("train", path, root / "cache",
                                                 root / f"train-{name}", 0.0)
            print(name, "train --method dmole", json.dumps(res["centralized"][name]), flush=True)
            if federated:
                res["federated"][name] = check_run("simulate", path, root / "cache",
                                                   root / f"sim-{name}", 0.5 if cuda else 0.0)
                print(name, "simulate", json.dumps(res["federated"][name]), flush=True)
    targets = {f"{n}_step_ok": (res["families"][n]["ok"], "==", True) for n in names}
    targets.update({f"{n}_train_ok": (res["centralized"][n]["ok"], "==", True) for n in names})
    targets.update({f"{n}_federated_ok": (res["federated"][n]["ok"], "==", True)
                    for n in names if federated})
    if args.require_cuda:
        targets["cuda_present"] = (cuda, "==", True)
    finish(res, args.out, targets)


if __name__ == "__main__":
    main()
