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

Wide section ("wide" in the JSON; docs/aggregation.md): the low-rank accumulator against the dense
one (``DeltaAccumulator(low_rank=False)``, the pre-low-rank path) at the widths of InternVL2-2B
(2048 × 2048 attention projections) and a 7B LLaVA (4096 × 4096), rank 8, at 10, 100 and 1,000
clients, in the same run, one fresh subprocess per (path, width, N). Client factors are i.i.d.
Gaussian — the worst case for the low-rank path, since the mean then has rank min(N·r, d). A task
has 48 experts (D-MoLE's budget), but the modules of one task are independent and identical in
cost, so ``--wide-modules`` (default 1) of them are measured and the JSON states the ×48
extrapolation of time and state (the finalize transients are per module, not ×48). Equality is
checked on module 0: ‖B'A'(low-rank) − B'A'(dense)‖_F / ‖B'A'(dense)‖_F. ``--quick`` runs the dense
path at 4096 only for 100 clients (its time and memory are flat in N apart from the adds).

    nice .venv/bin/python bench/aggregation_memory.py --out runs/bench/aggregation_memory.json
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


WIDE = {"internvl2-2b": 2048, "llava-7b": 4096}
WIDE_RANK = 8
EXPERTS_PER_TASK = 48  # D-MoLE's expert budget per task


def wide_spec(d: int, modules: int) -> AggregationSpec:
    return AggregationSpec("bench", {f"language_model.layers.{i}.self_attn.q_proj":
                                     ModuleSpec("language", WIDE_RANK, d, d) for i in range(modules)},
                           2.0, frozenset({"language"}))


def wide_worker(path: str, d: int, n: int, modules: int, seed: int, save: Path | None
                ) -> dict[str, Any]:
    """One (path, width, N) in this fresh process: i.i.d. rank-8 updates, add + finalize."""
    spec = wide_spec(d, modules)
    rng = np.random.default_rng(seed)

    def one(i: int) -> ClientUpdate:
        t: dict[str, np.ndarray] = {}
        for m in spec.modules:
            t[f"{m}.lora_A"] = rng.standard_normal((WIDE_RANK, d), dtype=np.float32)
            t[f"{m}.lora_B"] = rng.standard_normal((d, WIDE_RANK), dtype=np.float32)
        return ClientUpdate(f"client-{i:06d}", "bench", 1, int(rng.integers(1, 1000)),
                            frozenset({"language"}), t)

    np.linalg.svd(np.ones((8, 8)))  # warm numpy's linalg before measuring
    np.linalg.qr(np.ones((8, 8)))
    rss0 = _current_rss_mb()
    tracemalloc.start()
    acc = DeltaAccumulator(spec, "svd", round=1, low_rank=path == "low-rank")
    seconds = 0.0
    state_peak = 0
    for i in range(n):
        u = one(i)
        t0 = time.perf_counter()
        acc.add(u)
        seconds += time.perf_counter() - t0
        state_peak = max(state_peak, acc.nbytes)
        del u
    t0 = time.perf_counter()
    res = acc.finalize()
    fin = time.perf_counter() - t0
    seconds += fin
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    m0 = next(iter(spec.modules))
    if save is not None:
        np.savez(save, a=res.modules[m0].lora_A, b=res.modules[m0].lora_B)
    widths = [acc.width(m) for m in spec.modules]
    return {"path": path, "d": d, "n": n, "modules_measured": modules,
            "tracemalloc_peak_mb": round(peak / 2**20, 2),
            "peak_rss_delta_mb": round(_rss_mb() - rss0, 2),
            "seconds": round(seconds, 3), "finalize_seconds": round(fin, 3),
            "state_mb": round(acc.nbytes / 2**20, 2), "state_peak_mb": round(state_peak / 2**20, 2),
            "stack_width": widths[0], "dense_fallback": widths[0] is None,
            "error_module0": res.modules[m0].error}


def run_wide(args: argparse.Namespace, env: dict[str, str]) -> tuple[dict[str, Any], dict]:
    """Both paths at every width and N; the figures, and the targets on them."""
    import tempfile

    ns = [int(x) for x in args.wide_clients.split(",")]
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="aggmem-"))
    for name, d in WIDE.items():
        for n in ns:
            for path in ("low-rank", "dense"):
                if args.quick and path == "dense" and d == 4096 and n != 100:
                    continue
                save = tmp / f"{path}-{d}-{n}.npz"
                p = subprocess.run([sys.executable, __file__, "--wide-worker", f"{path},{d},{n}",
                                    "--wide-modules", str(args.wide_modules), "--seed", str(args.seed),
                                    "--save", str(save)], capture_output=True, text=True, check=True,
                                   env=env)
                row = json.loads(p.stdout.strip().splitlines()[-1])
                rows[(path, d, n)] = row
                print(f"  {name} d={d} N={n} {path}: {row['seconds']} s, "
                      f"{row['tracemalloc_peak_mb']} MB traced, {row['peak_rss_delta_mb']} MB RSS",
                      file=sys.stderr)
    out: dict[str, Any] = {"rank": WIDE_RANK, "experts_per_task": EXPERTS_PER_TASK,
                           "modules_measured": args.wide_modules, "clients": ns,
                           "data": "i.i.d. Gaussian factors (worst case: rank(mean) = min(N·r, d))",
                           "extrapolation": f"×{EXPERTS_PER_TASK // args.wide_modules} of the measured "
                           "modules for seconds and state; finalize transients are per module",
                           "runs": [rows[k] for k in sorted(rows)], "compare": {}}
    for name, d in WIDE.items():
        for n in ns:
            lr, de = rows.get(("low-rank", d, n)), rows.get(("dense", d, n))
            if lr is None or de is None:
                continue
            fa, fb = np.load(tmp / f"low-rank-{d}-{n}.npz"), np.load(tmp / f"dense-{d}-{n}.npz")
            x = fa["b"].astype(np.float64) @ fa["a"].astype(np.float64)
            y = fb["b"].astype(np.float64) @ fb["a"].astype(np.float64)
            rel = float(np.linalg.norm(x - y) / np.linalg.norm(y))
            del x, y
            scale = EXPERTS_PER_TASK / args.wide_modules
            out["compare"][f"{d}x{d}/N={n}"] = {
                "model": name,
                "memory_ratio_tracemalloc": round(lr["tracemalloc_peak_mb"] / de["tracemalloc_peak_mb"], 4),
                "memory_ratio_rss": round(lr["peak_rss_delta_mb"] / max(de["peak_rss_delta_mb"], 1e-9), 4),
                "speedup": round(de["seconds"] / lr["seconds"], 2),
                "rel_frobenius_diff_module0": rel,
                "error_low_rank": lr["error_module0"], "error_dense": de["error_module0"],
                "low_rank_dense_fallback": lr["dense_fallback"],
                "task_seconds_48_experts": {"low-rank": round(lr["seconds"] * scale, 1),
                                            "dense": round(de["seconds"] * scale, 1)},
                "task_state_gb_48_experts": {"low-rank": round(lr["state_mb"] * scale / 1024, 3),
                                             "dense": round(de["state_mb"] * scale / 1024, 3)},
            }
    key = "4096x4096/N=100"
    c = out["compare"].get(key, {})
    lr10, lr1000 = rows.get(("low-rank", 4096, 10)), rows.get(("low-rank", 4096, 1000))
    out["lowrank_ratio_peak_1000_vs_10_4096"] = (
        round(lr1000["tracemalloc_peak_mb"] / lr10["tracemalloc_peak_mb"], 3) if lr10 and lr1000 else None)
    targets = {
        "wide_4096_n100_memory_ratio": (c.get("memory_ratio_tracemalloc"), "<=", 0.125),
        "wide_4096_n100_speedup": (c.get("speedup"), ">=", 4.0),
        "wide_4096_n100_equal": (c.get("rel_frobenius_diff_module0"), "<=", 1e-6),
        "wide_lowrank_ratio_peak_1000_vs_10": (out["lowrank_ratio_peak_1000_vs_10_4096"], "<=", 1.5),
    }
    return out, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=False)
    ap.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    ap.add_argument("--rule", default="svd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--wide-clients", default="10,100,1000", help="client counts of the wide section")
    ap.add_argument("--wide-modules", type=int, default=1,
                    help="of the 48 experts, how many 2048²/4096² modules to measure")
    ap.add_argument("--no-wide", action="store_true", help="only the default-model section")
    ap.add_argument("--quick", action="store_true",
                    help="wide section: the dense path at 4096 only for 100 clients")
    ap.add_argument("--wide-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.wide_worker is not None:
        path, d, n = args.wide_worker.split(",")
        print(json.dumps(wide_worker(path, int(d), int(n), args.wide_modules, args.seed, args.save)))
        return
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
    # Streaming aggregation on the default model (small modules: dense sums, flat in N): memory
    # must not grow with the number of clients (1,000 within 1.5x of 10).
    targets = ({"ratio_peak_1000_vs_10": (res["ratio_peak_1000_vs_10"], "<=", 1.5)}
               if res["ratio_peak_1000_vs_10"] is not None else {})
    if not args.no_wide:
        res["wide"], wide_targets = run_wide(args, env)
        targets.update(wide_targets)
    finish(res, args.out, targets)


if __name__ == "__main__":
    main()
