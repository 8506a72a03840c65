"""The exportable form of the global model: base + every task's experts + the routers, as the
field lays a VLM out for the edge (transformers.js / optimum ship SmolVLM this way).

``MoleModel`` + PEFT switches experts per *batch* (``set_adapter``) and groups samples by route;
an exported graph must take the expert choice as data. Every targeted ``nn.Linear`` becomes a
:class:`GatedLinear` holding the frozen base weight and the concatenated LoRA factors of all
experts attached to it, and a per-sample gate (B, E) — 1 for the routed task and its
co-activation partners, 0 elsewhere — selects them:

    y = W x + b + B_cat · ((A_cat x) ⊙ (gate · S))        A_cat (R, d_in), B_cat (d_out, R)

where R = Σ_e r_e and S (E, R) spreads expert e's gate over its r_e rank slots times its LoRA
scale α/r. With a one-hot-plus-partners gate this is exactly PEFT's sum of the active experts'
B·A·x; a batch may mix tasks freely.

The graphs (:data:`GRAPHS`; the runtime, :mod:`edge.ort_runtime`, glues them):

* ``vision_encoder`` — pixel_values (N, 3, H, W) + each image's gate (N, E) → the projected
  image features (N, P, d) that replace the image placeholders' embeddings;
* ``audio_encoder`` (bases with an audio tower) — log-mel (N, M, F) + gate → (N, Q, d);
* ``embed_tokens`` — input_ids (B, T) → inputs_embeds (B, T, d);
* ``decoder_model_merged`` — inputs_embeds (B, T, d), attention_mask (B, P+T), position_ids
  (B, T), gate (B, E) and the past KV cache ``past_key_values.{i}.key|value`` (B, kv_heads, P,
  head_dim) → logits of the last position (B, V), its final-norm hidden state (B, d) and the
  cache ``present.{i}.key|value`` (B, kv_heads, P+T, head_dim). Prefill (P = 0, T = the
  prompt) and decode (T = 1) are the same graph: its input is embeddings, so it needs neither
  towers nor dummy images, and every weight of the LM is stored once;
* ``router`` — the pooled features of mole.router, z = norm([w_v·norm(image_pool) |
  norm(text_state) | w_a·norm(audio_pool)]), → each task autoencoder's reconstruction error
  (B, K). ``image_pool`` is the max over a row's image features from the vision encoder with
  the gate off, ``text_state`` the decoder's final hidden state on the instruction alone with
  the gate off — mole.router's features, from the same graphs that answer.

Where this differs from the published layout, and why: the decoder returns the last position's
logits (B, V) — a (B, T, V) prefill output is 49 k floats a token for SmolLM2 and greedy
decoding reads one row — plus the hidden state the router needs; and every graph that holds a
targeted layer takes the per-sample ``gate``. optimum's exporters trace the stock HF classes,
which switch adapters per batch, not per sample: they cannot express the gate, so the graphs are
traced here with ``torch.onnx.export``. The language model's forward is written out (Llama /
Qwen2: RMSNorm, rotary positions, grouped KV heads, SiLU MLP) over the base's own modules,
because an explicit KV cache as graph inputs/outputs with left padding exports cleanly this way;
the towers run through transformers' own modules. tests/test_onnx_export.py checks logits and
answers against ``MoleModel`` with PEFT experts.

The decoder is written for few nodes, because a decode step (one token a row) of a small LM
costs onnxruntime mostly per-node overhead, not arithmetic: q/k/v and gate/up are one
projection each (:meth:`GatedLinear.concat`), rotary positions take one Gather, two Muls and
an Add a layer on the fused q|k|v (rotate_half's sign lives in the sin table), and
grouped-query attention views the query heads
as (kv_heads, rep·T) rows instead of repeating k and v. On the SmolLM2 base's decoder this took
onnxruntime's optimised graph from 2,276 to 1,523 nodes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mole.experts import ExpertModel
from mole.router import TaskRouter

NEG = -1e9  # additive mask: finite, so an all-masked (left-pad) query row stays NaN-free


class GateHolder:
    """The gate the next GatedLinear calls read: (N, E), N = that tower's batch."""

    value: torch.Tensor | None = None


class GatedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 experts: Sequence[tuple[int, torch.Tensor, torch.Tensor, float]], n_experts: int,
                 holder: GateHolder):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # (d_out, d_in)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.holder = holder
        self.n_lora = len(experts)
        self.lora_a: torch.Tensor
        self.lora_b: torch.Tensor
        self.select: torch.Tensor
        if experts:
            ranks = [a.shape[0] for _, a, _, _ in experts]
            sel = torch.zeros(n_experts, sum(ranks))
            off = 0
            for (e, _, _, scale), r in zip(experts, ranks, strict=True):
                sel[e, off: off + r] = scale
                off += r
            self.register_buffer("lora_a", torch.cat([a for _, a, _, _ in experts]).detach().clone())
            self.register_buffer("lora_b", torch.cat([b for _, _, b, _ in experts], 1).detach().clone())
            self.register_buffer("select", sel)  # (E, R)

    @classmethod
    def concat(cls, mods: Sequence[Any], holder: GateHolder) -> GatedLinear:
        """One GatedLinear computing ``torch.cat([m(x) for m in mods], -1)``: the base weights
        stacked along the output, the experts' A stacked along the rank, their B block-diagonal
        (zeros between projections), the select tables side by side; ``mods`` are GatedLinear
        or plain Linear (a module without experts). At decode (one token a row) a graph's time
        is mostly per-node overhead, so q/k/v in one MatMul (and one MatMulNBits when
        quantised) instead of three is the faster graph."""
        outs = [int(m.weight.shape[0]) for m in mods]
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(o)
                              for m, o in zip(mods, outs, strict=True)])
        fused = cls(torch.cat([m.weight for m in mods]), bias, [], 0, holder)
        with_lora = [m for m in mods if getattr(m, "n_lora", 0)]
        if not with_lora:
            return fused
        ranks = [int(m.lora_a.shape[0]) if getattr(m, "n_lora", 0) else 0 for m in mods]
        lora_b = mods[0].weight.new_zeros(sum(outs), sum(ranks))  # (Σ out, Σ R)
        row = col = 0
        for m, o, r in zip(mods, outs, ranks, strict=True):
            if r:
                lora_b[row: row + o, col: col + r] = m.lora_b
            row, col = row + o, col + r
        fused.n_lora = sum(int(m.n_lora) for m in with_lora)
        fused.register_buffer("lora_a", torch.cat([m.lora_a for m in with_lora]))
        fused.register_buffer("lora_b", lora_b)
        fused.register_buffer("select", torch.cat([m.select for m in with_lora], 1))  # (E, Σ R)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, d_in) → (N, T, d_out)
        y = F.linear(x, self.weight, self.bias)
        if not self.n_lora:
            return y
        assert self.holder.value is not None, "set the gate before calling the tower"
        g = self.holder.value @ self.select  # (N, R)
        h = F.linear(x, self.lora_a) * g.unsqueeze(1)  # (N, T, R)
        return y + F.linear(h, self.lora_b)


def _lora_parts(layer: Any, order: Mapping[str, int]
                ) -> tuple[nn.Linear, list[tuple[int, torch.Tensor, torch.Tensor, float]]]:
    """A PEFT LoRA layer → its base Linear and [(expert index, A (r, in), B (out, r), α/r)]."""
    base = layer.base_layer
    experts = []
    for name, a in layer.lora_A.items():
        if name not in order:
            raise ValueError(f"expert {name!r} is on the model but not in the export's task list "
                             f"{list(order)}")
        experts.append((order[name], a.weight, layer.lora_B[name].weight, float(layer.scaling[name])))
    return base, sorted(experts, key=lambda e: e[0])


def _gate_tower(module: nn.Module, order: Mapping[str, int], holder: GateHolder) -> Any:
    """A copy of ``module`` with every PEFT LoRA layer replaced by a GatedLinear."""
    out = copy.deepcopy(module)
    for name, sub in list(out.named_modules()):
        if hasattr(sub, "lora_A") and hasattr(sub, "base_layer"):
            base, experts = _lora_parts(sub, order)
            gl = GatedLinear(base.weight, base.bias, experts, len(order), holder)
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, gl)
    return out


GRAPHS = ("vision_encoder", "audio_encoder", "embed_tokens", "decoder_model_merged", "router")


