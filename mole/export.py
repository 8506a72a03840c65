"""Global model → ONNX graphs in the field's edge layout, quantised → a signed bundle folder.

Below both sides: the cloud exports a bundle after each task (cloud/publish.py), `fedmole
export` does it for a finished run, and the edge serves what it wrote (edge/ort_runtime.py).

``load_run(RUN)`` rebuilds the global model of a federated run folder (``metrics.json``'s config
and ``checkpoint.safetensors``: plan, experts, routers, τ, partners) as PEFT experts on the
base — the torch fp32 reference. ``export_bundle`` writes (layout: protocol.bundle)::

    OUT/vision_encoder.onnx         mole.onnx_graph's graphs, fp32 (dynamic batch/sequence/past)
    OUT/audio_encoder.onnx          (bases with an audio tower)
    OUT/embed_tokens.onnx
    OUT/decoder_model_merged.onnx   prefill and KV-cache decode in one graph
    OUT/router.onnx                 the task autoencoders (once a task has a router)
    OUT/<graph>_int8.onnx           each graph with int8 weights (recipe INT8 below)
    OUT/<graph>_q4.onnx             the int4 precision: the decoder with 4-bit weights (recipe
                                    INT4), the other graphs with int8 ones
    OUT/weights.onnx_data           each precision's graphs keep their weights in one external-
    OUT/weights_int8.onnx_data      data file, each distinct tensor once (mole.shared_weights:
    OUT/weights_q4.onnx_data        SmolLM2's tied embedding and LM head are one tensor)
    OUT/tokenizer/                  the base's tokenizer
    OUT/processor/                  the checkpoint's processor (image processor, tokenizer,
                                    chat template) for a checkpoint base; the Whisper feature
                                    extractor for the own base with audio
    OUT/manifest.json               versions, opset, sha256 of every file, tasks, τ, partners,
                                    round; ``extra.graphs`` maps each precision to its files
    OUT/manifest.sig                Ed25519 over manifest.json (protocol.bundle.sign_bundle)

Quantisation choice for int8, measured on a trained default model's 1,800 test samples
(bench/edge_inference.py records the comparison under ``quantization``): onnxruntime's dynamic
int8 (``quantize_dynamic``: int8 weights, activations quantised per tensor at run time) flipped
5–32% of the answers against torch fp32 — per-channel weights without ``reduce_range`` saturate
the u8·s8 products on this CPU (68% agreement), with ``reduce_range`` 95.5%. Block-wise int8
weights (``MatMulNBits``, 8 bits, blocks of 32 along the input dimension, symmetric) agree on
97.4%; ``accuracy_level`` 1 computes in fp32 from them (weight-only), level 4 also quantises
activations per block (96.0%). Keeping the LM head in fp32 (56 KB) lifts agreement to 98.3% at a
size ratio of 0.340; blocks of 16 or fp32 LoRA factors did not beat it inside the 0.35 budget.
Asymmetric blocks (a uint8 zero point per block: the min/max range of a block of 32 weights is
rarely centred) and the token embedding as int8 per row (a Gather, which MatMulNBits does not
cover; 56 KB fp32 → 14 KB) gave 99.2% at 0.342 on that model, and 99.3% / 98.8% on the models of
federation seeds 1 and 2 (the symmetric recipe: 98.4% / 99.0%) — near-tied answers flip either
way, so ±0.3 points between recipes is noise. The convolutions (patch embedding, audio stem)
as int8 cost route agreement on one of the three models and stay fp32; 4-bit router
autoencoders misroute 21% of the samples. So: MatMulNBits int8, block 32, asymmetric, accuracy
level 1, everything but the LM head — the router autoencoders included — plus the embedding.
The int4 recipe (:data:`INT4`) was chosen on the SmolLM2 base by bench/edge_llm.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from mole.families.base import CheckpointError, require_edge_bundle
from mole.global_model import EdgeModel
from mole.onnx_graph import ExportParts, GraphSpec
from mole.router import TaskRouter, ae_from_state
from mole.shared_weights import share_weights
from protocol.config import RunConfig, parse_config
from protocol.instructions import is_shared
from protocol.manifest import Sample
from protocol.state import CHECKPOINT, GlobalState, load_checkpoint

log = logging.getLogger(__name__)

OPSET = 17
PRECISIONS = ("fp32", "int8", "int4")
_SUFFIX = {"fp32": "", "int8": "_int8", "int4": "_q4"}
# Each precision's graphs keep their weights here, each tensor once (mole.shared_weights).
DATA = {"fp32": "weights.onnx_data", "int8": "weights_int8.onnx_data", "int4": "weights_q4.onnx_data"}
TOKENIZER_DIR, PROCESSOR_DIR = "tokenizer", "processor"
DECODER = "decoder_model_merged"


def graph_file(graph: str, precision: str) -> str:
    """``vision_encoder`` + ``int8`` → ``vision_encoder_int8.onnx``."""
    return f"{graph}{_SUFFIX[precision]}.onnx"


@dataclass(frozen=True)
class QuantRecipe:
    """Weight-only quantisation of a graph's MatMuls with a constant weight (MatMulNBits)."""

    bits: int  # 8 or 4
    block_size: int  # weights per scale, along the input dimension
    symmetric: bool  # False: a zero point per block
    accuracy_level: int  # 1: compute in fp32 from the dequantised weights; 4: int8 activations
    head_bits: int  # the LM head (decides every greedy token): 0 keeps it fp32
    graphs: tuple[str, ...]  # the graphs quantised with this recipe; the others with INT8's
    # True: each block keeps a float minimum (GGUF's Q4_1 layout: w = d·q + m) carried by a
    # per-block correction (:func:`block_quantize`) instead of MatMulNBits' integer zero point
    float_min: bool = False
    # > 0: the LM head's k best candidates re-scored exactly (:func:`rescore_top_k`)
    head_rescore: int = 0
    # float_min only: the layers' projections whose names match this regex take int8
    # activations (accuracy level 4) whatever accuracy_level says — speed for agreement
    fast_projections: str = ""
    # > 0: the decoder's activation outliers migrated into its weights first (SmoothQuant's α,
    # :mod:`mole.smoothing`), calibrated on the prompts shipped with the base
    smooth_alpha: float = 0.0
    # the layer projections whose node names match this regex stay fp32 (not quantised)
    fp32_projections: str = ""


