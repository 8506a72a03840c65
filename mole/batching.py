"""Samples → tensors. Training batches are right-padded with labels; prompts are left-padded.

Image placeholders: a sample with an image gets ``n_image_tokens`` ``<image>`` ids at the front
of its prompt, and its image one row of ``pixel_values``; text-only samples get neither, so a
batch may mix both (the model scatters features by placeholder position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mole.tokenizer import IMAGE, SEP
from protocol.manifest import Sample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (N_img, 3, H, W), N_img ≤ B
    labels: torch.Tensor | None  # (B, T), -100 outside answers

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.pixel_values is None else self.pixel_values.to(device),
            None if self.labels is None else self.labels.to(device),
        )

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "pixel_values": self.pixel_values}


def image_tensor(image: np.ndarray, image_size: int, sample_id: str) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float in [-1, 1] (SigLIP's mean 0.5 / std 0.5)."""
    if image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
        raise ValueError(
            f"image of sample {sample_id!r} has shape {image.shape} and dtype {image.dtype}; "
            f"expected ({image_size}, {image_size}, 3) uint8: resize it to the model's image size"
        )
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


class Encoder:
    """Tokenises samples for one model (its placeholder count, image size and max length)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, n_image_tokens: int, image_size: int,
                 max_length: int):
        self.tok = tokenizer
        self.n_image_tokens = n_image_tokens
        self.image_size = image_size
        self.max_length = max_length
        self.image_id = int(tokenizer.convert_tokens_to_ids(IMAGE))
        self.sep_id = int(tokenizer.convert_tokens_to_ids(SEP))
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)

    def _words(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, s: Sample) -> list[int]:
        if not s.instruction.strip():
            raise ValueError(f"sample {s.id!r} has an empty instruction")
        head = [self.image_id] * self.n_image_tokens if s.image is not None else []
        return head + self._words(s.instruction) + [self.sep_id]

    def _pixels(self, samples: Sequence[Sample]) -> torch.Tensor | None:
        imgs = [image_tensor(s.image, self.image_size, s.id) for s in samples if s.image is not None]
        return torch.stack(imgs) if imgs else None

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
        return Batch(ids, mask, self._pixels(samples), lab)

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
        return Batch(ids, mask, self._pixels(samples), None)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True)).strip()
