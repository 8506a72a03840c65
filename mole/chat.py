"""Samples → tensors through a checkpoint's own chat template and processor.

For Hugging Face VLM families (LLaVA-1.5, Qwen2-VL, Idefics3 / SmolVLM, …) a sample becomes a
conversation — its user turns with their images, its assistant turns (one for a single-turn
sample, several for a multi-turn record) — rendered by the tokenizer's ``chat_template`` and
tokenised, with the images resized, normalised and (where the family does it) tiled by the
checkpoint's own image processor. The family supplies one function,
``process(text, images) → (ids, media)``, that calls its processor exactly as the processor's
``__call__`` would (placeholder expansion included).

Loss on assistant turns only: for every assistant turn k, the tokens between the rendered
prefix ``messages[:k]`` + generation prompt and the rendered ``messages[:k+1]`` carry labels
(the answer, the end-of-turn token and whatever the template puts after it). This needs the
template to be prefix-stable (each rendered prefix is a token prefix of the whole), which is
checked per sample: a template that is not is refused loudly instead of mis-labelled.

Batches: training rows right-padded (labels -100 on padding), prompts left-padded (generation
and router features read the last position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mole.batching import Batch
from protocol.manifest import Sample

# (rendered text, images in order) → (token ids, media tensors of this one sample)
Process = Callable[[str, list[Image.Image]], tuple[list[int], dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class MediaLayout:
    """How one sample's media tensors are joined into a batch's.

    ``concat``: keys whose per-sample tensors are stacked along dim 0 (pixel rows, grids, tiles);
    the key ``pixel_values`` becomes :attr:`Batch.pixel_values`, the rest go to ``extras``.
    """

    concat: tuple[str, ...] = ("pixel_values",)


def messages_of(s: Sample, with_answer: bool) -> list[dict[str, Any]]:
    """A sample as the conversation format every HF chat template takes: its turns in order,
    each image as an image part at the head of the user turn its marker stood in. Without the
    answer, the last assistant turn is left off (the prompt the model continues)."""
    if not s.instruction.strip():
        raise ValueError(f"sample {s.id!r} has an empty instruction")
    turns = s.conversation if with_answer else s.conversation[:-1]
    # The user turn of every image: the first one unless the sample says otherwise.
    where = s.image_turns or (0,) * len(s.images)
    msgs: list[dict[str, Any]] = []
    for k, (role, text) in enumerate(turns):
        content: list[dict[str, Any]] = [{"type": "image"} for w in where if w == k]
        if text or role == "assistant":
            content.append({"type": "text", "text": text})
        msgs.append({"role": role, "content": content})
    return msgs


def _n_images(msgs: list[dict[str, Any]]) -> int:
    return sum(part["type"] == "image" for m in msgs for part in m["content"])


def to_pil(image: np.ndarray, sample_id: str) -> Image.Image:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image of sample {sample_id!r} has shape {image.shape} and dtype "
                         f"{image.dtype}; expected (H, W, 3) uint8 (any H, W: the checkpoint's "
                         "processor resizes it)")
    return Image.fromarray(image, mode="RGB")


class ChatEncoder:
    """Encodes samples for one HF-family model through its chat template and processor."""

    def __init__(self, tokenizer: Any, process: Process, max_length: int,
                 layout: MediaLayout = MediaLayout(), max_items: int = 20_000):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the checkpoint's tokenizer has no chat template")
        self.tok = tokenizer
        self.process = process
        self.max_length = max_length
        self.layout = layout
        # The processor (resize, tiling, normalisation: ~5 ms an image for Idefics3's splitter)
        # would run again for every epoch and replay draw of the same sample: results are kept
        # per (task, id, kind), up to max_items (a 32-px image in 5 tiles: 60 KB).
        self.max_items = max_items
        self._cache: dict[tuple[str, str, str], Any] = {}
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id)

    def render(self, msgs: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return str(self.tok.apply_chat_template(msgs, tokenize=False,
                                                add_generation_prompt=add_generation_prompt))

    def _images(self, s: Sample) -> list[Image.Image]:
        if s.audio is not None:
            raise ValueError(f"sample {s.id!r} has audio, but this base has no audio tower")
        return [to_pil(im, s.id) for im in s.images]

    def _check_len(self, n: int, s: Sample) -> None:
        if n > self.max_length:
            raise ValueError(f"sample {s.id!r} is {n} tokens long (image tokens included), over "
                             f"the model's context window ({self.max_length} positions, the config's "
                             "max_position_embeddings): shorten the instruction/answer or drop the sample")

    def _memo(self, s: Sample, kind: str, make: Callable[[Sample], Any]) -> Any:
        key = (s.task, s.id, kind)
        if key not in self._cache:
            if len(self._cache) >= self.max_items:
                self._cache.clear()
            self._cache[key] = make(s)
        return self._cache[key]

    def encode_train(self, s: Sample) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """(ids, labels, media) of one sample; labels -100 outside assistant turns."""
        return self._memo(s, "train", self._encode_train)  # type: ignore[no-any-return]

    def encode_prompt(self, s: Sample) -> tuple[list[int], dict[str, torch.Tensor]]:
        """(ids, media) of one sample's prompt, ending in the template's generation prompt."""
        return self._memo(s, "prompt", self._encode_prompt)  # type: ignore[no-any-return]

    def _encode_train(self, s: Sample) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        images = self._images(s)
        msgs = messages_of(s, with_answer=True)
        ids, media = self.process(self.render(msgs, False), images)
        labels = [-100] * len(ids)
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            # A prefix holds the images of its own turns only (a later turn may bring one).
            head, _ = self.process(self.render(msgs[:k], True), images[:_n_images(msgs[:k])])
            end = ids if k == len(msgs) - 1 else self.process(
                self.render(msgs[:k + 1], False), images[:_n_images(msgs[:k + 1])])[0]
            if ids[:len(head)] != head or ids[:len(end)] != end or len(end) <= len(head):
                raise ValueError(
                    f"the chat template does not render sample {s.id!r}'s turns as prefixes of "
                    "the whole conversation, so the assistant tokens cannot be told apart; use "
                    "a checkpoint whose template renders each turn after the previous ones")
            labels[len(head):len(end)] = ids[len(head):len(end)]
        self._check_len(len(ids), s)
        return ids, labels, media

    def _encode_prompt(self, s: Sample) -> tuple[list[int], dict[str, torch.Tensor]]:
        ids, media = self.process(self.render(messages_of(s, with_answer=False), True),
                                  self._images(s))
        self._check_len(len(ids), s)
        return ids, media

    def _media(self, per_sample: Sequence[dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        joined: dict[str, torch.Tensor] = {}
        for key in self.layout.concat:
            parts = [m[key] for m in per_sample if key in m]
            if parts:
                joined[key] = torch.cat(parts, dim=0)
        pixels = joined.pop("pixel_values", None)
        return pixels, joined

    def train_batch(self, samples: Sequence[Sample]) -> Batch:
        enc = [self.encode_train(s) for s in samples]
        t = max(len(ids) for ids, _, _ in enc)
        ids = torch.full((len(enc), t), self.pad_id, dtype=torch.long)
        lab = torch.full((len(enc), t), -100, dtype=torch.long)
        mask = torch.zeros((len(enc), t), dtype=torch.long)
        for i, (r, lb, _) in enumerate(enc):
            ids[i, :len(r)] = torch.tensor(r)
            lab[i, :len(lb)] = torch.tensor(lb)
            mask[i, :len(r)] = 1
        pixels, extras = self._media([m for _, _, m in enc])
        return Batch(ids, mask, pixels, lab, None, extras)

    def prompt_batch(self, samples: Sequence[Sample]) -> Batch:
        enc = [self.encode_prompt(s) for s in samples]
        t = max(len(r) for r, _ in enc)
        ids = torch.full((len(enc), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), t), dtype=torch.long)
        for i, (r, _) in enumerate(enc):
            ids[i, t - len(r):] = torch.tensor(r)
            mask[i, t - len(r):] = 1
        pixels, extras = self._media([m for _, m in enc])
        return Batch(ids, mask, pixels, None, None, extras)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True)).strip()