@dataclass(frozen=True)
class GraphSpec:
    """What the runtime needs to feed the graphs (stored in the bundle manifest)."""

    tasks: tuple[str, ...]
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    image_token_id: int
    audio_token_id: int | None
    n_image_tokens: int
    n_audio_tokens: int
    image_size: int
    audio_shape: tuple[int, int] | None  # (mels, frames)

    def graphs(self, routed: bool = True) -> list[str]:
        """The graphs a bundle of this model holds (no audio encoder without an audio tower, no
        router before a task has one)."""
        return [g for g in GRAPHS if (g != "audio_encoder" or self.audio_token_id is not None)
                and (g != "router" or routed)]

    def cache_names(self, prefix: str) -> list[str]:
        """``prefix.{i}.key``, ``prefix.{i}.value`` per layer (past_key_values / present)."""
        return [f"{prefix}.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    def input_names(self, graph: str) -> list[str]:
        return {
            "vision_encoder": ["pixel_values", "gate"],
            "audio_encoder": ["input_features", "gate"],
            "embed_tokens": ["input_ids"],
            "decoder_model_merged": ["inputs_embeds", "attention_mask", "position_ids", "gate",
                                     *self.cache_names("past_key_values")],
            "router": ["image_pool", "text_state", "audio_pool"],
        }[graph]

    def output_names(self, graph: str) -> list[str]:
        return {
            "vision_encoder": ["image_features"],
            "audio_encoder": ["audio_features"],
            "embed_tokens": ["inputs_embeds"],
            "decoder_model_merged": ["logits", "last_hidden_state", *self.cache_names("present")],
            "router": ["route_errors"],
        }[graph]


class ExportParts:
    """Gated copies of the base's modules (one deep copy each), shared by the graphs traced
    from them; one :class:`GateHolder` carries the gate of whichever graph runs."""

    def __init__(self, experts: ExpertModel, tasks: Sequence[str], router: TaskRouter,
                 router_weights: Sequence[float]):
        model = experts.model
        order = {t: i for i, t in enumerate(tasks)}
        self.holder = GateHolder()
        llava = model.llava
        self.vision_tower: Any = _gate_tower(llava.model.vision_tower, order, self.holder)
        self.projector: Any = _gate_tower(llava.model.multi_modal_projector, order, self.holder)
        self.lm: Any = _gate_tower(llava.model.language_model, order, self.holder)
        self.lm_head: Any = copy.deepcopy(llava.lm_head)
        self.audio_tower: Any = (None if model.audio_tower is None
                                 else _gate_tower(model.audio_tower, order, self.holder))
        cfg = llava.config
        self.feature_layer = cfg.vision_feature_layer
        self.select_strategy = str(cfg.vision_feature_select_strategy)
        tc = cfg.text_config
        if set(router.tasks) - set(tasks):
            raise ValueError(f"router tasks {list(router.tasks)} are not all in {list(tasks)}")
        self.routed = [t for t in tasks if t in router.tasks]
        self.autoencoders = [router.tasks[t].autoencoder for t in self.routed]
        self.router_weights = [float(w) for w in router_weights]
        self.n_heads = int(tc.num_attention_heads)
        self.spec = GraphSpec(
            tasks=tuple(tasks), layers=len(self.lm.layers), kv_heads=int(tc.num_key_value_heads),
            head_dim=int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads),
            hidden=int(tc.hidden_size), vocab=int(tc.vocab_size),
            image_token_id=model.image_token_id, audio_token_id=model.audio_token_id,
            n_image_tokens=model.n_image_tokens, n_audio_tokens=model.n_audio_tokens,
            image_size=model.image_size,
            audio_shape=None if model.audio_tower is None
            else (model.audio_tower.n_mels, model.audio_tower.n_frames))

    def graph(self, name: str) -> nn.Module:
        """The module traced as graph ``name`` (one of :data:`GRAPHS`)."""
        if name == "vision_encoder":
            return VisionEncoder(self)
        if name == "audio_encoder":
            return AudioEncoder(self)
        if name == "embed_tokens":
            return EmbedTokens(self)
        if name == "decoder_model_merged":
            return Decoder(self)
        if name == "router":
            return RouterErrors(self.autoencoders, self.router_weights)
        raise ValueError(f"unknown graph {name!r}; graphs: {', '.join(GRAPHS)}")