# Chosen by measurement (module docstring; bench/edge_llm.py for int4). onnxruntime 1.32's
# 8-bit MatMulNBits is fast only with int8 activations (accuracy level 4): on the SmolLM2 base's
# decoder (d = 576) level 1 decodes 12 tokens/s against fp32's 45 and level 4's 67, with the same
# first-token agreement on clear-margin prompts (1.00). On the own 0.8 M-parameter base (d = 128)
# speed is per-node overhead either way and level 1 agrees more (0.990 vs 0.978 of 1,800
# answers), so small models keep it: :func:`recipes_for`.
# int4: 4-bit kernels do have a fast level 1 (~2x level 4's time, not 50x), and on SmolLM2
# (greedy answers against ORT fp32 = torch fp32) each part of the recipe counts: integer zero
# points 0.24 (500 prompts; accuracy 16% vs 37%), then on 200 prompts the GGUF's grid kept
# (float_min) 0.755, + head top-8 rescored 0.79, + fp32 activations in the layers (level 1)
# 1.00 — at 1.73-1.76x ORT fp32's decode speed (two runs; level 4: ~2.2x; bench/edge_llm.py).
# At level 4 the kernel quantises its input per block of ``block_size`` channels, so the int8
# decoder migrates activation outliers into the weights (smooth_alpha, mole.smoothing) and uses
# blocks of 16 (bench/edge_llm.py's int8 grid).
INT8 = QuantRecipe(bits=8, block_size=32, symmetric=False, accuracy_level=4, head_bits=0,
                   graphs=("vision_encoder", "audio_encoder", "embed_tokens", DECODER, "router"))
INT8_LM = dataclasses.replace(INT8, block_size=16, smooth_alpha=0.5)
INT8_WEIGHT_ONLY = dataclasses.replace(INT8, accuracy_level=1)
INT4 = QuantRecipe(bits=4, block_size=32, symmetric=False, accuracy_level=1, head_bits=8,
                   graphs=(DECODER,), float_min=True, head_rescore=8)
RECIPES = {"int8": INT8_LM, "int4": INT4}
SMALL_HIDDEN = 256  # below: the weight-only int8 recipe


def recipes_for(spec: GraphSpec) -> dict[str, QuantRecipe]:
    """The int8 / int4 recipes for a model of this size (the comment above says why)."""
    if spec.hidden < SMALL_HIDDEN:
        return {"int8": INT8_WEIGHT_ONLY, "int4": INT4}
    return dict(RECIPES)


WEIGHT_ONLY_OPS = ("Gather",)
HEAD = r"^/lm_head/"
# A GatedLinear's gate·select product (MatMul_1) is a (E, R) table of exact 0/α-r values, not
# worth a quantiser; its A (MatMul_2) and B (MatMul_3) are rank-r matrices (B has 16 inputs:
# less than one block) whose bytes are a rounding error of the graph's, so they get 8 bits even
# in the int4 recipe. The exporter names layer i's q_proj "q_proj_i" and the decoder's fused
# projections "qkv.i" and "gate_up.i".
EXPERT_BITS = 8
# onnxruntime 1.32 has fast fp32-activation MatMulNBits kernels (accuracy level 1) for 4 bits
# only: at 8 bits level 1 dequantises the whole weight every call (SmolLM2's head: 219 ms against
# 3.1 ms at level 4), so the 8-bit parts of a 4-bit recipe (head, experts) run at level 4.
EIGHT_BIT_LEVEL = 4
_GATED = r"/(?:\w+_proj(?:_\d+)?|qkv\.\d+|gate_up\.\d+)/MatMul"
GATE_SELECT = rf"{_GATED}_1$"
EXPERT = rf"{_GATED}_[23]$"
KEEP_FP32 = rf"{HEAD}|{GATE_SELECT}"


class ExportError(ValueError):
    """A run folder or model cannot be exported; the message says which and what to do."""


