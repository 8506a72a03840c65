"""Bench: memory and time of streaming LoRA aggregation as the number of clients grows.

The expert set is one task's experts on the default model (the allocator with equal scores picks
B modules; rank = LoraConfig().rank). For each N a fresh subprocess (so peaks do not mix), which
imports only numpy and cloud.aggregation, generates N synthetic client updates one at a time
(random float32 A, B; random n_samples; 30% of clients without audio, which still send audio
tensors, so the ignored path is exercised), adds each to a DeltaAccumulator, drops it, then
finalizes. It records the peak RSS (ru_maxrss) minus the RSS before the loop, the tracemalloc
peak (numpy allocations are traced) and the seconds spent in add + finalize (not generation;
one BLAS thread). The RSS baseline is the current RSS (/proc/self/statm) before the loop, so an
earlier transient peak (imports) cannot hide the loop's; RSS moves in allocator-sized steps, so
at these sizes tracemalloc is the precise number. ru_maxrss survives fork + exec on Linux, so the
model is built in a third process and the parent stays lean; VmHWM (per process image) is
reported beside it as a cross-check.

Writes JSON: {"n_clients", "peak_rss_delta_mb", "tracemalloc_peak_mb", "seconds",
"ratio_peak_1000_vs_10", "modules", "update_bytes", "rule", ...}; target ratio ≤ 1.5.

    .venv/bin/python bench/aggregation_memory.py --out runs/bench/aggregation_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import finish  # noqa: E402
from cloud.aggregation import AggregationSpec, ClientUpdate, DeltaAccumulator, ModuleSpec  # noqa: E402


def _rss_mb() -> float:
    """Peak RSS of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    """RSS now (Linux /proc); the baseline, since an earlier transient peak would hide the loop's."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _vmhwm_mb() -> float:
    """This process image's own peak RSS (Linux VmHWM; unlike ru_maxrss, not inherited at exec)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def default_spec() -> AggregationSpec:
    """One task's experts on the default model: module dims read from its nn.Linear layers."""
    from torch import nn

    from cloud.allocator import allocate
    from mole.backbone import build_backbone
    from mole.modality import modality_map
    from mole.tokenizer import build_word_tokenizer
    from protocol.config import RunConfig

    cfg = RunConfig()
    model = build_backbone(cfg.model, build_word_tokenizer(["a b c"]), 32)
    mmap = modality_map(model)
    alloc = allocate("bench", dict.fromkeys(mmap, 1.0), mmap)
    linears = dict(model.named_modules())
    modules: dict[str, ModuleSpec] = {}
    for m in alloc.modules:
        lin = linears[m]
        assert isinstance(lin, nn.Linear)
        modules[m] = ModuleSpec(mmap[m], cfg.lora.rank, lin.in_features, lin.out_features)
    return AggregationSpec("bench", modules, cfg.lora.alpha / cfg.lora.rank, frozenset(mmap.values()))


def spec_to_json(spec: AggregationSpec) -> dict[str, Any]:
    return {"task": spec.task, "scale": spec.scale, "modalities": sorted(spec.modalities),
            "modules": {m: [s.modality, s.rank, s.d_in, s.d_out] for m, s in spec.modules.items()}}


def spec_from_json(d: dict[str, Any]) -> AggregationSpec:
    return AggregationSpec(d["task"], {m: ModuleSpec(*v) for m, v in d["modules"].items()},
                           d["scale"], frozenset(d["modalities"]))


def synthetic_update(spec: AggregationSpec, i: int, rng: np.random.Generator) -> ClientUpdate:
    held = spec.modalities - ({"audio"} if rng.random() < 0.3 else set())
    tensors: dict[str, np.ndarray] = {}
    for m, s in spec.modules.items():
        tensors[f"{m}.lora_A"] = rng.standard_normal((s.rank, s.d_in), dtype=np.float32)
        tensors[f"{m}.lora_B"] = rng.standard_normal((s.d_out, s.rank), dtype=np.float32)
    return ClientUpdate(f"client-{i:06d}", spec.task, 1, int(rng.integers(1, 1000)), frozenset(held),
                        tensors)


