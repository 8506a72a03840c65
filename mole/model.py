"""The multimodal model both sides share: a LLaVA-architecture backbone with placeholder tokens.

``MoleModel`` wraps a ``LlavaForConditionalGeneration`` (vision tower → projector → causal LM)
and does the one thing LLaVA's own forward does not: batches where only *some* samples carry an
image (replay mixes text-only and image tasks). Each image occupies ``n_image_tokens``
consecutive ``<image>`` placeholder tokens in its prompt; the projected patch features are
scattered into those positions, row by row, in batch order.

Sequence layout (one sample):  [<image> × P] instruction words <sep> answer words <eos>
Loss: cross-entropy on the answer words and <eos> only.
LoRA experts are injected in place by PEFT (mole.experts), so every method here runs through
whatever experts are active.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache


class MoleModel(nn.Module):
    def __init__(self, llava: LlavaForConditionalGeneration, eos_token_id: int, pad_token_id: int):
        super().__init__()
        self.llava = llava
        self.image_token_id = int(llava.config.image_token_index)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        vc = llava.config.vision_config
        self.image_size = int(vc.image_size)
        with torch.no_grad():
            probe = self._image_features(torch.zeros(1, 3, self.image_size, self.image_size))
        self.n_image_tokens = int(probe.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.llava.config.text_config.hidden_size)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N·P, d): projected patch features, images in order."""
        cfg = self.llava.config
        feats = self.llava.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        if isinstance(feats, list | tuple):
            return torch.cat(list(feats), dim=0)
        return feats.reshape(-1, feats.shape[-1])

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids + (N, 3, H, W) images → (B, T, d) input embeddings."""
        embeds = self.llava.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id  # (B, T)
        n_slots = int(slots.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"{n_slots} <image> tokens in the batch but no images given")
            return embeds
        feats = self._image_features(pixel_values.to(embeds.dtype))  # (N·P, d)
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"{pixel_values.shape[0]} images give {feats.shape[0]} features, but the batch "
                f"has {n_slots} <image> tokens ({self.n_image_tokens} per image expected)"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (B, T, d) of the language model."""
        embeds = self.embed(input_ids, pixel_values)
        out = self.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask,
            position_ids=_positions(attention_mask), use_cache=False,
        )
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, T, V), loss or None). ``labels`` is -100 where no loss applies."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values)
        logits = self.llava.lm_head(hidden)
        loss = None
        if labels is not None:
            # Token t predicts token t+1.
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
    ) -> list[list[int]]:
        """Greedy decoding with a KV cache from left-padded prompts (B, T); returns new ids."""
        lm = self.llava.model.language_model
        embeds = self.embed(input_ids, pixel_values)
        mask = attention_mask
        pos = _positions(mask)
        cache = DynamicCache()
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                 past_key_values=cache, use_cache=True)
        next_pos = pos[:, -1:] + 1  # (B, 1)
        b = input_ids.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        generated: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.llava.lm_head(out.last_hidden_state[:, -1])  # (B, V)
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            generated.append(nxt)
            done |= nxt == self.eos_token_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = lm(inputs_embeds=self.llava.get_input_embeddings()(nxt[:, None]),
                     attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                     use_cache=True)
            next_pos = next_pos + 1
        ids = torch.stack(generated, dim=1).tolist()  # (B, n)
        return [row[: _eos_cut(row, self.eos_token_id)] for row in ids]


def _eos_cut(row: list[int], eos: int) -> int:
    return row.index(eos) if eos in row else len(row)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: (B, T) → (B, T), 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