@dataclass
class GlobalModel:
    cfg: RunConfig
    em: EdgeModel  # base + every task's expert, values set
    router: TaskRouter
    tasks: list[str]  # tasks with experts, in learning order
    partners: dict[str, list[str]]
    global_round: int

    @property
    def router_weights(self) -> list[float]:
        """The router features' modality weights (image, text, audio), as mole.router takes them."""
        d = self.cfg.dmole
        return [d.router_vision_weight, 1.0, d.router_audio_weight]


def load_run(run_dir: Path, base_path: Path | None = None) -> GlobalModel:
    """The global model of a federated D-MoLE run folder (``fedmole simulate --out RUN``)."""
    run_dir = Path(run_dir)
    cfg, base = _run_config(run_dir, base_path)
    return global_model_from_state(cfg, load_checkpoint(run_dir), base, str(run_dir))


def _run_config(run_dir: Path, base_path: Path | None) -> tuple[RunConfig, Path]:
    """A run folder's parsed config and its base checkpoint (``base_path`` if it moved)."""
    mfile = run_dir / "metrics.json"
    if not mfile.is_file():
        raise ExportError(f"{str(run_dir)!r} has no metrics.json; pass the --out folder of a "
                          "finished `fedmole simulate` run")
    try:
        flat = json.loads(mfile.read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{str(mfile)!r} has no readable config ({e})") from e
    if base_path is not None:
        flat = {**flat, "model.base-path": str(base_path)}
    if not flat.get("model.base-path"):
        raise ExportError(f"the config of {str(run_dir)!r} names no base (`model.base-path` is "
                          "empty); pass --base PATH to the base checkpoint folder it used")
    base = Path(str(flat["model.base-path"]))
    if not (base / "config.json").is_file():
        raise ExportError(f"the run's base {str(base)!r} is missing; pass --base PATH to the base "
                          "checkpoint folder it was trained from")
    return parse_config(flat), base


def export_peft(run_dir: Path, out: Path, base_path: Path | None = None) -> list[Path]:
    """A federated run's global experts as PEFT adapters ``out/<task>`` of the base's own HF
    class (what the cloud writes to ``RUN/peft`` at the end of a run; this also serves a run
    that stopped early or predates it)."""
    from mole.peft_export import PeftExportError, write_plan_experts

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file() and (run_dir / "metrics.json").is_file():
        where = (f"its experts are already PEFT adapters in {str(run_dir / 'peft')!r}"
                 if (run_dir / "peft").is_dir() else "pass the --out folder of `fedmole simulate`")
        raise ExportError(f"{str(run_dir)!r} has no {CHECKPOINT}: not a federated run; {where}")
    cfg, base = _run_config(run_dir, base_path)
    state = load_checkpoint(run_dir)
    if not state.experts:
        raise ExportError(f"{str(run_dir)!r} has no trained experts yet; export after a task")
    try:
        return write_plan_experts(base, state.experts, state.plan, cfg.lora.alpha, Path(out))
    except PeftExportError as e:
        raise ExportError(f"{str(run_dir)!r}: {e}") from e


def global_model_from_state(cfg: RunConfig, state: GlobalState, base: Path, where: str = "the run"
                            ) -> GlobalModel:
    """Base + every trained task's experts + routers of a cloud state (checkpoint or live)."""
    if is_shared(state.method):
        raise ExportError(f"{where!r} is a {state.method} run: one shared adapter and no "
                          "router; export a D-MoLE run (dmole or dmole-replay)")
    tasks = [t for t in state.plan.tasks if t in state.experts]
    if not tasks:
        raise ExportError(f"{where!r} has no trained experts yet; export after a task")
    em = EdgeModel(cfg, base)
    em.sync_plan(state.plan)
    for t in tasks:
        em.set_factors(t, state.experts[t])
    em.model.eval()  # PEFT creates its LoRA dropout modules in training mode
    router = TaskRouter(hidden=cfg.dmole.router_hidden, quantile=cfg.dmole.router_quantile, folds=1)
    for t in tasks:
        if t in state.routers and t in state.thresholds:
            router.put(t, ae_from_state(state.routers[t]), state.thresholds[t],
                       cfg.dmole.router_quantile)
    return GlobalModel(cfg, em, router, tasks, {t: list(state.partners.get(t, [])) for t in tasks},
                       state.round)


def export_parts(gm: GlobalModel) -> ExportParts:
    return ExportParts(gm.em.experts, gm.tasks, gm.router, gm.router_weights)


def example_inputs(spec: GraphSpec, graph: str, batch: int = 2, t: int = 3, past: int = 2
                   ) -> tuple[torch.Tensor, ...]:
    """Tracing inputs of ``graph`` (the decoder's with a past cache)."""
    e = len(spec.tasks)
    if graph == "vision_encoder":
        return torch.zeros(batch, 3, spec.image_size, spec.image_size), torch.zeros(batch, e)
    if graph == "audio_encoder":
        assert spec.audio_shape is not None
        return torch.zeros(batch, *spec.audio_shape), torch.zeros(batch, e)
    if graph == "embed_tokens":
        return (torch.full((batch, t), 5, dtype=torch.long),)
    if graph == "router":
        return tuple(torch.ones(batch, spec.hidden) for _ in range(3))
    cache = [torch.zeros(batch, spec.kv_heads, past, spec.head_dim)] * (2 * spec.layers)
    return (torch.zeros(batch, t, spec.hidden), torch.ones(batch, past + t, dtype=torch.long),
            torch.arange(past, past + t).repeat(batch, 1), torch.zeros(batch, e), *cache)


def _dynamic_axes(spec: GraphSpec, graph: str) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "pixel_values": {0: "images"}, "input_features": {0: "clips"},
        "image_features": {0: "images"}, "audio_features": {0: "clips"},
        "input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"}, "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch"}, "last_hidden_state": {0: "batch"},
        "image_pool": {0: "batch"}, "text_state": {0: "batch"}, "audio_pool": {0: "batch"},
        "route_errors": {0: "batch"},
        # the encoders' gate is per image / clip, the decoder's per row
        "gate": {0: "batch" if graph == DECODER else "images"},
    }
    for name in spec.cache_names("past_key_values"):
        axes[name] = {0: "batch", 2: "past"}
    for name in spec.cache_names("present"):
        axes[name] = {0: "batch", 2: "total"}
    names = set(spec.input_names(graph)) | set(spec.output_names(graph))
    return {k: v for k, v in axes.items() if k in names}


