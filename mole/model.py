"""The multimodal model both sides share: a LLaVA-architecture backbone with placeholder tokens.

``MoleModel`` wraps a ``LlavaForConditionalGeneration`` (vision tower → projector → causal LM)
and does what LLaVA's own forward does not: batches where only *some* samples carry an image
(replay mixes text-only and image tasks), and a second perception tower for audio
(mole.audio, optional). Each image occupies ``n_image_tokens`` consecutive ``<image>``
placeholder tokens in its prompt, each audio clip ``n_audio_tokens`` ``<audio>`` tokens; the
projected features are scattered into those positions, row by row, in batch order.

Sequence layout (one sample):  [<image> × P] [<audio> × Q] instruction words <sep> answer <eos>
Loss: cross-entropy on the answer words and <eos> only.
LoRA experts are injected in place by PEFT (mole.experts), so every method here runs through
whatever experts are active.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, WhisperFeatureExtractor
from transformers.cache_utils import DynamicCache

from mole.audio import AudioTower


class MoleModel(nn.Module):
    def __init__(self, llava: LlavaForConditionalGeneration, eos_token_id: int, pad_token_id: int,
                 audio_tower: AudioTower | None = None, audio_token_id: int | None = None,
                 feature_extractor: WhisperFeatureExtractor | None = None):
        super().__init__()
        self.llava = llava
        if not (audio_tower is None) == (audio_token_id is None) == (feature_extractor is None):
            raise ValueError("an audio tower needs an <audio> token id and its feature extractor")
        self.audio_tower = audio_tower
        self.feature_extractor = feature_extractor  # the processor that feeds the audio tower
        self.audio_token_id = audio_token_id
        self.n_audio_tokens = 0 if audio_tower is None else audio_tower.n_tokens
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

    def audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """(N, M, F) log-mel → (N·Q, d) projected audio features, clips in order."""
        if self.audio_tower is None:
            raise ValueError("this base has no audio tower (model.audio-hidden = 0); "
                             "it cannot take audio inputs")
        return self.audio_tower(input_features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              input_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids + (N, 3, H, W) images + (N_a, M, F) audio → (B, T, d) input embeddings."""
        embeds = self.llava.get_input_embeddings()(input_ids)
        embeds = _scatter(embeds, input_ids == self.image_token_id, pixel_values, "image",
                          self.n_image_tokens,
                          lambda x: self._image_features(x.to(embeds.dtype)))
        if self.audio_token_id is None:
            if input_features is not None and input_features.shape[0]:
                raise ValueError("audio inputs given, but this base has no audio tower")
            return embeds
        return _scatter(embeds, input_ids == self.audio_token_id, input_features, "audio",
                        self.n_audio_tokens, lambda x: self.audio_features(x.to(embeds.dtype)))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (B, T, d) of the language model."""
        embeds = self.embed(input_ids, pixel_values, input_features)
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
        input_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, T, V), loss or None). ``labels`` is -100 where no loss applies."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, input_features)
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
        input_features: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Greedy decoding with a KV cache from left-padded prompts (B, T); returns new ids."""
        lm = self.llava.model.language_model
        embeds = self.embed(input_ids, pixel_values, input_features)
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


def _scatter(embeds: torch.Tensor, slots: torch.Tensor, inputs: torch.Tensor | None, kind: str,
             per_item: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Write ``encode(inputs)`` (N·per_item, d) into the (B, T) ``slots`` of ``embeds`` (B, T, d)."""
    n_slots = int(slots.sum())
    if inputs is None or inputs.shape[0] == 0:
        if n_slots:
            raise ValueError(f"{n_slots} <{kind}> tokens in the batch but no {kind} inputs given")
        return embeds
    feats = encode(inputs)  # (N·per_item, d)
    if feats.shape[0] != n_slots:
        raise ValueError(
            f"{inputs.shape[0]} {kind} inputs give {feats.shape[0]} features, but the batch has "
            f"{n_slots} <{kind}> tokens ({per_item} per {kind} expected)"
        )
    return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))


def _eos_cut(row: list[int], eos: int) -> int:
    return row.index(eos) if eos in row else len(row)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: (B, T) → (B, T), 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
