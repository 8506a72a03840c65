"""Bench: the exported int8 ONNX model against torch fp32 eager, and the gRPC service under load.

On a trained federated D-MoLE run (``--run DIR``, default runs/fed; when it has no checkpoint
the bench first runs the default scenario there, ~10 min) and the whole test set of its stream:

* ``agreement`` — share of test samples whose int8 ORT answer equals the torch fp32 answer
  (routing + greedy answers, the edge's evaluation path: mole.inference.routed_answers);
  ``route_agreement`` the same for the chosen route; ``acc_fp32`` / ``acc_int8`` exact-match
  accuracy in percent.
* ``speedup_p50_b1`` / ``speedup_b32`` — torch fp32 eager time over int8 ORT time for the same
  inputs, interleaved call by call, medians (single samples, and batches of 32 mixed samples);
  both on ``--threads`` threads. ``fp32_ort_*`` gives the fp32 ONNX figures beside them.
* ``size_ratio`` — int8 / fp32 bytes a device stores (each precision's graphs and their
  weights file); ``stored_bytes`` per precision, int4 included.
* ``int4`` — the 4-bit decoder's agreement, accuracy and latencies beside int8 (the recipe is
  chosen on the SmolLM2 base, bench/edge_llm.py; at 0.8 M parameters it only has to work).
* ``quantization`` — the recipes compared on a subset before choosing (mole/export.py).
* ``load_test`` — a ``python -m edge.serve`` child process on 127.0.0.1 (int8), 8 client
  threads × 200 single-sample requests over gRPC: errors, p50/p99 latency (ms), requests/s.

    .venv/bin/python bench/edge_inference.py --out runs/bench/edge_inference.json [--run runs/fed]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import finish  # noqa: E402
from edge.ort_runtime import OrtModel  # noqa: E402
from mole.export import (  # noqa: E402
    KEEP_FP32,
    GlobalModel,
    export_bundle,
    load_run,
    quantize_int8,
)
from mole.shared_weights import stored_bytes  # noqa: E402
from protocol.manifest import Sample  # noqa: E402


def torch_answers(gm: GlobalModel, samples: list[Sample]) -> tuple[list[str], list[str | None]]:
    from mole.inference import routed_answers
    from mole.router import router_features

    d, bs = gm.cfg.dmole, gm.cfg.train.eval_batch_size
    z = router_features(gm.em.experts, gm.em.enc, samples, bs,
                        weights=[d.router_vision_weight, 1.0, d.router_audio_weight])
    routes = gm.router.route(z)
    return routed_answers(gm.em.experts, gm.em.enc, samples, routes, gm.tasks, gm.partners, bs,
                          gm.cfg.train.max_new_tokens), routes


@torch.no_grad()
def decision_margins(gm: GlobalModel, samples: list[Sample], answers: list[str],
                     routes: list[str | None]) -> np.ndarray:
    """Per sample, the smallest top-1 minus top-2 log-probability gap (nats) of the torch fp32
    model along its own greedy answer: a near-tie there is a coin toss for any quantised copy.

    Teacher-forced on ``answers`` (the fp32 greedy answers), with the sample's routed experts."""
    import dataclasses

    from mole.inference import active_set

    experts, enc = gm.em.experts, gm.em.enc
    model = experts.model
    model.eval()
    out = np.full(len(samples), np.inf)
    bs = gm.cfg.train.eval_batch_size
    for route in dict.fromkeys(routes):
        idx = [i for i, r in enumerate(routes) if r == route]
        with experts.only(active_set(route, gm.tasks, gm.partners)):
            for k in range(0, len(idx), bs):
                chunk = idx[k:k + bs]
                b = enc.train_batch([dataclasses.replace(samples[i], answer=answers[i])
                                     for i in chunk]).to(model.device)
                logits, _ = model(**b.model_inputs())  # (B, T, V); token t predicts t+1
                top = torch.log_softmax(logits[:, :-1].float(), -1).topk(2, dim=-1).values
                gap = top[..., 0] - top[..., 1]  # (B, T-1)
                gap = gap.masked_fill(b.labels[:, 1:] == -100, float("inf"))
                for i, m in zip(chunk, gap.min(dim=1).values.tolist(), strict=True):
                    out[i] = m
    return out