def export_onnx(parts: ExportParts, graph: str, path: Path, opset: int = OPSET) -> None:
    spec = parts.spec
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers' shape checks trace as constants: true here, the towers' shapes are fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript tracer (dynamo=False): it traces these plain modules in seconds; torch
        # marks it deprecated in favour of torch.export, which we have not needed yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(parts.graph(graph), example_inputs(spec, graph), str(path),
                          input_names=spec.input_names(graph),
                          output_names=spec.output_names(graph),
                          dynamic_axes=_dynamic_axes(spec, graph), opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(path))


def quantize_graph(src: Path, dst: Path, recipe: QuantRecipe,
                   weight_only_ops: tuple[str, ...] = WEIGHT_ONLY_OPS) -> None:
    """``src`` with ``recipe``'s MatMulNBits weights (the gate·select tables stay fp32; the LM
    head as ``recipe.head_bits``; below 8 bits the experts' A and B in 8), then the weights of
    ``weight_only_ops`` (embedding tables) as int8 per row (:func:`int8_weight_only`)."""
    model = onnx.load(str(src))
    names = [n.name for n in model.graph.node]
    head = [n for n in names if re.search(HEAD, n)]
    fp32 = recipe.fp32_projections
    keep = [n for n in names if re.search(GATE_SELECT, n)
            or (fp32 and re.search(fp32, n) and n not in head)]
    # below 8 bits the experts' A and B get 8 (EXPERT_BITS)
    experts = [n for n in names if recipe.bits < 8 and re.search(EXPERT, n) and n not in keep]
    done: list[str] = []
    if recipe.float_min:
        done += block_quantize(model, [n for n in names if n not in {*head, *keep, *experts}],
                               recipe.bits, recipe.block_size, recipe.accuracy_level,
                               float_min=True, fast=recipe.fast_projections)
    if recipe.head_bits:
        # symmetric blocks of 32: GGUF's Q8_0 layout (SmolLM2's token table), exact for it
        heads = block_quantize(model, head, recipe.head_bits, INT8.block_size, EIGHT_BIT_LEVEL,
                               float_min=False)
        if recipe.head_rescore:
            for h in heads:
                rescore_top_k(model, f"{h}_Q{recipe.head_bits}", recipe.head_rescore)
        done += heads
    out = _nbits(model, recipe.bits, recipe.block_size, recipe.symmetric, recipe.accuracy_level,
                 exclude=keep + head + experts + done)
    if experts:
        out = _nbits(out, EXPERT_BITS, INT8.block_size, recipe.symmetric, EIGHT_BIT_LEVEL,
                     exclude=keep, include=experts)
    left = [h for h in head if recipe.head_bits and h not in done]  # K not a multiple of 32
    if left:
        out = _nbits(out, recipe.head_bits, INT8.block_size, True, EIGHT_BIT_LEVEL,
                     exclude=keep, include=left)
    if weight_only_ops:
        int8_weight_only(out, weight_only_ops)
    onnx.save(out, str(dst))


