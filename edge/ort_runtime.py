"""Answering with a bundle in onnxruntime: per-sample routing, then greedy decoding with a KV cache.

One call of :meth:`OrtModel.answer` on B samples (any mix of tasks and modalities) runs:

1. **routing** — the full graph on the instructions alone (image/audio placeholders dropped, gate
   0, empty past) with the samples' media → ``route_errors`` (B, K); each sample goes to the
   lowest-error task under its τ (manifest thresholds), or to the base model when none claims
   it — mole.router's rule, per sample.
2. **prefill** — the full graph on the whole prompts with gate (B, E) = the routed task and its
   co-activation partners → logits of the last position and the KV cache.
3. **decode** — the decoder graph, one token per row per step, until every row has emitted
   <eos> or ``max_new_tokens``: the prefix is never recomputed.

Tokenisation and audio features use the bundle's own tokenizer and Whisper feature extractor
through mole.batching.Encoder, so a wrong image shape, an empty instruction or an over-long clip
is refused with the same message as in training. Sessions are safe to call from many threads.
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
from mole.export import DEC_FP32, DEC_INT8, FP32, INT8, PROCESSOR_DIR, TOKENIZER_DIR
from mole.onnx_graph import GraphSpec
from mole.tokenizer import ensure_special_tokens
from protocol.manifest import Sample

PRECISIONS = ("int8", "fp32")


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
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.folder = Path(folder)
        self.precision = precision
        man = json.loads((self.folder / "manifest.json").read_text())
        self.manifest = man
        extra = man["extra"]
        self.spec = spec = graph_spec(extra["graph"])
        self.tasks = list(spec.tasks)
        self.routed = [t for t in self.tasks if t in man["thresholds"]]
        self.taus = np.array([float(man["thresholds"][t]) for t in self.routed], dtype=np.float64)
        self.partners = {t: list(p) for t, p in man.get("partners", {}).items()}
        self.max_new_tokens = int(extra["max_new_tokens"])
        self.eos = int(extra["eos_token_id"])
        self.pad = int(extra["pad_token_id"])
        so = session_options(threads)
        full, dec = (INT8, DEC_INT8) if precision == "int8" else (FP32, DEC_FP32)
        self.full = ort.InferenceSession(str(self.folder / full), so, providers=providers())
        self.decoder = ort.InferenceSession(str(self.folder / dec), so, providers=providers())
        tok = ensure_special_tokens(AutoTokenizer.from_pretrained(
            str(self.folder / TOKENIZER_DIR), local_files_only=True))
        audio = None
        if spec.audio_token_id is not None:
            # Requests carry fresh ids: a small memo is enough (it is keyed by (task, id)).
            audio = AudioFeatures(WhisperFeatureExtractor.from_pretrained(
                str(self.folder / PROCESSOR_DIR), local_files_only=True), max_items=1024)
        self.enc = Encoder(tok, spec.n_image_tokens, spec.image_size, int(extra["max_length"]),
                           audio, spec.n_audio_tokens)
        self.placeholders = [spec.image_token_id] + (
            [spec.audio_token_id] if spec.audio_token_id is not None else [])

    # -- feeds ------------------------------------------------------------------------------

    def _media(self, has: np.ndarray, items: np.ndarray | None, shape: tuple[int, ...]
               ) -> tuple[np.ndarray, np.ndarray]:
        """(N, …) media of the rows flagged in ``has`` (B,) → (items or a zero dummy, row index
        (B,) = 1 + item index, 0 for rows without)."""
        rows = np.zeros(has.shape[0], dtype=np.int64)
        rows[has] = np.arange(1, int(has.sum()) + 1)
        if items is None or items.shape[0] == 0:
            return np.zeros((1, *shape), dtype=np.float32), rows
        return np.ascontiguousarray(items, dtype=np.float32), rows

    def _empty_past(self, b: int) -> dict[str, np.ndarray]:
        s = self.spec
        z = np.zeros((b, s.kv_heads, 0, s.head_dim), dtype=np.float32)
        return {f"past.{i}.{k}": z for i in range(s.layers) for k in ("key", "value")}

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

    def answer(self, samples: Sequence[Sample], max_new_tokens: int | None = None,
               routes: Sequence[str | None] | None = None) -> list[Answer]:
        """Greedy answers in sample order (``routes`` given → skip the router, e.g. an oracle)."""
        if not samples:
            return []
        n_new = max_new_tokens or self.max_new_tokens
        batch = self.enc.prompt_batch(samples)
        ids = batch.input_ids.numpy()
        mask = batch.attention_mask.numpy()
        b = ids.shape[0]
        s = self.spec
        pix, img_row = self._media((ids == s.image_token_id).any(1),
                                   None if batch.pixel_values is None else batch.pixel_values.numpy(),
                                   (3, s.image_size, s.image_size))
        media = {"pixel_values": pix, "image_row": img_row}
        if s.audio_token_id is not None:
            assert s.audio_shape is not None
            feats = None if batch.input_features is None else batch.input_features.numpy()
            media["input_features"], media["audio_row"] = self._media(
                (ids == s.audio_token_id).any(1), feats, s.audio_shape)
        past = self._empty_past(b)
        if routes is None:
            t_ids, t_mask = text_only(ids, mask, self.placeholders, self.pad)
            errors = self.full.run(["route_errors"], {
                "input_ids": t_ids, "attention_mask": t_mask, "position_ids": positions(t_mask),
                "gate": np.zeros((b, len(self.tasks)), np.float32), **media, **past})[0]
            routes = self.route(errors)
        gate = self._gate(routes)
        out = self.full.run(None, {"input_ids": ids, "attention_mask": mask,
                                   "position_ids": positions(mask), "gate": gate, **media, **past})
        logits, cache = out[0], out[2:]
        next_pos = positions(mask)[:, -1:] + 1  # (B, 1)
        done = np.zeros(b, dtype=bool)
        generated: list[np.ndarray] = []
        names = [f"past.{i}.{k}" for i in range(s.layers) for k in ("key", "value")]
        for step in range(n_new):
            nxt = logits.argmax(-1)
            nxt = np.where(done, self.pad, nxt)
            generated.append(nxt)
            done |= nxt == self.eos
            if done.all() or step == n_new - 1:
                break
            mask = np.concatenate([mask, np.ones((b, 1), dtype=mask.dtype)], axis=1)
            out = self.decoder.run(None, {"input_ids": nxt[:, None].astype(np.int64),
                                          "attention_mask": mask, "position_ids": next_pos,
                                          "gate": gate, **dict(zip(names, cache, strict=True))})
            logits, cache = out[0], out[1:]
            next_pos = next_pos + 1
        rows = np.stack(generated, axis=1).tolist()  # (B, n)
        return [Answer(self.enc.decode(r[: r.index(self.eos)] if self.eos in r else r), route)
                for r, route in zip(rows, routes, strict=True)]


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
