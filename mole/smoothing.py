"""Scale migration before int8 activations (SmoothQuant): outlier channels moved into the weights.

onnxruntime's fast 8-bit MatMulNBits (accuracy level 4, :data:`mole.export.INT8_LM`) quantises its
input to int8 per block of ``block_size`` input channels, one scale a block. In a language
model's projection inputs a few channels run far above the median (the SmolLM2 base: max/median
of the per-channel maxima 10–29 at the q|k|v input, 8–34 at down_proj's, 2.5–11 at o_proj's and
gate|up's), so they decide their block's scale and the other channels of the block keep a few
levels. Per input channel j of a
projection, with a_j the largest |x_j| on calibration prompts and w_j the largest |W_ij| over
the projections that read x:

    s_j = a_j^α / w_j^(1−α),    x_j → x_j / s_j,    W_:j → W_:j · s_j

which leaves W·x unchanged and flattens x. The 1/s is folded into the op that makes x, so the
graph gains no node:

* q|k|v input = ``input_layernorm``'s output: its weight / s;
* gate|up input = ``post_attention_layernorm``'s output: its weight / s;
* down_proj input = act(gate) · up: up's output rows / s;
* o_proj input = the attention context, linear in v: v's output rows / s, one s per kv channel
  (the max over the query heads that share it), o_proj's columns · s repeated per query head.

The experts travel with their base weight: a projection's LoRA A columns scale with its
columns (A·(x/s)·... = A·x), v's and up's LoRA B rows with their rows. Exact in real arithmetic:
the fp32 graph of a smoothed copy gives the same logits to rounding
(tests/test_onnx_export.py). Measured on the SmolLM2 federated six-task run (300 test prompts,
greedy answers against torch fp32, calibrated on the base's prompts): first-token agreement
with int8 blocks of 32 0.947 → 0.98 smoothed (α = 0.5), blocks of 16 0.963 → 0.993 (answers
0.843 → 0.933); bench/edge_llm.py's int8 grid has the same comparison on its own run.

Calibration prompts ship with the base (``calibration.json`` in the base folder, the field's
LLaVA-style records): the cloud holds no client data, and activation maxima are a property of
the base and its experts, measured on prompts of the kind it was pretrained on. Each prompt runs
with the experts its own route (the router's) selects, as at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from protocol.manifest import Sample

CALIBRATION = "calibration.json"  # in a base folder: LLaVA-style records, images beside it
SITES = ("qkv", "o", "gate_up", "down")  # the projection inputs of a decoder layer
MIN_SCALE, MAX_SCALE = 1e-2, 1e2  # s is clamped: a dead channel must not blow a weight up


def read_calibration(base: Path) -> list[Sample] | None:
    """The calibration prompts shipped with ``base`` (None when it has none)."""
    from protocol.llava_format import TaskSamples

    path = Path(base) / CALIBRATION
    if not path.is_file():
        return None
    data = TaskSamples.read("calibration", path)
    return [data[i] for i in range(len(data))]


def _inputs(layer: Any) -> dict[str, torch.nn.Module]:
    """The module whose input is each site's activation (a PEFT layer or a plain Linear)."""
    return {"qkv": layer.self_attn.q_proj, "o": layer.self_attn.o_proj,
            "gate_up": layer.mlp.gate_proj, "down": layer.mlp.down_proj}


@torch.no_grad()
def activation_maxima(model: Any, enc: Any, samples: Sequence[Sample], routes: Sequence[str | None],
                      experts_for: Any, batch_size: int = 16) -> dict[tuple[int, str], torch.Tensor]:
    """Per (layer, site), the largest |x_j| (d_in,) over the prompts' real tokens (padding left
    out), each prompt run with ``experts_for(route)`` active (a context manager)."""
    layers = model.llava.model.language_model.layers
    out: dict[tuple[int, str], torch.Tensor] = {}
    mask: list[torch.Tensor] = []  # the running batch's attention mask (B, T)

    def hook(key: tuple[int, str]):
        def fn(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().abs()  # (B, T, d_in)
            x = x[mask[0].bool()] if x.shape[:2] == mask[0].shape else x.reshape(-1, x.shape[-1])
            m = x.float().amax(0)  # (d_in,)
            out[key] = torch.maximum(out[key], m) if key in out else m
        return fn

    handles = [mod.register_forward_pre_hook(hook((i, site)))
               for i, la in enumerate(layers) for site, mod in _inputs(la).items()]
    try:
        for route in dict.fromkeys(routes):
            idx = [i for i, r in enumerate(routes) if r == route]
            with experts_for(route):
                for k in range(0, len(idx), batch_size):
                    b = enc.prompt_batch([samples[i] for i in idx[k:k + batch_size]])
                    mask[:] = [b.attention_mask]
                    model(b.input_ids, b.attention_mask, b.pixel_values, None, b.input_features)
    finally:
        for h in handles:
            h.remove()
    if len(out) != len(SITES) * len(layers):
        raise ValueError("calibration saw no activations: no prompts")
    return out


def _scale_columns(mod: Any, s: torch.Tensor) -> None:
    """``mod`` reads x / s: its weight's columns (and its experts' A columns) times s."""
    mod.weight.data *= s
    if getattr(mod, "n_lora", 0):
        mod.lora_a.data *= s


def _scale_rows(mod: Any, s: torch.Tensor) -> None:
    """``mod``'s outputs / s: weight rows, bias, experts' B rows."""
    mod.weight.data /= s[:, None]
    if mod.bias is not None:
        mod.bias.data /= s
    if getattr(mod, "n_lora", 0):
        mod.lora_b.data /= s[:, None]


def _factor(a: torch.Tensor, mods: Sequence[Any], alpha: float) -> torch.Tensor:
    w = torch.stack([m.weight.detach().abs().amax(0) for m in mods]).amax(0)  # (d_in,)
    s = a.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(MIN_SCALE, MAX_SCALE)


@torch.no_grad()
def smooth_layers(lm: Any, maxima: Mapping[tuple[int, str], torch.Tensor], alpha: float,
                  n_heads: int, kv_heads: int) -> None:
    """Migrate every layer's activation scales into its weights, in place (``lm``: the
    language model of an :class:`mole.onnx_graph.ExportParts`, GatedLinear projections)."""
    for i, la in enumerate(lm.layers):
        at, mlp = la.self_attn, la.mlp
        s = _factor(maxima[(i, "qkv")], (at.q_proj, at.k_proj, at.v_proj), alpha)
        la.input_layernorm.weight.data /= s
        for m in (at.q_proj, at.k_proj, at.v_proj):
            _scale_columns(m, s)
        s = _factor(maxima[(i, "gate_up")], (mlp.gate_proj, mlp.up_proj), alpha)
        la.post_attention_layernorm.weight.data /= s
        for m in (mlp.gate_proj, mlp.up_proj):
            _scale_columns(m, s)
        s = _factor(maxima[(i, "down")], (mlp.down_proj,), alpha)
        _scale_rows(mlp.up_proj, s)
        _scale_columns(mlp.down_proj, s)
        # o_proj's input channel h·hd + d comes from kv head h // rep: one s per kv channel
        rep = n_heads // kv_heads
        s = _factor(maxima[(i, "o")], (at.o_proj,), alpha)  # (H·hd,)
        s = s.view(kv_heads, rep, -1).amax(1)  # (kvh, hd)
        _scale_rows(at.v_proj, s.reshape(-1))
        _scale_columns(at.o_proj, s.repeat_interleave(rep, 0).reshape(-1))