def block_quantize(model: onnx.ModelProto, names: list[str], bits: int, block_size: int,
                   accuracy_level: int, float_min: bool, fast: str = "") -> list[str]:
    """In place: each MatMul of ``names`` whose weight is a constant fp32 (K, N) initializer
    with K a multiple of ``block_size`` becomes a MatMulNBits written here (the others are left
    to onnxruntime's quantiser). Returns the names converted.

    Blocks run along K. ``float_min=False``: symmetric, w ≈ d·(q − 2^(b−1)), d = max|w| / (2^(b−1)
    − 1) — GGUF's Q8_0 at 8 bits. ``float_min=True``: w ≈ d·q + m with m the block's minimum
    and d = (max − min) / (2^b − 1) — GGUF's Q4_1 at 4 bits. MatMulNBits knows only integer zero
    points (a float one runs ~50× slower in onnxruntime 1.32), so the kernel computes
    d·(q − 2^(b−1)) and a correction adds the rest, r = m + 2^(b−1)·d per block and column:
    y = x·W_q + Σ_blocks(x)·R, R (K/32, N) (Reshape + ReduceSum; MatMul with a 0/1 (K, K/32) matrix
    where x's rank is unknown). Weights already on
    such a grid (the dequantised GGUF) come back exactly; an integer zero point moves every block
    by up to half a step, which cost SmolLM2 more than half its task accuracy at 4 bits.

    Nodes whose names match ``fast`` get accuracy level 4 (int8 activations) instead.

    Scales and R are stored fp16 (the GGUF's own precision) behind a Cast that onnxruntime
    folds when the session loads, so the kernel still gets fp32 constants; that halves their
    bytes (3.3 MB each for SmolLM2's layers)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    wanted, done = set(names), []
    zp = 2 ** (bits - 1)
    nodes = list(model.graph.node)
    # names taken; the constants made here are shared by every projection of a width and
    # across calls (block_shape_*, last_axis, block_sum_*)
    taken = {o for n in nodes for o in n.output} | set(inits)
    out_nodes: list[onnx.NodeProto] = []
    ranks = _ranks(model) if float_min else {}

    def const_i64(name: str, value: list[int]) -> str:
        if name not in taken:
            taken.add(name)
            model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
        return name

    def const16(name: str, value: np.ndarray) -> tuple[str, list[onnx.NodeProto]]:
        # fp16 initializer + Cast to fp32; fp32 if a value is not finite in fp16
        if name in taken:
            return name, []
        taken.add(name)
        v16 = value.astype(np.float16)
        if not np.isfinite(v16).all():
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            return name, []
        model.graph.initializer.append(numpy_helper.from_array(v16, f"{name}_fp16"))
        return name, [helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT,
                                       name=f"{name}_Cast")]

    for node in nodes:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if (node.name not in wanted or init is None or init.data_type != TensorProto.FLOAT
                or len(init.dims) != 2 or init.dims[0] % block_size):
            out_nodes.append(node)
            continue
        w = numpy_helper.to_array(init)  # (K, N)
        k, n = w.shape
        nb = k // block_size
        wb = w.reshape(nb, block_size, n)  # (K/32, 32, N)
        if float_min:
            lo = wb.min(axis=1)  # (K/32, N)
            d = (wb.max(axis=1) - lo) / (2 ** bits - 1)
        else:
            d = np.abs(wb).max(axis=1) / (zp - 1)
        d = np.where(d > 0, d, 1.0).astype(np.float16).astype(np.float32)  # what the kernel gets
        if float_min:
            q = np.clip(np.rint((wb - lo[:, None]) / d[:, None]), 0, 2 ** bits - 1)
        else:
            q = np.clip(np.rint(wb / d[:, None]), 1 - zp, zp - 1) + zp
        qn = q.astype(np.uint8).transpose(2, 0, 1)  # (N, K/32, 32)
        if bits == 4:  # two per byte, the first in the low nibble
            qn = qn[..., 0::2] | (qn[..., 1::2] << 4)
        base = node.name.strip("/").replace("/", "_")
        scales, casts = const16(f"{base}_scales", d.T.reshape(-1))  # (N·K/32,), column-major
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(qn),
                                                               f"{base}_q{bits}"))
        y = node.output[0]
        mm = helper.make_node("MatMulNBits", [node.input[0], f"{base}_q{bits}", scales],
                              [f"{y}_nbits" if float_min else y], name=f"{node.name}_Q{bits}",
                              domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size,
                              accuracy_level=4 if fast and re.search(fast, node.name)
                              else accuracy_level)
        new = [*casts, mm]
        if float_min:
            r, c_r = const16(f"{base}_offsets", lo + zp * d)  # (K/32, N)
            rank = ranks.get(node.input[0])
            if rank:  # x (…, K) → (…, K/32, 32) → Σ over each block: reads x only
                shape = const_i64(f"block_shape_{rank}_{nb}x{block_size}",
                                  [0] * (rank - 1) + [nb, block_size])
                sums = [helper.make_node("Reshape", [node.input[0], shape], [f"{y}_blocks"],
                                         name=f"{node.name}_blocks"),
                        helper.make_node("ReduceSum", [f"{y}_blocks", const_i64("last_axis", [-1])],
                                         [f"{y}_block_sums"], keepdims=0,
                                         name=f"{node.name}_block_sums")]
            else:  # rank unknown: x·S with S (K, K/32) of ones per block (S is read every call)
                s_name, c_s = const16(f"block_sum_{k}x{block_size}",
                                      np.kron(np.eye(nb, dtype=np.float32),
                                              np.ones((block_size, 1), np.float32)))
                sums = [*c_s, helper.make_node("MatMul", [node.input[0], s_name],
                                               [f"{y}_block_sums"], name=f"{node.name}_block_sums")]
            new += [*c_r, *sums,
                    helper.make_node("MatMul", [f"{y}_block_sums", r], [f"{y}_offsets"],
                                     name=f"{node.name}_offsets"),
                    helper.make_node("Add", [f"{y}_nbits", f"{y}_offsets"], [y],
                                     name=f"{node.name}_add_offsets")]
        out_nodes.extend(new)
        readers[init.name] -= 1
        if readers[init.name] == 0:
            model.graph.initializer.remove(init)
        done.append(node.name)
    if done:
        del model.graph.node[:]
        model.graph.node.extend(out_nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor onnx's shape inference can tell (contrib ops' outputs it cannot)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.input, *g.output]
            if v.type.tensor_type.HasField("shape")}


def rescore_top_k(model: onnx.ModelProto, node_name: str, k: int) -> None:
    """In place: the logits of the 8-bit symmetric MatMulNBits ``node_name`` (written by
    :func:`block_quantize`) get their ``k`` largest entries recomputed from the same 8-bit
    weights with fp32 activations.

    At accuracy level 4 the kernel quantises its input to int8 per block of 32 (the only fast
    8-bit kernel, :data:`EIGHT_BIT_LEVEL`), which moves logits by ~1e-2 — enough to flip a near-
    tied greedy token. The k candidates' columns are gathered from the packed weights ((N, K/32,
    32) uint8 and the (N·K/32,) scales), dequantised and dotted with the fp32 input, and written
    back over the approximate ones: the argmax is then that of the 8-bit weights in fp32 unless
    the true best token is outside the approximate top k. 14 nodes once per graph."""
    from onnx import TensorProto, helper, numpy_helper

    at = next(i for i, n in enumerate(model.graph.node) if n.name == node_name)
    mm = model.graph.node[at]
    attrs = {a.name: a.i for a in mm.attribute}
    if attrs["bits"] != 8 or len(mm.input) > 3:  # symmetric 8-bit: w = d·(q − 128)
        raise ExportError(f"rescore_top_k needs a symmetric 8-bit MatMulNBits, not {node_name}")
    x, packed, scales = mm.input[:3]
    kk, n, blk = attrs["K"], attrs["N"], attrs["block_size"]
    y = mm.output[0]
    mm.output[0] = f"{y}_approx"
    p = f"{node_name}_rescore"
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([k], np.int64), f"{p}_k"),
        numpy_helper.from_array(np.array([n, kk // blk, 1], np.int64), f"{p}_scale_shape"),
        numpy_helper.from_array(np.array([1, kk // blk, blk], np.int64), f"{p}_block_shape"),
        numpy_helper.from_array(np.array([0], np.int64), f"{p}_zero"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last"),
        numpy_helper.from_array(np.array([-2, -1], np.int64), f"{p}_blocks"),
        numpy_helper.from_array(np.array(128.0, np.float32), f"{p}_zero_point")])
    nodes = [
        helper.make_node("TopK", [f"{y}_approx", f"{p}_k"], [f"{p}_vals", f"{p}_ids"], axis=-1,
                         name=f"{p}_topk"),  # (B, T, k)
        helper.make_node("Reshape", [scales, f"{p}_scale_shape"], [f"{p}_scales"],
                         name=f"{p}_scales"),  # (N, K/32, 1), folded at load
        helper.make_node("Gather", [packed, f"{p}_ids"], [f"{p}_q"], axis=0,
                         name=f"{p}_gather_q"),  # (B, T, k, K/32, 32) uint8
        helper.make_node("Gather", [f"{p}_scales", f"{p}_ids"], [f"{p}_d"], axis=0,
                         name=f"{p}_gather_d"),  # (B, T, k, K/32, 1)
        helper.make_node("Cast", [f"{p}_q"], [f"{p}_qf"], to=TensorProto.FLOAT, name=f"{p}_cast"),
        helper.make_node("Sub", [f"{p}_qf", f"{p}_zero_point"], [f"{p}_qc"], name=f"{p}_center"),
        helper.make_node("Mul", [f"{p}_qc", f"{p}_d"], [f"{p}_w"], name=f"{p}_dequant"),
        # x (…, K) → (…, 1, K/32, 32), whatever its rank (the decoder's head reads (B, K))
        helper.make_node("Shape", [x], [f"{p}_x_shape"], name=f"{p}_x_shape"),
        helper.make_node("Slice", [f"{p}_x_shape", f"{p}_zero", f"{p}_last"], [f"{p}_lead"],
                         name=f"{p}_lead"),
        helper.make_node("Concat", [f"{p}_lead", f"{p}_block_shape"], [f"{p}_xb_shape"], axis=0,
                         name=f"{p}_xb_shape"),
        helper.make_node("Reshape", [x, f"{p}_xb_shape"], [f"{p}_xb"], name=f"{p}_xb"),
        helper.make_node("Mul", [f"{p}_w", f"{p}_xb"], [f"{p}_prod"], name=f"{p}_prod"),
        helper.make_node("ReduceSum", [f"{p}_prod", f"{p}_blocks"], [f"{p}_exact"], keepdims=0,
                         name=f"{p}_exact"),  # (…, k)
        helper.make_node("ScatterElements", [f"{y}_approx", f"{p}_ids", f"{p}_exact"], [y],
                         axis=-1, name=f"{p}_scatter")]
    for j, node in enumerate(nodes):
        model.graph.node.insert(at + 1 + j, node)


def _nbits(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool,
           accuracy_level: int, exclude: list[str] | None = None,
           include: list[str] | None = None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                       accuracy_level=accuracy_level, bits=bits)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude or [],
                             nodes_to_include=include, algo_config=cfg)
    q.process()
    return q.model.model  # type: ignore[no-any-return]


def quantize_int8(src: Path, dst: Path, block_size: int = INT8.block_size,
                  accuracy_level: int = INT8.accuracy_level, keep_fp32: str = KEEP_FP32,
                  symmetric: bool = INT8.symmetric,
                  weight_only_ops: tuple[str, ...] = WEIGHT_ONLY_OPS) -> None:
    """Block-wise int8 weights (MatMulNBits) for every MatMul with a constant weight, except the
    nodes whose names match ``keep_fp32``; then the weights of ``weight_only_ops`` (convolutions,
    embedding tables) as int8 per output channel behind a DequantizeLinear (the recipe
    comparison of bench/edge_inference.py)."""
    model = onnx.load(str(src))
    keep = [n.name for n in model.graph.node if keep_fp32 and re.search(keep_fp32, n.name)]
    out = _nbits(model, 8, block_size, symmetric, accuracy_level, exclude=keep)
    if weight_only_ops:
        int8_weight_only(out, weight_only_ops)
    onnx.save(out, str(dst))


def int8_weight_only(model: onnx.ModelProto, ops: tuple[str, ...], min_elements: int = 2048) -> list[str]:
    """In place: each fp32 initializer that is the weight of an ``ops`` node (Conv: input 1,
    Gather: input 0) with ≥ ``min_elements`` values becomes int8 with one symmetric scale per
    output channel (axis 0: a conv's output channel, an embedding's row). Returns the names
    converted.

    A Gather along axis 0 (an embedding lookup) gathers the int8 rows and their scales and
    multiplies only those — (B, T, d) values a call. A DequantizeLinear in front of it would
    dequantise the whole table every call: 28 M values for SmolLM2's, 7 ms of each decode step
    on 2 cores, more than half an int4 step. Any other consumer reads the table back through a
    DequantizeLinear of the original name."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    weights = {n.input[0] if n.op_type == "Gather" else n.input[1]
               for n in model.graph.node if n.op_type in ops and len(n.input) > 1}
    done, dq_nodes = [], []
    for name in sorted(weights):
        init = inits.get(name)
        if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) < 2:
            continue
        w = numpy_helper.to_array(init)  # (C_out, …)
        if w.size < min_elements:
            continue
        scale = np.maximum(np.abs(w).reshape(w.shape[0], -1).max(axis=1), 1e-12) / 127.0  # (C_out,)
        q = np.clip(np.rint(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        model.graph.initializer.remove(init)
        model.graph.initializer.append(numpy_helper.from_array(q, f"{name}_int8"))
        lookups = [n for n in consumers.get(name, []) if n.op_type == "Gather"
                   and n.input[0] == name and _axis(n) == 0]
        if lookups:
            # the scales as (C_out, 1, …): a gathered row's scale broadcasts over its values
            model.graph.initializer.append(numpy_helper.from_array(
                scale.astype(np.float32).reshape(-1, *[1] * (w.ndim - 1)), f"{name}_row_scale"))
        for g in lookups:
            out, idx = g.output[0], g.input[1]
            g.input[0] = f"{name}_int8"
            g.output[0] = f"{out}_int8"
            at = list(model.graph.node).index(g) + 1
            for k, node in enumerate([
                    helper.make_node("Gather", [f"{name}_row_scale", idx], [f"{out}_scale"],
                                     axis=0, name=f"{g.name}_scale"),
                    helper.make_node("Cast", [f"{out}_int8"], [f"{out}_float"],
                                     to=TensorProto.FLOAT, name=f"{g.name}_cast"),
                    helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out],
                                     name=f"{g.name}_dequant")]):
                model.graph.node.insert(at + k, node)
        if len(lookups) < len(consumers.get(name, [])):
            model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32),
                                                                   f"{name}_scale"))
            dq_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"],
                                             [name], axis=0, name=f"{name}_DequantizeLinear"))
        done.append(name)
    for node in reversed(dq_nodes):  # before every consumer
        model.graph.node.insert(0, node)
    return done


