"""Bench: the edge at a scale where quantisation matters — the SmolLM2-135M base with trained experts.

On a federated D-MoLE run on the SmolLM2 base (``--run DIR``; when it has no checkpoint the
bench first runs ``fedmole simulate -c conf/smol.toml`` there with a short schedule,
:data:`RUN_SETTINGS`), its bundle (the field's layout: vision_encoder / embed_tokens /
decoder_model_merged / router) is exported and four engines answer the same prompts in one
process, on ``--threads`` threads each:

* ``torch`` — fp32 eager: Hugging Face ``generate`` (greedy, KV cache) of the base's own
  ``LlavaForConditionalGeneration`` with the routed PEFT experts active;
* ``fp32`` / ``int8`` / ``int4`` — onnxruntime on the bundle's precisions (edge/ort_runtime).

Figures (``engines.<name>``):

* ``ttft_ms_b1`` — time to first token at batch 1 (the prefill: encoders, embeddings, decoder,
  first argmax), median over ``--n-b1`` prompts;
* ``decode_tok_s_b1`` / ``decode_tok_s_b8`` — decode tokens/s after the first token, ``--new``
  tokens forced (EOS ignored) at batch 1 and batch 8 (tokens of all rows / second), medians;
* ``peak_rss_mb`` — peak resident memory (VmHWM) of a fresh child process that loads only that engine
  and answers 8 prompts (the Python interpreter, torch and transformers included: the edge
  runtime imports them for preprocessing);
* ``stored_mb`` / ``decoder_mb`` — what a device stores for the precision, and the decoder graph
  with its weights (MB = 10⁶ bytes);
* ``first_token_agreement`` — share of the ``--prompts`` real prompts (the run's test sets, then
  the held-out pretraining split's image samples) whose first generated token equals torch
  fp32's, on torch's routes; ``answer_agreement`` — greedy answers (``max_new_tokens`` of the
  run) equal to torch fp32's, each engine routing for itself; ``route_agreement``; each also
  ``_clear``: on the prompts whose torch fp32 margin (top-1 minus top-2 logit; for answers the
  smallest along the answer) is at least ``--tie-margin`` — a near-tie flips under any
  quantisation, so the raw figure says as much about the model's certainty as about the recipe.

``int4_recipes`` compares MatMulNBits 4-bit recipes (block 32/128, symmetric or not, accuracy
level 1 = fp32 compute / 4 = int8 compute, for all projections or some: ``fast_projections``)
on the decoder: first-token agreement on 200 prompts, decoder size and decode tokens/s at
batch 1 — how mole/export.py's INT4 was chosen.

    .venv/bin/python bench/edge_llm.py --out runs/bench/edge_llm.json [--run runs/bench/smol-fed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.edge_inference import decision_margins, precision_bytes, torch_answers  # noqa: E402
from bench.targets import finish  # noqa: E402
from edge.ort_runtime import OrtModel  # noqa: E402
from mole.export import (  # noqa: E402
    DECODER,
    INT8,
    GlobalModel,
    QuantRecipe,
    export_bundle,
    graph_file,
    load_run,
    quantize_graph,
    smoothed_decoder,
)
from mole.inference import active_set  # noqa: E402
from mole.shared_weights import graph_bytes  # noqa: E402
from protocol.manifest import Sample  # noqa: E402
from simulation.benchmark import ensure_benchmark  # noqa: E402
from simulation.smol_base import write_calibration  # noqa: E402

ENGINES = ("torch", "fp32", "int8", "int4")
# The bench's own federated run on the SmolLM2 base: two tasks (an image one, a text one), two
# clients, one round each — enough for trained, routed experts in a few minutes of 2 cores.
RUN_SETTINGS = ("data.tasks=color,arith", "federation.clients=2",
                "federation.min-clients=2", "federation.rounds-per-task=1",
                "federation.local-epochs=1", "federation.dirichlet-alpha=100")


def ensure_run(run: Path) -> None:
    if (run / "checkpoint.safetensors").is_file() and (run / "metrics.json").is_file():
        return
    print(f"no trained SmolLM2 run in {run}: running a short federated one there first", flush=True)
    cmd = [str(ROOT / ".venv" / "bin" / "fedmole"), "simulate", "-c", str(ROOT / "conf" / "smol.toml"),
           "--out", str(run), "-q"]
    for s in RUN_SETTINGS:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, cwd=ROOT)


def prompts(gm: GlobalModel, n: int) -> list[Sample]:
    """The run's test samples, then the held-out pretraining split's image samples: ``n``."""
    from protocol.llava_format import TaskSamples
    from simulation.benchmark import ensure_benchmark
    from simulation.benchmark.generate import HELDOUT_FILE
    from simulation.data import open_tasks

    data = open_tasks(gm.cfg)
    out = [s for t in gm.tasks for s in data[t].test]
    held = TaskSamples.read("pretrain", ensure_benchmark(gm.cfg.data) / HELDOUT_FILE)
    for i in range(len(held)):
        if len(out) >= n:
            break
        s = held[i]
        if s.audio is None:
            out.append(s)
    return out[:n]


# -- torch fp32 eager ------------------------------------------------------------------------

class TorchEngine:
    """HF ``generate`` on the base's own class with the sample's routed experts."""

    def __init__(self, gm: GlobalModel):
        self.gm = gm
        self.model = gm.em.model
        self.hf = self.model.llava

    def _inputs(self, samples: list[Sample]) -> dict[str, Any]:
        b = self.gm.em.enc.prompt_batch(samples)
        out = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        if b.pixel_values is not None:
            out["pixel_values"] = b.pixel_values
        return out

    @torch.no_grad()
    def generate(self, samples: list[Sample], route: str | None, n_new: int, force: bool) -> Any:
        with self.gm.em.experts.only(active_set(route, self.gm.tasks, self.gm.partners)):
            kw = {"min_new_tokens": n_new} if force else {}
            return self.hf.generate(**self._inputs(samples), max_new_tokens=n_new,
                                    do_sample=False, use_cache=True,
                                    pad_token_id=self.model.pad_token_id, **kw)

    @torch.no_grad()
    def first_tokens(self, samples: list[Sample], routes: list[str | None]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """First greedy token per sample and its top-1 minus top-2 logit margin."""
        out = np.zeros(len(samples), dtype=np.int64)
        margin = np.zeros(len(samples))
        for route in dict.fromkeys(routes):
            idx = [i for i, r in enumerate(routes) if r == route]
            with self.gm.em.experts.only(active_set(route, self.gm.tasks, self.gm.partners)):
                for k in range(0, len(idx), 16):
                    chunk = idx[k:k + 16]
                    b = self.gm.em.enc.prompt_batch([samples[i] for i in chunk])
                    logits, _ = self.model(b.input_ids, b.attention_mask, b.pixel_values, None,
                                           b.input_features)
                    out[chunk] = logits[:, -1].argmax(-1).numpy()
                    top = logits[:, -1].float().topk(2, dim=-1).values
                    margin[chunk] = (top[:, 0] - top[:, 1]).numpy()
        return out, margin


def ort_first_tokens(m: OrtModel, samples: list[Sample], routes: list[str | None]) -> np.ndarray:
    out = []
    for k in range(0, len(samples), 16):
        chunk = samples[k:k + 16]
        res, _ = m.prefill(m.enc.prompt_batch(chunk), m._gate(routes[k:k + 16]))
        out.append(res[0].argmax(-1))
    return np.concatenate(out)


def ort_generate(m: OrtModel, samples: list[Sample], routes: list[str | None], n_new: int
                 ) -> float:
    """Prefill, then ``n_new`` − 1 forced decode steps; returns the time to the first token."""
    t0 = time.perf_counter()
    batch = m.enc.prompt_batch(samples)
    gate = m._gate(routes)
    out, pos = m.prefill(batch, gate)
    out[0].argmax(-1)  # the first token
    ttft = time.perf_counter() - t0
    m.greedy(out, pos, batch.attention_mask.numpy(), gate, n_new, stop_at_eos=False)
    return ttft


def timings(engines: dict[str, Any], samples: list[Sample], routes: list[str | None],
            n_b1: int, n_b8: int, n_new: int) -> dict[str, dict[str, float]]:
    """Interleaved call by call: TTFT at batch 1, decode tokens/s at batch 1 and 8."""
    res: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "b1": [], "b8": []} for k in engines}

    def run(name: str, chunk: list[Sample], chunk_routes: list[str | None]) -> tuple[float, float]:
        e = engines[name]
        if name == "torch":
            # one route per call (HF generate runs one adapter set): group-route prompts only
            t0 = time.perf_counter()
            e.generate(chunk, chunk_routes[0], 1, force=True)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            e.generate(chunk, chunk_routes[0], n_new, force=True)
            return ttft, time.perf_counter() - t0
        t0 = time.perf_counter()
        ttft = ort_generate(e, chunk, chunk_routes, n_new)
        return ttft, time.perf_counter() - t0

    by_route: dict[str | None, list[int]] = {}
    for i, r in enumerate(routes):
        by_route.setdefault(r, []).append(i)
    groups = sorted(by_route.values(), key=len, reverse=True)
    singles = [i for g in groups for i in g][:n_b1 + 1]
    eights = [g[k:k + 8] for g in groups for k in range(0, len(g) - 7, 8)][:n_b8 + 1]
    for j, i in enumerate(singles):
        for name in engines:
            ttft, total = run(name, [samples[i]], [routes[i]])
            if j:  # the first call warms up
                res[name]["ttft"].append(ttft)
                res[name]["b1"].append((n_new - 1) / max(total - ttft, 1e-9))
    for j, idx in enumerate(eights):
        for name in engines:
            ttft, total = run(name, [samples[i] for i in idx], [routes[i] for i in idx])
            if j:
                res[name]["b8"].append(len(idx) * (n_new - 1) / max(total - ttft, 1e-9))
    return {k: {"ttft_ms_b1": 1000 * float(np.median(v["ttft"])),
                "decode_tok_s_b1": float(np.median(v["b1"])),
                "decode_tok_s_b8": float(np.median(v["b8"])) if v["b8"] else float("nan")}
            for k, v in res.items()}


# -- peak memory, one child per engine -------------------------------------------------------

def child_rss(engine: str, run: Path, bundle: Path, threads: int) -> dict[str, Any]:
    """A fresh interpreter loads only ``engine`` and answers 8 prompts; its peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--run", str(run),
           "--bundle", str(bundle), "--threads", str(threads), "--out", os.devnull]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _child(engine: str, run: Path, bundle: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    if engine == "torch":
        gm = load_run(run)
        samples = prompts(gm, 8)
        torch_answers(gm, samples)
    else:
        m = OrtModel(bundle, engine, threads=threads)
        man = json.loads((bundle / "manifest.json").read_text())
        cfg_flat = {**json.loads((run / "metrics.json").read_text())["config"]}
        from protocol.config import parse_config
        from simulation.data import open_tasks

        cfg = parse_config(cfg_flat)
        data = open_tasks(cfg)
        samples = [s for t in man["tasks"] for s in data[t].test][:8]
        m.answer(samples)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's high-water mark over fork
    # and exec into ru_maxrss (every child reported the bench's own 3.3 GB); exec gives the
    # child a new address space, whose VmHWM starts at zero.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


# -- int4 recipes ----------------------------------------------------------------------------

# float_min: the GGUF's own Q4_1 grid kept exactly (mole.export.block_quantize); the others
# onnxruntime's quantiser with an integer zero point (asymmetric) or none (symmetric)
# head_rescore: the head's top 8 recomputed with fp32 activations (mole.export.rescore_top_k)
# fast_projections: those layer projections with int8 activations, the others with fp32
INT4_GRID = [QuantRecipe(4, 32, False, acc, head_bits=8, graphs=(DECODER,), float_min=True,
                         head_rescore=k, fast_projections=fast)
             for acc, k, fast in ((1, 8, ""), (4, 8, ""), (4, 0, ""), (1, 8, r"/(o_proj|gate_up)"),
                                  (1, 8, r"/down_proj"))] + [
             QuantRecipe(4, block, sym, 4, head_bits=8, graphs=(DECODER,))
             for block in (32, 128) for sym in (True, False)]


# int8 (accuracy level 4 = int8 activations, per block of block_size input channels): blocks of
# 32 or 16, with or without the activation outliers migrated into the weights first
# (smooth_alpha, mole.smoothing, calibrated on the prompts the base ships); then the chosen one
# with down_proj (the projection with the widest activation outliers), or the whole MLP, fp32
INT8_GRID = [dataclasses.replace(INT8, block_size=block, smooth_alpha=alpha)
             for alpha in (0.0, 0.5) for block in (32, 16)] + [
             dataclasses.replace(INT8, block_size=16, smooth_alpha=0.5, fp32_projections=fp32)
             for fp32 in (r"/down_proj", r"/(gate_up|down_proj)")]


def recipe_grid(gm: GlobalModel, bundle: Path, precision: str, grid: list[QuantRecipe],
                samples: list[Sample], routes: list[str | None], ref_first: np.ndarray,
                clear: np.ndarray, threads: int, n_new: int) -> list[dict[str, Any]]:
    """Each recipe of ``grid`` as ``precision``'s decoder: first-token agreement with torch fp32,
    decoder size, decode tokens/s at batch 1."""
    work = bundle.parent / (bundle.name + f"-{precision}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(bundle, work)  # copies: onnx refuses hard-linked external data
    q = work / graph_file(DECODER, precision)
    sources: dict[float, Path] = {0.0: work / graph_file(DECODER, "fp32")}
    rows = []
    for r in grid:
        if r.smooth_alpha not in sources:
            sources[r.smooth_alpha] = work / f".smoothed-{r.smooth_alpha}.onnx"
            if smoothed_decoder(gm, r.smooth_alpha, None, sources[r.smooth_alpha]) is None:
                raise SystemExit("the base ships no calibration prompts")
        q.unlink()
        quantize_graph(sources[r.smooth_alpha], q, r, weight_only_ops=())
        m = OrtModel(work, precision, threads=threads)
        first = ort_first_tokens(m, samples, routes)
        one = samples[:6]
        tok_s = []
        for j, s in enumerate(one):
            t0 = time.perf_counter()
            ttft = ort_generate(m, [s], [routes[j]], n_new)
            if j:
                tok_s.append((n_new - 1) / (time.perf_counter() - t0 - ttft))
        rows.append({"bits": r.bits, "block_size": r.block_size, "symmetric": r.symmetric,
                     "accuracy_level": r.accuracy_level, "head_bits": r.head_bits,
                     "float_min": r.float_min, "head_rescore": r.head_rescore,
                     "fast_projections": r.fast_projections, "smooth_alpha": r.smooth_alpha,
                     "fp32_projections": r.fp32_projections,
                     "first_token_agreement": float(np.mean(first == ref_first)),
                     "first_token_agreement_clear": float(np.mean((first == ref_first)[clear])),
                     "decoder_mb": graph_bytes(q) / 1e6,
                     "decode_tok_s_b1": float(np.median(tok_s))})
        print("  ", rows[-1], flush=True)
        del m
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "smol-fed")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--n-b1", type=int, default=10)
    ap.add_argument("--n-b8", type=int, default=4)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per timed call")
    ap.add_argument("--no-recipes", action="store_true", help="skip the int4 recipe grid")
    ap.add_argument("--tie-margin", type=float, default=0.5,
                    help="fp32 top-1 minus top-2 logit gap below which a prompt is a near-tie")
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.run, args.bundle, args.threads)
        return
    torch.set_num_threads(args.threads)
    ensure_run(args.run)
    work = args.out.parent / "edge_llm"
    work.mkdir(parents=True, exist_ok=True)
    gm = load_run(args.run)
    # a base cached before bases shipped calibration prompts gets them now (as its next use
    # by `fedmole` would give them): the int8 decoder's smoothing is calibrated on them
    write_calibration(Path(gm.cfg.model.base_path), ensure_benchmark(gm.cfg.data))
    t0 = time.perf_counter()
    bundle = export_bundle(gm, work / "bundle", None)
    export_s = time.perf_counter() - t0
    samples = prompts(gm, args.prompts)
    print(f"{len(samples)} prompts; export {export_s:.1f} s", flush=True)
    # torch fp32 references: answers with its own routing, first tokens on those routes
    ref, routes = torch_answers(gm, samples)
    torch_engine = TorchEngine(gm)
    ref_first, first_margin = torch_engine.first_tokens(samples, routes)
    # near-ties: a quantised copy flips them either way (bench/edge_inference.py does the same)
    clear_first = first_margin >= args.tie_margin
    clear_answer = decision_margins(gm, samples, ref, routes) >= args.tie_margin
    ort = {p: OrtModel(bundle, p, threads=args.threads) for p in ("fp32", "int8", "int4")}
    engines: dict[str, dict[str, Any]] = {"torch": {}}
    for p, m in ort.items():
        got = [a for k in range(0, len(samples), 16) for a in m.answer(samples[k:k + 16])]
        first = ort_first_tokens(m, samples, routes)
        engines[p] = {
            "answer_agreement": float(np.mean([a.answer == r for a, r in zip(got, ref, strict=True)])),
            "route_agreement": float(np.mean([a.route == r for a, r in zip(got, routes, strict=True)])),
            "first_token_agreement": float(np.mean(first == ref_first)),
            "first_token_agreement_clear": float(np.mean((first == ref_first)[clear_first])),
            "answer_agreement_clear": float(np.mean(
                [a.answer == r for a, r, c in zip(got, ref, clear_answer, strict=True) if c])),
            "acc": 100 * float(np.mean([a.answer == s.answer for a, s in zip(got, samples, strict=True)])),
            "stored_mb": precision_bytes(bundle, p) / 1e6,
            "decoder_mb": graph_bytes(bundle / graph_file(DECODER, p)) / 1e6,
        }
        print(p, engines[p], flush=True)
    engines["torch"]["acc"] = 100 * float(np.mean([a == s.answer for a, s in zip(ref, samples, strict=True)]))
    t = timings({"torch": torch_engine, **ort}, samples, routes, args.n_b1, args.n_b8, args.new)
    for k, v in t.items():
        engines[k].update(v)
        print(k, v, flush=True)
    del ort
    for k in ENGINES:
        engines[k].update(child_rss(k, args.run, bundle, args.threads))
    res: dict[str, Any] = {
        "run": str(args.run), "bundle": str(bundle), "prompts": len(samples),
        "threads": args.threads, "new_tokens": args.new, "export_s": export_s,
        "params": sum(p.numel() for p in gm.em.model.parameters()),
        "tasks": gm.tasks, "engines": engines, "tie_margin": args.tie_margin,
        "first_token_clear_share": float(clear_first.mean()),
        "answer_clear_share": float(clear_answer.mean()),
        "quantization": json.loads((bundle / "manifest.json").read_text())["extra"]["quantization"],
    }
    if not args.no_recipes:
        sub = list(range(min(200, len(samples))))
        for precision, grid in (("int4", INT4_GRID), ("int8", INT8_GRID)):
            print(f"{precision} recipes", flush=True)
            res[f"{precision}_recipes"] = recipe_grid(
                gm, bundle, precision, grid, [samples[i] for i in sub], [routes[i] for i in sub],
                ref_first[sub], clear_first[sub], args.threads, args.new)
    e = engines
    res["int4_vs_fp32_ort_b1"] = e["int4"]["decode_tok_s_b1"] / e["fp32"]["decode_tok_s_b1"]
    res["int4_vs_torch_b1"] = e["int4"]["decode_tok_s_b1"] / e["torch"]["decode_tok_s_b1"]
    res["int8_vs_fp32_ort_b1"] = e["int8"]["decode_tok_s_b1"] / e["fp32"]["decode_tok_s_b1"]
    finish(res, args.out, {
        "int4_vs_fp32_ort_b1": (res["int4_vs_fp32_ort_b1"], ">=", 2.0),
        "int4_vs_torch_b1": (res["int4_vs_torch_b1"], ">=", 4.0),
        "int8_vs_fp32_ort_b1": (res["int8_vs_fp32_ort_b1"], ">=", 1.3),
        "int4_decoder_mb": (e["int4"]["decoder_mb"], "<=", 100.0),
        "int8_answer_agreement": (e["int8"]["answer_agreement"], ">=", 0.98),
        "int4_answer_agreement": (e["int4"]["answer_agreement"], ">=", 0.95),
        "int8_first_token_agreement": (e["int8"]["first_token_agreement"], ">=", 0.98),
    })


if __name__ == "__main__":
    main()
