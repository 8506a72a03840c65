"""Answering with a bundle in onnxruntime: per-sample routing, then greedy decoding with a KV cache.

A bundle holds the field's edge layout (mole.onnx_graph): ``vision_encoder`` (+ ``audio_encoder``),
``embed_tokens``, ``decoder_model_merged`` and the ``router``; the manifest's ``extra.graphs``
names each precision's file of each graph. One call of :meth:`OrtModel.answer` on B samples
(any mix of tasks and modalities) runs:

1. **routing** — the encoders with the gate off give each row's pooled image/audio features;
   the decoder on the instruction alone (placeholders dropped, gate off) gives its final hidden
   state; the router graph turns them into ``route_errors`` (B, K). Each sample goes to the
   lowest-error task under its τ (manifest thresholds), or to the base model when none claims
   it — mole.router's rule, per sample.
2. **prefill** — the encoders again with each item's routed gate (the experts sit in the towers
   too), their features written into the placeholders' embeddings (in order: the i-th image's
   P features fill the i-th run of P image tokens, as LLaVA's ``masked_scatter``), and the
   decoder on the whole prompt with gate (B, E) = the routed task and its co-activation
   partners → the last position's logits and the KV cache.
3. **decode** — one token per row per step through ``embed_tokens`` and the same decoder with
   the cache, until every row has emitted <eos> or ``max_new_tokens``.

Preprocessing uses the bundle's own files: the project's tokenizer (and Whisper feature
extractor) for the own base, the checkpoint's processor and chat template for a checkpoint base
(``processor/``), so a sample is encoded exactly as in training and a wrong image shape, an
empty instruction or an over-long clip is refused with the same message. Sessions are safe to
call from many threads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer, WhisperFeatureExtractor

from mole.batching import AudioFeatures, Encoder
from mole.export import DECODER, PRECISIONS, PROCESSOR_DIR, TOKENIZER_DIR
from mole.onnx_graph import GraphSpec
from mole.tokenizer import ensure_special_tokens
from protocol.manifest import Sample


@dataclass(frozen=True)
class Answer:
    answer: str
    route: str | None  # the task whose experts answered; None = the base model


def graph_spec(d: Mapping[str, Any]) -> GraphSpec:
    d = dict(d)
    d["tasks"] = tuple(d["tasks"])
    d["audio_shape"] = None if d.get("audio_shape") is None else tuple(d["audio_shape"])
    return GraphSpec(**d)


def session_options(threads: int = 0) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads  # 0 → onnxruntime's default (one per core)
    so.inter_op_num_threads = 1
    return so


def providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU (never required)."""
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OrtModel:
    def __init__(self, folder: Path, precision: str = "int8", threads: int = 0):
        self.folder = Path(folder)
        man = json.loads((self.folder / "manifest.json").read_text())
        self.manifest = man
        extra = man["extra"]
        if "graphs" not in extra:
            raise ValueError(f"bundle {str(folder)!r} has the layout before the field's edge "
                             "layout (model.onnx + decoder.onnx); export the run again with "
                             "`fedmole export --run RUN --out DIR`")
        if precision not in extra["graphs"]:
            raise ValueError(f"precision {precision!r}: bundle {str(folder)!r} holds "
                             f"{', '.join(extra['graphs'])} (any of {', '.join(PRECISIONS)})")
        self.precision = precision
        self.spec = spec = graph_spec(extra["graph"])
        self.tasks = list(spec.tasks)
        self.routed = [t for t in self.tasks if t in man["thresholds"]]
        self.taus = np.array([float(man["thresholds"][t]) for t in self.routed], dtype=np.float64)
        self.partners = {t: list(p) for t, p in man.get("partners", {}).items()}
        self.router_weights = [float(w) for w in extra["router_weights"]]
        self.max_new_tokens = int(extra["max_new_tokens"])
        self.eos = int(extra["eos_token_id"])
        self.pad = int(extra["pad_token_id"])
        so = session_options(threads)
        self.sessions = {g: ort.InferenceSession(str(self.folder / f), so, providers=providers())
                         for g, f in extra["graphs"][precision].items()}
        self.enc = _encoder(self.folder, extra, spec)
        self.placeholders = [spec.image_token_id] + (
            [spec.audio_token_id] if spec.audio_token_id is not None else [])
        self.past_names = spec.cache_names("past_key_values")

    @property
    def audio(self) -> AudioFeatures | None:
        """The Whisper features of a base with an audio tower (None for the others)."""
        return getattr(self.enc, "audio", None)

    @property
    def resizes_images(self) -> bool:
        """True when the bundle's own image processor takes images of any size."""
        return bool(self.manifest["extra"].get("encoder") == "chat")

    # -- graphs -----------------------------------------------------------------------------

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[graph].run(None, feeds)  # type: ignore[no-any-return]

    def _empty_past(self, b: int) -> dict[str, np.ndarray]:
        s = self.spec
        z = np.zeros((b, s.kv_heads, 0, s.head_dim), dtype=np.float32)
        return {name: z for name in self.past_names}

    def decoder(self, embeds: np.ndarray, mask: np.ndarray, pos: np.ndarray, gate: np.ndarray,
                past: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """→ [logits (B, V), last hidden state (B, d), present k/v …] (``past`` None: prefill)."""
        feeds = (self._empty_past(embeds.shape[0]) if past is None
                 else dict(zip(self.past_names, past, strict=True)))
        return self._run(DECODER, {"inputs_embeds": embeds, "attention_mask": mask,
                                   "position_ids": pos, "gate": gate, **feeds})

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._run("embed_tokens", {"input_ids": ids.astype(np.int64)})[0]

    def _media(self, ids: np.ndarray, items: np.ndarray | None, token: int | None, graph: str,
               gate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Encode the batch's images (or clips) with each one's row gate → (features (N, P, d)
        in slot order, slots (B, T) bool, the row of each item (N,)); None when it has none."""
        if token is None or items is None or items.shape[0] == 0:
            return None
        slots = ids == token
        per_item = int(slots.sum()) // items.shape[0]
        if per_item * items.shape[0] != int(slots.sum()):
            raise ValueError(f"{items.shape[0]} media items for {int(slots.sum())} placeholders "
                             "in the batch: the encoder and the graph disagree")
        rows = np.nonzero(slots)[0][::per_item]  # row of each item, in order
        feats = self._run(graph, {"pixel_values" if graph == "vision_encoder" else
                                  "input_features": np.ascontiguousarray(items, np.float32),
                                  "gate": np.ascontiguousarray(gate[rows])})[0]
        return feats, slots, rows

    @staticmethod
    def _pool(media: tuple[np.ndarray, np.ndarray, np.ndarray] | None, b: int, d: int
              ) -> np.ndarray:
        """(B, d): the max over each row's media features (zeros for a row without)."""
        out = np.zeros((b, d), dtype=np.float32)
        if media is None:
            return out
        feats, _, rows = media
        for r in np.unique(rows):
            out[r] = feats[rows == r].max(axis=(0, 1))
        return out

    def _gate(self, routes: Sequence[str | None]) -> np.ndarray:
        gate = np.zeros((len(routes), len(self.tasks)), dtype=np.float32)
        for i, r in enumerate(routes):
            if r is not None:
                for t in (r, *self.partners.get(r, [])):
                    gate[i, self.tasks.index(t)] = 1.0
        return gate

    def route(self, errors: np.ndarray) -> list[str | None]:
        """(B, K) errors → per sample the lowest-error task under its τ (earlier task on ties)."""
        if errors.shape[1] == 0:
            return [None] * errors.shape[0]
        masked = np.where(errors < self.taus, errors, np.inf)
        best = masked.argmin(axis=1)
        return [self.routed[k] if np.isfinite(masked[i, k]) else None for i, k in enumerate(best)]

    # -- answering --------------------------------------------------------------------------

    def _encode_media(self, ids: np.ndarray, batch: Any, gate: np.ndarray) -> list[Any]:
        s = self.spec
        pix = None if batch.pixel_values is None else batch.pixel_values.numpy()
        out = [self._media(ids, pix, s.image_token_id, "vision_encoder", gate)]
        if s.audio_token_id is not None:
            feats = None if batch.input_features is None else batch.input_features.numpy()
            out.append(self._media(ids, feats, s.audio_token_id, "audio_encoder", gate))
        return out

    def route_errors(self, batch: Any) -> np.ndarray:
        """(B, K): each routed task's autoencoder error on the samples' router features."""
        ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
        b, d = ids.shape[0], self.spec.hidden
        if not self.routed:
            return np.zeros((b, 0))
        off = np.zeros((b, len(self.tasks)), dtype=np.float32)
        media = self._encode_media(ids, batch, off)
        t_ids, t_mask = text_only(ids, mask, self.placeholders, self.pad)
        text = self.decoder(self.embed(t_ids), t_mask, positions(t_mask), off)[1]
        pools = [self._pool(m, b, d) for m in media] + [np.zeros((b, d), np.float32)]
        return self._run("router", {"image_pool": pools[0], "text_state": text,
                                    "audio_pool": pools[1]})[0]

    def prefill(self, batch: Any, gate: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """The prompts with their media under ``gate`` → (decoder outputs, positions)."""
        ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
        embeds = self.embed(ids)  # (B, T, d)
        for m in self._encode_media(ids, batch, gate):
            if m is not None:
                feats, slots, _ = m
                embeds[slots] = feats.reshape(-1, feats.shape[-1])  # item order = slot order
        pos = positions(mask)
        return self.decoder(embeds, mask, pos, gate), pos

    def greedy(self, out: list[np.ndarray], pos: np.ndarray, mask: np.ndarray, gate: np.ndarray,
               n_new: int, stop_at_eos: bool = True) -> list[np.ndarray]:
        """Greedy tokens (B,) per step after a prefill's outputs ``out`` at positions ``pos``;
        the KV cache grows one token a step. ``stop_at_eos`` False: all ``n_new`` steps (the
        bench's fixed-length decode)."""
        b = mask.shape[0]
        logits, cache = out[0], out[2:]
        next_pos = pos[:, -1:] + 1  # (B, 1)
        done = np.zeros(b, dtype=bool)
        generated: list[np.ndarray] = []
        for step in range(n_new):
            nxt = logits.argmax(-1)
            if stop_at_eos:
                nxt = np.where(done, self.pad, nxt)
                done |= nxt == self.eos
            generated.append(nxt)
            if done.all() or step == n_new - 1:
                break
            mask = np.concatenate([mask, np.ones((b, 1), dtype=mask.dtype)], axis=1)
            out = self.decoder(self.embed(nxt[:, None]), mask, next_pos, gate, cache)
            logits, cache = out[0], out[2:]
            next_pos = next_pos + 1
        return generated

    def answer(self, samples: Sequence[Sample], max_new_tokens: int | None = None,
               routes: Sequence[str | None] | None = None) -> list[Answer]:
        """Greedy answers in sample order (``routes`` given → skip the router, e.g. an oracle)."""
        if not samples:
            return []
        n_new = max_new_tokens or self.max_new_tokens
        batch = self.enc.prompt_batch(samples)
        mask = batch.attention_mask.numpy()
        if routes is None:
            routes = self.route(self.route_errors(batch))
        gate = self._gate(routes)
        out, pos = self.prefill(batch, gate)
        generated = self.greedy(out, pos, mask, gate, n_new)
        rows = np.stack(generated, axis=1).tolist()  # (B, n)
        return [Answer(self.enc.decode(r[: r.index(self.eos)] if self.eos in r else r), route)
                for r, route in zip(rows, routes, strict=True)]


def _encoder(folder: Path, extra: Mapping[str, Any], spec: GraphSpec) -> Any:
    """The bundle's own preprocessing: the checkpoint's processor and chat template, or the
    project's tokenizer (+ Whisper feature extractor) for its own base."""
    if extra.get("encoder") == "chat":
        from transformers import AutoProcessor

        from mole.families.llava import chat_encoder

        if extra.get("family") != "llava":
            raise ValueError(f"bundle {str(folder)!r} is of family {extra.get('family')!r}; the "
                             "edge runtime serves LLaVA-layout bases")
        proc = AutoProcessor.from_pretrained(str(folder / PROCESSOR_DIR), local_files_only=True)
        return chat_encoder(proc, int(extra["max_length"]))
    tok = ensure_special_tokens(AutoTokenizer.from_pretrained(
        str(folder / TOKENIZER_DIR), local_files_only=True))
    audio = None
    if spec.audio_token_id is not None:
        # Requests carry fresh ids: a small memo is enough (it is keyed by (task, id)).
        audio = AudioFeatures(WhisperFeatureExtractor.from_pretrained(
            str(folder / PROCESSOR_DIR), local_files_only=True), max_items=1024)
    return Encoder(tok, spec.n_image_tokens, spec.image_size, int(extra["max_length"]),
                   audio, spec.n_audio_tokens)


def positions(mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding: (B, T) → (B, T), 0 at each row's first real token."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def text_only(ids: np.ndarray, mask: np.ndarray, placeholders: Sequence[int], pad: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts (B, T) → the same prompts without media placeholders (B, T')."""
    keep = mask.astype(bool) & ~np.isin(ids, placeholders)
    lengths = keep.sum(axis=1)
    t = int(lengths.max())
    out = np.full((ids.shape[0], t), pad, dtype=np.int64)
    out_mask = np.zeros((ids.shape[0], t), dtype=np.int64)
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        out[i, t - n:] = ids[i][keep[i]]
        out_mask[i, t - n:] = 1
    return out, out_mask