def _axis(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 0)


def smoothed_decoder(gm: GlobalModel, alpha: float, calibration: Sequence[Sample] | None,
                      path: Path) -> dict[str, Any] | None:
    """Export the decoder of a smoothed copy of the model to ``path`` (mole.smoothing); None
    (and nothing written) when there are no calibration prompts."""
    from mole.inference import active_set
    from mole.router import router_features
    from mole.smoothing import CALIBRATION, activation_maxima, read_calibration, smooth_layers

    source = "given"
    if calibration is None:
        base = gm.cfg.model.base_path
        calibration = read_calibration(Path(base)) if base else None
        source = f"{base}/{CALIBRATION}"
    if not calibration:
        log.warning("no calibration prompts (the base has no %s): the int8 decoder is quantised "
                    "without smoothing, so its answers agree less with fp32", CALIBRATION)
        return None
    em = gm.em
    z = router_features(em.experts, em.enc, calibration, gm.cfg.train.eval_batch_size,
                        weights=gm.router_weights)
    routes = gm.router.route(z)  # each prompt with the experts the edge would give it
    maxima = activation_maxima(em.model, em.enc, calibration, routes,
                               lambda r: em.experts.only(active_set(r, gm.tasks, gm.partners)))
    parts = export_parts(gm)  # a fresh copy: the fp32 graphs keep the unsmoothed weights
    smooth_layers(parts.lm, maxima, alpha, parts.n_heads, parts.spec.kv_heads)
    export_onnx(parts, DECODER, path)
    return {"alpha": alpha, "calibration": source, "prompts": len(calibration)}


