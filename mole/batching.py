"""Samples → tensors. Training batches are right-padded with labels; prompts are left-padded.

Placeholders: a sample with an image gets ``n_image_tokens`` ``<image>`` ids at the front of its
prompt and one row of ``pixel_values``; a sample with audio then gets ``n_audio_tokens``
``<audio>`` ids and one row of ``input_features`` (log-mel, from the base's Whisper feature
extractor). Text-only samples get neither, so a batch may mix all kinds (the model scatters
features by placeholder position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mole.tokenizer import AUDIO, IMAGE, SEP
from protocol.manifest import Sample

if TYPE_CHECKING:
    from transformers import WhisperFeatureExtractor

    from mole.model import MoleModel


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (N_img, 3, H, W), N_img ≤ B
    labels: torch.Tensor | None  # (B, T), -100 outside answers
    input_features: torch.Tensor | None = None  # (N_audio, M, F) log-mel, N_audio ≤ B
    # What else a family's processor returns per image, rows in image order: Qwen2-VL's
    # image_grid_thw (N_img, 3), Idefics3's pixel_attention_mask (N_tiles, H, W), …
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     move(self.pixel_values), move(self.labels), move(self.input_features),
                     {k: v.to(device) for k, v in self.extras.items()})

    def model_inputs(self) -> dict[str, object]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "pixel_values": self.pixel_values, "input_features": self.input_features,
                "image_extras": self.extras}


def image_tensor(image: np.ndarray, image_size: int, sample_id: str) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float in [-1, 1] (SigLIP's mean 0.5 / std 0.5)."""
    if image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
        raise ValueError(
            f"image of sample {sample_id!r} has shape {image.shape} and dtype {image.dtype}; "
            f"expected ({image_size}, {image_size}, 3) uint8: resize it to the model's image size"
        )
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


class AudioFeatures:
    """Waveform → (M, F) log-mel with the base's feature extractor, memoised per sample.

    Whisper's extractor costs ~3 ms a clip on a CPU core, as much as a training step per batch,
    and the same clips recur every epoch and in replay; the cache keeps (M, F) float32 per
    (task, id) — 8 KB at the default sizes — up to ``max_items``.
    """

    def __init__(self, extractor: WhisperFeatureExtractor, max_items: int = 50_000):
        self.extractor = extractor
        self.rate = int(extractor.sampling_rate)
        self.max_samples = int(extractor.n_samples)
        self.max_items = max_items
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def check(self, s: Sample) -> np.ndarray:
        a = s.audio
        assert a is not None
        rate = s.audio_rate or self.rate
        if rate != self.rate:
            raise ValueError(f"audio of sample {s.id!r} is sampled at {rate} Hz; the model "
                             f"expects {self.rate} Hz: resample it")
        if a.ndim != 1 or a.dtype != np.float32 or a.size == 0:
            raise ValueError(f"audio of sample {s.id!r} has shape {a.shape} and dtype {a.dtype}; "
                             "expected a non-empty (T,) float32 waveform")
        if a.size > self.max_samples:
            raise ValueError(f"audio of sample {s.id!r} is {a.size} samples long, over the "
                             f"model's window of {self.max_samples} "
                             f"({self.max_samples / self.rate:g} s): cut it")
        if not np.isfinite(a).all():
            raise ValueError(f"audio of sample {s.id!r} has non-finite values")
        return a

    def __call__(self, samples: Sequence[Sample]) -> torch.Tensor:
        """(N, M, F) for the samples (all with audio), in order."""
        missing = [s for s in samples if (s.task, s.id) not in self._cache]
        if missing:
            waves = [self.check(s) for s in missing]
            feats = self.extractor(waves, sampling_rate=self.rate, return_tensors="pt")
            if len(self._cache) + len(missing) > self.max_items:
                self._cache.clear()
            for s, f in zip(missing, feats["input_features"], strict=True):
                self._cache[(s.task, s.id)] = f.float()
        return torch.stack([self._cache[(s.task, s.id)] for s in samples])


class SampleEncoder(Protocol):
    """What every family's encoder offers (this module's Encoder, mole.chat.ChatEncoder):
    samples → padded batches, generated ids → answer text."""

    tok: Any  # the checkpoint's tokenizer
    eos_id: int
    pad_id: int
    max_length: int

    def train_batch(self, samples: Sequence[Sample]) -> Batch: ...

    def prompt_batch(self, samples: Sequence[Sample]) -> Batch: ...

    def decode(self, ids: list[int]) -> str: ...


