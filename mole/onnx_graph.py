"""The exportable form of the global model: base + every task's experts + the routers, one graph.

``MoleModel`` + PEFT switches experts per *batch* (``set_adapter``) and groups samples by route;
an exported graph must take the expert choice as data. Every targeted ``nn.Linear`` becomes a
:class:`GatedLinear` holding the frozen base weight and the concatenated LoRA factors of all
experts attached to it, and a per-sample gate (B, E) — 1 for the routed task and its
co-activation partners, 0 elsewhere — selects them:

    y = W x + b + B_cat · ((A_cat x) ⊙ (gate · S))        A_cat (R, d_in), B_cat (d_out, R)

where R = Σ_e r_e and S (E, R) spreads expert e's gate over its r_e rank slots times its LoRA
scale α/r. With a one-hot-plus-partners gate this is exactly PEFT's sum of the active experts'
B·A·x; a batch may mix tasks freely.

The module exports as two graphs (``decoder_only``) serving three calls of the runtime
(:mod:`edge.ort_runtime`):

* **routing** (full graph) — the instruction text alone (placeholders dropped, gate 0, no past)
  plus the sample's image/audio: ``route_errors`` (B, K) are each task autoencoder's
  reconstruction error of the router features z = norm([w_v·norm(max_P vision) |
  norm(h_LM(<sep>)) | w_a·norm(max_Q audio)]) — mole.router's features, computed in the graph
  with experts off.
* **prefill** (full graph) — the full prompt with the routed gate; returns the last position's
  logits and the KV cache ``present.*`` (B, kv_heads, T, head_dim) per layer.
* **decode** (decoder graph: no towers, no routers) — one new token per row (B, 1) with the
  past KV cache: the prefix is never recomputed. A separate graph because a tower cannot run on
  zero images (reshapes with −1 over 0 elements fail in torch and in onnxruntime), and a dummy
  image per step would cost more than the step itself at batch 1.

A batch with no image (or no audio) at all passes one zero dummy whose row index no sample
points at.

The language model's forward is written out here (Qwen2: RMSNorm, rotary positions, grouped
KV heads, SiLU MLP) over the base's own modules, because an explicit KV cache as graph
inputs/outputs with left padding exports cleanly this way; the vision and audio towers run
through transformers' own modules. tests/test_onnx_export.py checks logits and answers against
``MoleModel`` with PEFT experts.
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


@dataclass(frozen=True)
class GraphSpec:
    """What the runtime needs to feed the graph (stored in the bundle manifest)."""

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

    def input_names(self, decoder: bool = False) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids", "gate"]
        if not decoder:
            names += ["pixel_values", "image_row"]
            if self.audio_token_id is not None:
                names += ["input_features", "audio_row"]
        for i in range(self.layers):
            names += [f"past.{i}.key", f"past.{i}.value"]
        return names

    def output_names(self, decoder: bool = False) -> list[str]:
        names = ["logits"] if decoder else ["logits", "route_errors"]
        for i in range(self.layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names


class ExportGraph(nn.Module):
    """forward(input_ids (B,T), attention_mask (B,P+T), position_ids (B,T), gate (B,E),
    pixel_values (Ni,3,H,W), image_row (B,) [, input_features (Na,M,F), audio_row (B,)],
    past k/v (B,kvh,P,hd) × 2·layers) → logits (B,V) of the last position, route_errors (B,K),
    present k/v (B,kvh,P+T,hd) × 2·layers.  ``image_row[b]`` = 1 + the index of row b's image
    in pixel_values, 0 for a row without one (same for audio)."""

    def __init__(self, experts: ExpertModel, tasks: Sequence[str], router: TaskRouter,
                 router_weights: Sequence[float], decoder_only: bool = False):
        super().__init__()
        self.decoder_only = decoder_only
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
        tc = cfg.text_config
        self.n_heads = int(tc.num_attention_heads)
        self.kv_heads = int(tc.num_key_value_heads)
        self.head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", self.lm.rotary_emb.inv_freq.detach().clone())
        self.rope_scale = float(getattr(self.lm.rotary_emb, "attention_scaling", 1.0))
        if set(router.tasks) - set(tasks):
            raise ValueError(f"router tasks {list(router.tasks)} are not all in {list(tasks)}")
        self.routed = [t for t in tasks if t in router.tasks]
        self.router = RouterErrors([router.tasks[t].autoencoder for t in self.routed])
        self.router_weights = [float(w) for w in router_weights]
        self.spec = GraphSpec(
            tasks=tuple(tasks), layers=len(self.lm.layers), kv_heads=self.kv_heads,
            head_dim=self.head_dim, hidden=int(tc.hidden_size), vocab=int(tc.vocab_size),
            image_token_id=model.image_token_id, audio_token_id=model.audio_token_id,
            n_image_tokens=model.n_image_tokens, n_audio_tokens=model.n_audio_tokens,
            image_size=model.image_size,
            audio_shape=None if model.audio_tower is None
            else (model.audio_tower.n_mels, model.audio_tower.n_frames))
        if decoder_only:  # the decode step needs no towers and no routers
            self.vision_tower = self.projector = self.audio_tower = None
            self.router = RouterErrors([])
        self.eval()

    # -- perception ------------------------------------------------------------------------

    def _vision(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (Ni,3,H,W) → (Ni,P,d)
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]  # "full": every patch, no CLS to drop
        return self.projector(feats)

    @staticmethod
    def _place(tok: torch.Tensor, slots: torch.Tensor, feats: torch.Tensor, rows: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter per-row media features into their placeholder slots.

        tok (B,T,d), slots (B,T) bool, feats (N,P,d), rows (B,) in 0..N → embeds (B,T,d) and the
        per-row max-pool (B,d) (zeros for rows without media: index 0 is a zero block)."""
        padded = torch.cat([feats.new_zeros(1, feats.shape[1], feats.shape[2]), feats])
        per_row = padded.index_select(0, rows)  # (B, P, d)
        k = (torch.cumsum(slots.long(), dim=1) - 1).clamp(0, per_row.shape[1] - 1)  # (B, T)
        gathered = torch.gather(per_row, 1, k.unsqueeze(-1).expand(-1, -1, per_row.shape[-1]))
        return torch.where(slots.unsqueeze(-1), gathered, tok), per_row.amax(dim=1)

    # -- language model --------------------------------------------------------------------

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    @staticmethod
    def _rms(norm: Any, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, gate: torch.Tensor, *rest: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        if self.decoder_only:
            embed = self.lm.embed_tokens(input_ids)  # (B, T, d)
            return self._lm(embed, attention_mask, position_ids, gate, rest)[0]
        pixel_values, image_row = rest[0], rest[1]
        input_features: torch.Tensor | None = None
        audio_row: torch.Tensor | None = None
        past = rest[2:]
        if self.audio_tower is not None:
            input_features, audio_row, past = rest[2], rest[3], rest[4:]
        b = input_ids.shape[0]
        embed = self.lm.embed_tokens(input_ids)  # (B, T, d)
        # Each tower reads the gate of its own batch: the rows its inputs belong to.
        self.holder.value = torch.cat([gate.new_zeros(1, gate.shape[1]), gate]).index_select(
            0, _inverse_rows(image_row, pixel_values.shape[0]))
        img = self._vision(pixel_values)  # (Ni, P, d)
        embed, vis_pool = self._place(embed, torch.eq(input_ids, self.spec.image_token_id), img,
                                       image_row)
        aud_pool = embed.new_zeros(b, embed.shape[-1])
        if self.audio_tower is not None:
            assert input_features is not None and audio_row is not None
            self.holder.value = torch.cat([gate.new_zeros(1, gate.shape[1]), gate]).index_select(
                0, _inverse_rows(audio_row, input_features.shape[0]))
            n_tok = self.spec.n_audio_tokens
            aud = self.audio_tower(input_features).reshape(input_features.shape[0], n_tok, -1)
            embed, aud_pool = self._place(embed, torch.eq(input_ids, int(self.spec.audio_token_id or 0)), aud,
                                          audio_row)
        outs, last = self._lm(embed, attention_mask, position_ids, gate, past)
        return (outs[0], self._route_errors(vis_pool, last, aud_pool), *outs[1:])

    def _lm(self, embed: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            gate: torch.Tensor, past: Sequence[torch.Tensor]
            ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The language model over embeddings (B, T, d) with the past cache → ((logits (B, V),
        *present), last hidden state (B, d))."""
        b, t = embed.shape[0], embed.shape[1]
        self.holder.value = gate
        # Rotary tables for the new positions: (B, 1, T, hd).
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scale).unsqueeze(1)
        sin = (emb.sin() * self.rope_scale).unsqueeze(1)
        p = past[0].shape[2]
        s = attention_mask.shape[1]  # = P + T
        q_pos = torch.arange(t, device=embed.device) + p  # (T,)
        k_pos = torch.arange(s, device=embed.device)  # (S,)
        allowed = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).unsqueeze(0).unsqueeze(0) \
            & attention_mask.bool().unsqueeze(1).unsqueeze(1)  # (B, 1, T, S)
        bias = torch.where(allowed, torch.zeros((), dtype=embed.dtype),
                           torch.full((), NEG, dtype=embed.dtype))
        h = embed
        presents: list[torch.Tensor] = []
        rep = self.n_heads // self.kv_heads
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            x = self._rms(layer.input_layernorm, h)
            q = attn.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, kvh, P+T, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            kk = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
            vv = v.repeat_interleave(rep, dim=1)
            scores = q @ kk.transpose(-1, -2) * (self.head_dim ** -0.5) + bias  # (B, H, T, S)
            ctx = torch.softmax(scores, dim=-1) @ vv  # (B, H, T, hd)
            h = h + attn.o_proj(ctx.transpose(1, 2).reshape(b, t, -1))
            x = self._rms(layer.post_attention_layernorm, h)
            mlp = layer.mlp
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        last = self._rms(self.lm.norm, h)[:, -1]  # (B, d)
        return (self.lm_head(last), *presents), last  # logits (B, V)

    def _route_errors(self, vis: torch.Tensor, text: torch.Tensor, aud: torch.Tensor
                      ) -> torch.Tensor:
        """(B, K): mole.router's reconstruction errors (meaningful on the routing call)."""
        blocks = [vis, text, aud]  # a base without audio has a zero block, as in mole.router
        w = self.router_weights
        z = F.normalize(torch.cat([wi * F.normalize(x, dim=1) for wi, x in zip(w, blocks, strict=True)],
                                  1), dim=1)
        return self.router(z)


class RouterErrors(nn.Module):
    """The task autoencoders on router features z (B, D) → errors (B, K); a module of its own
    so its nodes are named ``/router/…`` in the graph (the quantiser can tell them apart)."""

    def __init__(self, aes: Sequence[nn.Module]):
        super().__init__()
        self.aes = nn.ModuleList([copy.deepcopy(ae) for ae in aes])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not len(self.aes):
            return z.new_zeros(z.shape[0], 0)
        # Written out as MatMul + Add (not Gemm), so a weight-only quantiser sees it too.
        errs = []
        for ae in self.aes:
            a: Any = ae
            enc, dec = a.encoder[0], a.decoder[0]
            h = torch.relu(z @ enc.weight.t() + enc.bias)  # (B, hidden)
            recon = 2.0 * torch.sigmoid(h @ dec.weight.t() + dec.bias) - 1.0  # (B, D)
            errs.append(((recon - z) ** 2).mean(dim=1))
        return torch.stack(errs, dim=1)


def _inverse_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """row index (B,) of media 1..n → for each media item its row + 1, i.e. (n,) with the
    position of media k in ``rows`` shifted by one (the gate table has a zero row first)."""
    b = rows.shape[0]
    idx = torch.arange(1, b + 1, device=rows.device)  # (B,)
    # media k (1-based) sits in the row whose rows[·] == k: a (n, B) match, argmax per item.
    match = rows.unsqueeze(0) == torch.arange(1, n + 1, device=rows.device).unsqueeze(1)
    return (match.long() * idx.unsqueeze(0)).sum(dim=1)  # (n,)