def test_set(gm: GlobalModel) -> list[Sample]:
    from simulation.data import open_tasks

    data = open_tasks(gm.cfg)
    return [s for t in gm.tasks for s in data[t].test]


def ensure_run(run: Path) -> None:
    if (run / "checkpoint.safetensors").is_file() and (run / "metrics.json").is_file():
        return
    print(f"no trained run in {run}: running the default scenario there first", flush=True)
    subprocess.run([str(ROOT / ".venv" / "bin" / "fedmole"), "simulate", "--config",
                    str(ROOT / "conf" / "default.toml"), "--out", str(run), "-q"], check=True,
                   cwd=ROOT)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def speed(gm: GlobalModel, ort_models: dict[str, OrtModel], samples: list[Sample], n_b1: int,
          n_b32: int) -> dict[str, float]:
    """Interleaved medians: torch fp32 eager, then each ORT model, on the same inputs."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(samples))
    out: dict[str, float] = {}
    for bs, n in ((1, n_b1), (32, n_b32)):
        times: dict[str, list[float]] = {"torch": [], **{k: [] for k in ort_models}}
        batches = [[samples[i] for i in order[j * bs:(j + 1) * bs]] for j in range(n)]
        torch_answers(gm, batches[0])  # warm-up
        for m in ort_models.values():
            m.answer(batches[0])
        for batch in batches:
            times["torch"].append(timed(torch_answers, gm, batch))
            for k, m in ort_models.items():
                times[k].append(timed(m.answer, batch))
        tag = "b1" if bs == 1 else "b32"
        for k, v in times.items():
            out[f"{k}_p50_ms_{tag}"] = 1000 * float(np.median(v))
            out[f"{k}_p99_ms_{tag}"] = 1000 * float(np.percentile(v, 99))
    return out


def quantization_choices(bundle: Path, samples: list[Sample], ref: list[str]) -> list[dict]:
    """Agreement with torch fp32, accuracy, size and b1 latency of each int8 recipe."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work = bundle.parent / (bundle.name + "-quant")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(bundle, work)
    sym = {"symmetric": True, "weight_only_ops": ()}
    recipes = [
        ("dynamic per-channel", {"per_channel": True, "reduce_range": False}),
        ("dynamic per-channel reduce_range", {"per_channel": True, "reduce_range": True}),
        ("dynamic per-tensor reduce_range", {"per_channel": False, "reduce_range": True}),
        ("matmulnbits int8 block32 acc4 (int8 compute)",
         {"block_size": 32, "accuracy_level": 4, "keep_fp32": "", **sym}),
        ("matmulnbits int8 block32 acc1 (weight-only)",
         {"block_size": 32, "accuracy_level": 1, "keep_fp32": "", **sym}),
        ("matmulnbits int8 block16 acc1, lm_head fp32",
         {"block_size": 16, "accuracy_level": 1, "keep_fp32": KEEP_FP32, **sym}),
        ("matmulnbits int8 block32 acc1, lm_head fp32 (the previous choice)",
         {"block_size": 32, "accuracy_level": 1, "keep_fp32": KEEP_FP32, **sym}),
        ("matmulnbits int8 block32 acc1 asymmetric, lm_head fp32",
         {"block_size": 32, "accuracy_level": 1, "keep_fp32": KEEP_FP32, "symmetric": False,
          "weight_only_ops": ()}),
        ("matmulnbits int8 block32 acc1 asymmetric, lm_head fp32, conv + embedding int8",
         {"block_size": 32, "accuracy_level": 1, "keep_fp32": KEEP_FP32, "symmetric": False,
          "weight_only_ops": ("Conv", "Gather")}),
        ("matmulnbits int8 block32 acc1 asymmetric, lm_head fp32, embedding int8 (chosen)",
         {"block_size": 32, "accuracy_level": 1, "keep_fp32": KEEP_FP32, "symmetric": False,
          "weight_only_ops": ("Gather",)}),
    ]
    rows = []
    graphs = _graphs(work)
    fp32_bytes = precision_bytes(work, "fp32")
    for name, kw in recipes:
        for g, src in graphs["fp32"].items():
            dst = graphs["int8"][g]
            if "per_channel" in kw:
                quantize_dynamic(str(work / src), str(work / dst), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"], **kw)
            else:
                quantize_int8(work / src, work / dst, **kw)
        m = OrtModel(work, "int8", threads=1)
        ans = _answer_all(m, samples)
        b1 = [timed(m.answer, [s]) for s in samples[:40]]
        rows.append({
            "recipe": name, **kw,
            "agreement": float(np.mean([a == r for a, r in zip(ans, ref, strict=True)])),
            "acc": 100 * float(np.mean([a == s.answer for a, s in zip(ans, samples, strict=True)])),
            "size_ratio": precision_bytes(work, "int8") / fp32_bytes,
            "p50_ms_b1": 1000 * float(np.median(b1)),
        })
        print("  ", rows[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def _graphs(bundle: Path) -> dict[str, dict[str, str]]:
    import json

    return json.loads((bundle / "manifest.json").read_text())["extra"]["graphs"]  # type: ignore[no-any-return]


def precision_bytes(bundle: Path, precision: str) -> int:
    """What a device stores for one precision: its graph files and the weights they reference."""
    return stored_bytes([bundle / f for f in _graphs(bundle)[precision].values()])


def _answer_all(m: OrtModel, samples: list[Sample], bs: int = 64) -> list[str]:
    return [a.answer for i in range(0, len(samples), bs) for a in m.answer(samples[i:i + bs])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_test(bundle: Path, public_key: Path, samples: list[Sample], threads: int = 8,
              requests: int = 200) -> dict[str, float]:
    """8 threads × 200 single-sample Predict calls against a served child process."""
    import grpc

    from protocol.inference_codec import encode_input, encode_request
    from protocol.proto import inference_pb2, inference_pb2_grpc

    port = _free_port()
    log = bundle.parent / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "edge.serve", "--bundle", str(bundle),
                                 "--port", str(port), "--trusted-key", str(public_key),
                                 "--workers", str(threads)], cwd=ROOT, env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = inference_pb2_grpc.InferenceStub(channel)
        stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=60)
        reqs = [encode_request([encode_input(s.instruction, s.image, s.audio,
                                             s.audio_rate or 16000 if s.audio is not None else 0,
                                             id=s.id)]) for s in samples]
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            for j in range(requests):
                req = reqs[(k * requests + j) % len(reqs)]
                t0 = time.perf_counter()
                try:
                    stub.Predict(req, timeout=60)
                    dt = time.perf_counter() - t0
                    with lock:
                        lat.append(dt)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"{e.code()}: {e.details()}")

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        channel.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"threads": threads, "requests": threads * requests, "errors": len(errors),
            "error_examples": errors[:3], "p50_ms": 1000 * float(np.median(lat)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)), "requests_per_s": len(lat) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "fed")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    ap.add_argument("--n-b1", type=int, default=200)
    ap.add_argument("--n-b32", type=int, default=20)
    ap.add_argument("--quant-samples", type=int, default=1800)
    ap.add_argument("--tie-margin", type=float, default=0.5,
                    help="fp32 top-1 minus top-2 log-prob gap (nats) below which a sample is a near-tie")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_run(args.run)
    work = args.out.parent / "edge_inference"
    work.mkdir(parents=True, exist_ok=True)
    from protocol.bundle import generate_keypair

    key, pub = work / "bundle.key", work / "bundle.pub"
    if not key.is_file():
        generate_keypair(key, pub)
    gm = load_run(args.run)
    t0 = time.perf_counter()
    bundle = export_bundle(gm, work / "bundle", key)
    export_s = time.perf_counter() - t0
    samples = test_set(gm)
    print(f"{len(samples)} test samples of {len(gm.tasks)} tasks; export {export_s:.1f} s", flush=True)
    ref, ref_routes = torch_answers(gm, samples)
    int8 = OrtModel(bundle, "int8", threads=args.threads)
    fp32 = OrtModel(bundle, "fp32", threads=args.threads)
    got = [a for i in range(0, len(samples), 64) for a in int8.answer(samples[i:i + 64])]  # noqa: E501
    got32 = _answer_all(fp32, samples)
    acc = lambda ans: 100 * float(np.mean([a == s.answer for a, s in zip(ans, samples, strict=True)]))  # noqa: E731
    res: dict = {
        "run": str(args.run), "bundle": str(bundle), "samples": len(samples),
        "threads": args.threads, "export_s": export_s,
        "agreement": float(np.mean([a.answer == r for a, r in zip(got, ref, strict=True)])),
        "route_agreement": float(np.mean([a.route == r for a, r in zip(got, ref_routes, strict=True)])),
        "fp32_ort_agreement": float(np.mean([a == r for a, r in zip(got32, ref, strict=True)])),
        "acc_fp32": acc(ref), "acc_int8": acc([a.answer for a in got]),
    }
    # what a device stores: each precision's graphs with their weights files
    stored = {p: precision_bytes(bundle, p) for p in _graphs(bundle)}
    sizes = {f.name: f.stat().st_size for f in sorted(bundle.iterdir()) if f.is_file()}
    int4 = OrtModel(bundle, "int4", threads=args.threads)
    got4 = [a for i in range(0, len(samples), 64) for a in int4.answer(samples[i:i + 64])]
    res["int4"] = {
        "agreement": float(np.mean([a.answer == r for a, r in zip(got4, ref, strict=True)])),
        "route_agreement": float(np.mean([a.route == r for a, r in zip(got4, ref_routes, strict=True)])),
        "acc": acc([a.answer for a in got4]), "size_ratio": stored["int4"] / stored["fp32"],
    }
    margins = decision_margins(gm, samples, ref, ref_routes)
    clear = margins >= args.tie_margin
    same = np.array([a.answer == r for a, r in zip(got, ref, strict=True)])
    res["tie_margin"] = args.tie_margin
    res["near_tie_share"] = float(1 - clear.mean())
    res["agreement_clear"] = float(same[clear].mean()) if clear.any() else None
    res["agreement_near_tie"] = float(same[~clear].mean()) if (~clear).any() else None
    res["size_ratio"] = stored["int8"] / stored["fp32"]
    res["stored_bytes"] = stored
    res["bytes"] = sizes
    print({k: res[k] for k in ("agreement", "agreement_clear", "near_tie_share", "route_agreement",
                               "acc_fp32", "acc_int8", "size_ratio")}, flush=True)
    t = speed(gm, {"int8_ort": int8, "fp32_ort": fp32, "int4_ort": int4}, samples, args.n_b1,
              args.n_b32)
    res["timing"] = t
    res["speedup_p50_b1"] = t["torch_p50_ms_b1"] / t["int8_ort_p50_ms_b1"]
    res["speedup_b32"] = t["torch_p50_ms_b32"] / t["int8_ort_p50_ms_b32"]
    res["fp32_ort_speedup_p50_b1"] = t["torch_p50_ms_b1"] / t["fp32_ort_p50_ms_b1"]
    res["fp32_ort_speedup_b32"] = t["torch_p50_ms_b32"] / t["fp32_ort_p50_ms_b32"]
    # where int8 stands against the fp32 ONNX graph (> 1: int8 is faster)
    res["int8_vs_fp32_ort_b1"] = t["fp32_ort_p50_ms_b1"] / t["int8_ort_p50_ms_b1"]
    res["int8_vs_fp32_ort_b32"] = t["fp32_ort_p50_ms_b32"] / t["int8_ort_p50_ms_b32"]
    res["int4"]["vs_fp32_ort_b1"] = t["fp32_ort_p50_ms_b1"] / t["int4_ort_p50_ms_b1"]
    res["int4"]["vs_fp32_ort_b32"] = t["fp32_ort_p50_ms_b32"] / t["int4_ort_p50_ms_b32"]
    print({k: round(v, 2) for k, v in t.items()}, flush=True)
    rng = np.random.default_rng(1)
    pick = rng.permutation(len(samples))[: args.quant_samples]
    sub, sub_ref = [samples[i] for i in pick], [ref[i] for i in pick]
    res["quantization"] = quantization_choices(bundle, sub, sub_ref)
    res["load_test"] = load_test(bundle, pub, samples)
    print(res["load_test"], flush=True)
    finish(res, args.out, {
        "agreement": (res["agreement"], ">=", 0.99),
        "acc_drop": (res["acc_fp32"] - res["acc_int8"], "<=", 1.0),
        "speedup_p50_b1": (res["speedup_p50_b1"], ">=", 2.0),
        "speedup_b32": (res["speedup_b32"], ">=", 2.0),
        "size_ratio": (res["size_ratio"], "<=", 0.35),
        "load_test_errors": (res["load_test"]["errors"], "<=", 0),
    })


if __name__ == "__main__":
    main()