class Encoder:
    """Tokenises samples for one model (its placeholder counts, image size and max length)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, n_image_tokens: int, image_size: int,
                 max_length: int, audio: AudioFeatures | None = None, n_audio_tokens: int = 0):
        self.tok = tokenizer
        self.n_image_tokens = n_image_tokens
        self.image_size = image_size
        self.max_length = max_length
        self.audio = audio
        self.n_audio_tokens = n_audio_tokens
        self.audio_id = int(tokenizer.convert_tokens_to_ids(AUDIO))
        self.image_id = int(tokenizer.convert_tokens_to_ids(IMAGE))
        self.sep_id = int(tokenizer.convert_tokens_to_ids(SEP))
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)

    @classmethod
    def for_model(cls, tokenizer: PreTrainedTokenizerBase, model: MoleModel, max_length: int
                  ) -> Encoder:
        """The encoder matching ``model``'s towers (and its saved audio feature extractor)."""
        extractor = model.feature_extractor
        audio = AudioFeatures(extractor) if extractor is not None else None
        return cls(tokenizer, model.n_image_tokens, model.image_size, max_length,
                   audio, model.n_audio_tokens)

    @staticmethod
    def for_any(tokenizer: object, model: MoleModel, max_length: int) -> SampleEncoder:
        """The encoder of ``model``'s family (this class for the project's own prompt layout,
        mole.chat.ChatEncoder for checkpoints with their own processor and chat template)."""
        return model.family.encoder(model, tokenizer, max_length)  # type: ignore[no-any-return]

    def _words(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, s: Sample) -> list[int]:
        if not s.instruction.strip():
            raise ValueError(f"sample {s.id!r} has an empty instruction")
        if s.turns or s.more_images:
            raise ValueError(
                f"sample {s.id!r} has {len(s.conversation) // 2} turns and {len(s.images)} "
                "images; the project's own base takes one question with at most one image: use "
                "a Hugging Face VLM checkpoint (`model.base-path`) for multi-turn or multi-image "
                "data")
        head = [self.image_id] * self.n_image_tokens if s.image is not None else []
        if s.audio is not None:
            if self.audio is None:
                raise ValueError(f"sample {s.id!r} has audio, but this base has no audio tower; "
                                 "use a base with model.audio-hidden > 0")
            head += [self.audio_id] * self.n_audio_tokens
        return head + self._words(s.instruction) + [self.sep_id]

    def _pixels(self, samples: Sequence[Sample]) -> torch.Tensor | None:
        imgs = [image_tensor(s.image, self.image_size, s.id) for s in samples if s.image is not None]
        return torch.stack(imgs) if imgs else None

    def _audio(self, samples: Sequence[Sample]) -> torch.Tensor | None:
        with_audio = [s for s in samples if s.audio is not None]
        if not with_audio:
            return None
        assert self.audio is not None  # prompt_ids refused audio without a tower
        return self.audio(with_audio)

    def _check_len(self, n: int, s: Sample) -> None:
        if n > self.max_length:
            raise ValueError(
                f"sample {s.id!r} is {n} tokens long, over `model.max-length` {self.max_length}"
            )

    def train_batch(self, samples: Sequence[Sample]) -> Batch:
        """Right-padded prompt+answer+<eos>; labels only on answer and <eos>."""
        rows, labels = [], []
        for s in samples:
            p = self.prompt_ids(s)
            a = self._words(s.answer) + [self.eos_id]
            self._check_len(len(p) + len(a), s)
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        lab = torch.full((len(rows), t), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(lb)] = torch.tensor(lb)
            mask[i, : len(r)] = 1
        return Batch(ids, mask, self._pixels(samples), lab, self._audio(samples))

    def prompt_batch(self, samples: Sequence[Sample]) -> Batch:
        """Left-padded prompts, for generation and for router features (last token = <sep>)."""
        rows = [self.prompt_ids(s) for s in samples]
        for r, s in zip(rows, samples, strict=True):
            self._check_len(len(r), s)
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, t - len(r):] = torch.tensor(r)
            mask[i, t - len(r):] = 1
        return Batch(ids, mask, self._pixels(samples), None, self._audio(samples))

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True)).strip()