class VisionEncoder(nn.Module):
    """pixel_values (N, 3, H, W), gate (N, E) of each image's row → image_features (N, P, d)."""

    def __init__(self, parts: ExportParts):
        super().__init__()
        self.vision_tower, self.projector = parts.vision_tower, parts.projector
        self.holder, self.feature_layer = parts.holder, parts.feature_layer
        self.drop_cls = parts.select_strategy == "default"
        self.eval()

    def forward(self, pixel_values: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # LlavaModel.get_image_features: the chosen hidden layer(s), the CLS token dropped under
        # the "default" strategy (LLaVA-1.5's CLIP), concatenated when several layers are chosen.
        self.holder.value = gate
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        layers = (self.feature_layer if isinstance(self.feature_layer, list | tuple)
                  else [self.feature_layer])
        hs = [out.hidden_states[i][:, 1:] if self.drop_cls else out.hidden_states[i]
              for i in layers]  # each (N, P, d_v)
        return self.projector(torch.cat(hs, dim=-1))  # type: ignore[no-any-return]


class AudioEncoder(nn.Module):
    """input_features (N, M, F), gate (N, E) → audio_features (N, Q, d)."""

    def __init__(self, parts: ExportParts):
        super().__init__()
        self.audio_tower, self.holder = parts.audio_tower, parts.holder
        self.n_tokens = parts.spec.n_audio_tokens
        self.eval()

    def forward(self, input_features: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        self.holder.value = gate
        return self.audio_tower(input_features).reshape(  # type: ignore[no-any-return]
            input_features.shape[0], self.n_tokens, -1)


class EmbedTokens(nn.Module):
    """input_ids (B, T) → inputs_embeds (B, T, d)."""

    def __init__(self, parts: ExportParts):
        super().__init__()
        self.embed_tokens = parts.lm.embed_tokens
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # type: ignore[no-any-return]


class Decoder(nn.Module):
    """forward(inputs_embeds (B,T,d), attention_mask (B,P+T), position_ids (B,T), gate (B,E),
    past k/v (B,kvh,P,hd) × 2·layers) → logits (B,V) and final-norm hidden state (B,d) of the
    last position, present k/v (B,kvh,P+T,hd) × 2·layers. Prefill is P = 0."""

    def __init__(self, parts: ExportParts):
        super().__init__()
        self.lm, self.lm_head, self.holder = parts.lm, parts.lm_head, parts.holder
        spec = parts.spec
        self.n_heads, self.kv_heads, self.head_dim = parts.n_heads, spec.kv_heads, spec.head_dim
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", self.lm.rotary_emb.inv_freq.detach().clone())
        self.rope_scale = float(getattr(self.lm.rotary_emb, "attention_scaling", 1.0))
        # q/k/v and gate/up each as one projection (GatedLinear.concat says why).
        self.qkv = nn.ModuleList([GatedLinear.concat([la.self_attn.q_proj, la.self_attn.k_proj,
                                                      la.self_attn.v_proj], self.holder)
                                  for la in self.lm.layers])
        self.gate_up = nn.ModuleList([GatedLinear.concat([la.mlp.gate_proj, la.mlp.up_proj],
                                                         self.holder)
                                      for la in self.lm.layers])
        # Rotary positions on the fused q|k|v channels at once: rotate_half(x)·sin =
        # x[..., swap]·(±sin), one Gather, the sign in the sin table; the v channels pass with
        # cos 1, sin 0 (tables made once a forward, not a layer).
        half, hd = self.head_dim // 2, self.head_dim
        one = torch.cat([torch.arange(half, hd), torch.arange(half)])  # (hd,) halves exchanged
        rotated = self.n_heads + self.kv_heads  # q and k heads
        self.swap: torch.Tensor  # ((H + 2·kvh)·hd,)
        self.register_buffer("swap", torch.cat(
            [one + j * hd for j in range(rotated)]
            + [torch.arange(rotated * hd, (rotated + self.kv_heads) * hd)]))
        self.eval()

    @staticmethod
    def _rms(norm: Any, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, gate: torch.Tensor, *past: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        embed = inputs_embeds
        b, t = embed.shape[0], embed.shape[1]
        self.holder.value = gate
        # Rotary tables for the new positions over the q|k|v channels: (B, T, (H + 2·kvh)·hd).
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
        half, rotated = self.head_dim // 2, self.n_heads + self.kv_heads
        sign = torch.cat([-torch.ones(half), torch.ones(half)])  # rotate_half's sign, (hd,)
        cos = emb.cos() * self.rope_scale
        sin = emb.sin() * self.rope_scale * sign
        cos = torch.cat([cos.repeat(1, 1, rotated), torch.ones_like(cos).repeat(1, 1, self.kv_heads)], -1)
        sin = torch.cat([sin.repeat(1, 1, rotated), torch.zeros_like(sin).repeat(1, 1, self.kv_heads)], -1)
        p = past[0].shape[2]
        s = attention_mask.shape[1]  # = P + T
        q_pos = torch.arange(t, device=embed.device) + p  # (T,)
        k_pos = torch.arange(s, device=embed.device)  # (S,)
        allowed = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).unsqueeze(0).unsqueeze(0) \
            & attention_mask.bool().unsqueeze(1).unsqueeze(1)  # (B, 1, T, S)
        bias = torch.where(allowed, torch.zeros((), dtype=embed.dtype),
                           torch.full((), NEG, dtype=embed.dtype))
        rep = self.n_heads // self.kv_heads
        bias = bias.repeat(1, 1, rep, 1)  # (B, 1, rep·T, S): the grouped queries' rows
        h = embed
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            x = self._rms(layer.input_layernorm, h)
            qkv = self.qkv[i](x)  # (B, T, (H + 2·kvh)·hd)
            qkv = qkv * cos + qkv.index_select(-1, self.swap) * sin
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.kv_heads * self.head_dim,
                                 self.kv_heads * self.head_dim], dim=-1)
            q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, kvh, P+T, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            # Grouped query attention without repeating k/v: query heads g·rep … g·rep+rep−1
            # share kv head g, so q (B, H, T, hd) is viewed as (B, kvh, rep·T, hd).
            qg = q.reshape(b, self.kv_heads, rep * t, self.head_dim)
            scores = qg @ k.transpose(-1, -2) * (self.head_dim ** -0.5) + bias  # (B, kvh, rep·T, S)
            ctx = (torch.softmax(scores, dim=-1) @ v).view(b, self.n_heads, t, self.head_dim)
            h = h + attn.o_proj(ctx.transpose(1, 2).reshape(b, t, -1))
            x = self._rms(layer.post_attention_layernorm, h)
            mlp = layer.mlp
            g, u = self.gate_up[i](x).chunk(2, dim=-1)  # (B, T, ffn) each
            h = h + mlp.down_proj(mlp.act_fn(g) * u)
        last = self._rms(self.lm.norm, h)[:, -1]  # (B, d)
        return (self.lm_head(last), last, *presents)  # logits (B, V)