def export_bundle(gm: GlobalModel, out: Path, signing_key: Path | None, bundle_id: str | None = None,
                  recipes: dict[str, QuantRecipe] | None = None,
                  calibration: Sequence[Sample] | None = None) -> Path:
    """Write the bundle folder ``out`` (replaced if it exists); sign it when a key is given.

    ``calibration``: prompts for a recipe's ``smooth_alpha`` (default: the base's
    ``calibration.json``; without any, the decoder is quantised unsmoothed and the manifest
    says so)."""
    from protocol.bundle import sign_bundle, write_manifest

    t0 = time.perf_counter()
    try:
        require_edge_bundle(gm.em.model, gm.cfg.model.base_path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    parts = export_parts(gm)
    spec = parts.spec
    recipes = recipes_for(spec) if recipes is None else dict(recipes)
    graphs = spec.graphs(routed=bool(parts.routed))
    # precision → graph → file; ``made`` holds the files each precision wrote itself
    files: dict[str, dict[str, str]] = {"fp32": {g: graph_file(g, "fp32") for g in graphs}}
    made: dict[str, list[str]] = {"fp32": list(files["fp32"].values())}
    for g in graphs:
        export_onnx(parts, g, out / files["fp32"][g])
    smoothing: dict[str, dict[str, Any] | None] = {}
    for precision, recipe in recipes.items():
        # every precision has a file of every graph, so a device that runs one precision stores
        # its files and one weights file, nothing of the others
        files[precision] = {g: graph_file(g, precision) for g in graphs}
        made[precision] = list(files[precision].values())
        smoothed = out / f".{DECODER}_smoothed.onnx"  # the smoothed fp32 source, then deleted
        smoothing[precision] = (smoothed_decoder(gm, recipe.smooth_alpha, calibration, smoothed)
                                if recipe.smooth_alpha > 0 and DECODER in recipe.graphs else None)
        for g in graphs:
            src = smoothed if g == DECODER and smoothing[precision] else out / files["fp32"][g]
            quantize_graph(src, out / files[precision][g],
                           recipe if g in recipe.graphs else recipes["int8"])
        smoothed.unlink(missing_ok=True)
    shared = {DATA[p]: share_weights([out / f for f in fs], DATA[p]) for p, fs in made.items()}
    for f in {f for m in files.values() for f in m.values()}:
        onnx.checker.check_model(str(out / f))
    gm.em.enc.tok.save_pretrained(str(out / TOKENIZER_DIR))
    encoder = "own"
    if hasattr(gm.em.processor, "image_processor"):  # a checkpoint: its processor and template
        gm.em.processor.save_pretrained(str(out / PROCESSOR_DIR))
        encoder = "chat"
    elif gm.em.model.feature_extractor is not None:
        gm.em.model.feature_extractor.save_pretrained(str(out / PROCESSOR_DIR))
    extra = {
        "opset": OPSET, "graph": asdict(spec), "graphs": files, "encoder": encoder,
        "family": gm.em.model.family.name,
        "quantization": {p: asdict(r) | {"op": "MatMulNBits", "smoothing": smoothing.get(p),
                                         "fp32_nodes": GATE_SELECT
                                         + ("" if r.head_bits else f"|{HEAD}"),
                                         "eight_bit_nodes": (EXPERT + (f"|{HEAD}" if r.head_bits
                                                                       else "")
                                                             if r.bits < 8 else ""),
                                         "weight_only_int8": {"ops": list(WEIGHT_ONLY_OPS),
                                                              "scale": "symmetric, per row"}}
                         for p, r in recipes.items()},
        "router_weights": gm.router_weights,
        "max_length": gm.em.enc.max_length, "max_new_tokens": gm.cfg.train.max_new_tokens,
        "eos_token_id": int(gm.em.enc.eos_id), "pad_token_id": int(gm.em.enc.pad_id),
        "method": gm.cfg.federation.method,
        "shared_weights": shared,
    }
    thresholds = {t: float(e.threshold) for t, e in gm.router.tasks.items()}
    write_manifest(out, bundle_id=bundle_id or f"round-{gm.global_round:05d}",
                   global_round=gm.global_round, tasks=list(gm.tasks), thresholds=thresholds,
                   partners={t: list(p) for t, p in gm.partners.items()}, extra=extra)
    if signing_key is not None:
        sign_bundle(out, signing_key)
    log.info("exported %s in %.1f s", out, time.perf_counter() - t0)
    return out