def worker(n: int, rule: str, seed: int) -> dict[str, Any]:
    """One N in this (fresh) process; the spec arrives as JSON on stdin."""
    spec = spec_from_json(json.loads(sys.stdin.read()))
    rng = np.random.default_rng(seed)
    synthetic_update(spec, -1, rng)  # warm numpy's code paths before measuring
    peak_before = _rss_mb()
    rss0 = _current_rss_mb()
    tracemalloc.start()
    acc = DeltaAccumulator(spec, rule, round=1)
    seconds = 0.0
    for i in range(n):
        u = synthetic_update(spec, i, rng)
        t0 = time.perf_counter()
        acc.add(u)
        seconds += time.perf_counter() - t0
        del u
    t0 = time.perf_counter()
    res = acc.finalize()
    seconds += time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"n": n, "peak_rss_delta_mb": round(_rss_mb() - rss0, 3),
            "vmhwm_delta_mb": round(_vmhwm_mb() - rss0, 3),
            "rss_before_mb": round(rss0, 3), "peak_rss_before_loop_mb": round(peak_before, 3),
            "tracemalloc_peak_mb": round(peak / 2**20, 3), "seconds": round(seconds, 4),
            "state_bytes": acc.nbytes, "clients": len(res.clients),
            "audio_clients": len(res.clients_by_modality.get("audio", ())),
            "max_error": max(r.error for r in res.modules.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=False)
    ap.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    ap.add_argument("--rule", default="svd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.spec_only:
        print(json.dumps(spec_to_json(default_spec())))
        return
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.rule, args.seed)))
        return
    if args.out is None:
        ap.error("--out is required")
    ns = [int(x) for x in args.clients.split(",")]
    # One BLAS thread: the matrices are small, and threads only add noise on a shared CPU.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # The model (torch) is built in its own process: Linux carries ru_maxrss across fork + exec,
    # so a parent holding the model would lift every worker's ru_maxrss to the parent's peak.
    payload = subprocess.run([sys.executable, __file__, "--spec-only"], capture_output=True, text=True,
                             check=True, env=env).stdout.strip().splitlines()[-1]
    spec = spec_from_json(json.loads(payload))
    rows = []
    for n in ns:
        p = subprocess.run([sys.executable, __file__, "--worker", str(n), "--rule", args.rule,
                            "--seed", str(args.seed)], input=payload, capture_output=True, text=True,
                           check=True, env=env)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    peak = {r["n"]: r["tracemalloc_peak_mb"] for r in rows}
    one = synthetic_update(spec, 0, np.random.default_rng(args.seed))
    res = {
        "n_clients": ns,
        "peak_rss_delta_mb": [r["peak_rss_delta_mb"] for r in rows],
        "tracemalloc_peak_mb": [r["tracemalloc_peak_mb"] for r in rows],
        "seconds": [r["seconds"] for r in rows],
        "ms_per_update": [round(1000 * r["seconds"] / r["n"], 3) for r in rows],
        "vmhwm_delta_mb": [r["vmhwm_delta_mb"] for r in rows],
        "rss_before_mb": [r["rss_before_mb"] for r in rows],
        "peak_rss_before_loop_mb": [r["peak_rss_before_loop_mb"] for r in rows],
        "ratio_peak_1000_vs_10": round(peak[1000] / peak[10], 4) if 10 in peak and 1000 in peak
        else None,
        "modules": len(spec.modules),
        "update_bytes": one.nbytes,
        "rule": args.rule,
        "state_bytes": rows[0]["state_bytes"],
        "blas_threads": 1,
        "rank": next(iter(spec.modules.values())).rank,
        "modules_per_modality": {k: sum(1 for s in spec.modules.values() if s.modality == k)
                                 for k in sorted({s.modality for s in spec.modules.values()})},
        "audio_clients": [r["audio_clients"] for r in rows],
        "max_truncation_error": [round(r["max_error"], 4) for r in rows],
    }
    # Streaming aggregation holds per-module sums, not per-client state: memory must not grow
    # with the number of clients (1,000 within 1.5x of 10).
    finish(res, args.out, {"ratio_peak_1000_vs_10": (res["ratio_peak_1000_vs_10"], "<=", 1.5)}
           if res["ratio_peak_1000_vs_10"] is not None else {})


if __name__ == "__main__":
    main()