class RouterErrors(nn.Module):
    """(image_pool, text_state, audio_pool) (B, d) each → router features z (B, 3d) as in
    mole.router → each task autoencoder's reconstruction error (B, K)."""

    def __init__(self, aes: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.aes = nn.ModuleList([copy.deepcopy(ae) for ae in aes])
        self.weights = [float(w) for w in weights]
        self.eval()

    def forward(self, image_pool: torch.Tensor, text_state: torch.Tensor,
                audio_pool: torch.Tensor) -> torch.Tensor:
        # a base without audio feeds a zero block, as mole.router does
        blocks = [image_pool, text_state, audio_pool]
        z = F.normalize(torch.cat([w * F.normalize(x, dim=1)
                                   for w, x in zip(self.weights, blocks, strict=True)], 1), dim=1)
        # Written out as MatMul + Add (not Gemm), so a weight-only quantiser sees it too.
        errs = []
        for ae in self.aes:
            a: Any = ae
            enc, dec = a.encoder[0], a.decoder[0]
            h = torch.relu(z @ enc.weight.t() + enc.bias)  # (B, hidden)
            recon = 2.0 * torch.sigmoid(h @ dec.weight.t() + dec.bias) - 1.0  # (B, D)
            errs.append(((recon - z) ** 2).mean(dim=1))
        return torch.stack(errs, dim=1)
