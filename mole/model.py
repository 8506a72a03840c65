"""The multimodal model both sides share: a Hugging Face VLM of any registered family.

``MoleModel`` wraps the family's own model class (``LlavaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ``Idefics3ForConditionalGeneration``, …; attribute ``vlm``)
and runs one forward pass for all of them, with the family's :class:`VisionAdapter` supplying
what differs (where image features come from, the decoder stack, position ids — M-RoPE for
Qwen2-VL). It does what the families' own forwards do not: batches where only *some* samples
carry an image (replay mixes text-only and image tasks), and a second perception tower for
audio (mole.audio, optional). Image features are scattered into the image placeholder tokens
the family's processor put in the prompt, image by image in batch order; each audio clip
occupies ``n_audio_tokens`` ``<audio>`` tokens.

Loss: cross-entropy where ``labels`` is not -100 (the answer / assistant turns only).
LoRA experts are injected in place by PEFT (mole.experts), so every method here runs through
whatever experts are active.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperFeatureExtractor
from transformers.cache_utils import DynamicCache

from mole.audio import AudioTower
from mole.families.base import VisionAdapter

if TYPE_CHECKING:
    from mole.families.base import Family

Extras = dict[str, torch.Tensor]


class MoleModel(nn.Module):
    def __init__(self, vlm: nn.Module, adapter: VisionAdapter, family: Family,
                 eos_token_id: int, pad_token_id: int, audio_tower: AudioTower | None = None,
                 audio_token_id: int | None = None,
                 feature_extractor: WhisperFeatureExtractor | None = None,
                 n_image_tokens: int = 0, image_size: int = 0):
        super().__init__()
        self.vlm = vlm
        self.adapter = adapter
        self.family = family  # not a Module: the registry entry (loader, encoder, modalities)
        if not (audio_tower is None) == (audio_token_id is None) == (feature_extractor is None):
            raise ValueError("an audio tower needs an <audio> token id and its feature extractor")
        self.audio_tower = audio_tower
        self.feature_extractor = feature_extractor  # the processor that feeds the audio tower
        self.audio_token_id = audio_token_id
        self.n_audio_tokens = 0 if audio_tower is None else audio_tower.n_tokens
        self.image_token_id = int(adapter.image_token_id)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        # Fixed-resolution families (the project's own LLaVA): P tokens per image of this size;
        # 0 where the processor decides (any size, tiles, dynamic grids).
        self.n_image_tokens = n_image_tokens
        self.image_size = image_size

    @property
    def llava(self) -> Any:
        """The wrapped model under its historical name (the project's own base is a LLaVA)."""
        return self.vlm

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.get_input_embeddings().weight.shape[1])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.vlm.get_input_embeddings()  # type: ignore[no-any-return,operator]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vlm.lm_head(hidden)  # type: ignore[no-any-return,operator]

    def image_features(self, pixel_values: torch.Tensor, extras: Extras | None = None
                       ) -> list[torch.Tensor]:
        """The batch's images → one (P_i, d) tensor of projected features per image, in order."""
        dtype = self.get_input_embeddings().weight.dtype
        return self.adapter.image_features(self.vlm, pixel_values.to(dtype), extras or {})

    def _image_features(self, pixel_values: torch.Tensor, extras: Extras | None = None
                        ) -> torch.Tensor:
        """(N, …) images → (ΣP_i, d): projected features of every image, images in order."""
        return torch.cat(self.image_features(pixel_values, extras), dim=0)

    def audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """(N, M, F) log-mel → (N·Q, d) projected audio features, clips in order."""
        if self.audio_tower is None:
            raise ValueError("this base has no audio tower (model.audio-hidden = 0); "
                             "it cannot take audio inputs")
        return self.audio_tower(input_features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              input_features: torch.Tensor | None = None, image_extras: Extras | None = None
              ) -> torch.Tensor:
        """(B, T) ids + the batch's images + (N_a, M, F) audio → (B, T, d) input embeddings."""
        embeds = self.get_input_embeddings()(input_ids)
        embeds = _scatter(embeds, input_ids == self.image_token_id, pixel_values, "image",
                          lambda x: self._image_features(x, image_extras))
        if self.audio_token_id is None:
            if input_features is not None and input_features.shape[0]:
                raise ValueError("audio inputs given, but this base has no audio tower")
            return embeds
        return _scatter(embeds, input_ids == self.audio_token_id, input_features, "audio",
                        lambda x: self.audio_features(x.to(embeds.dtype)))

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  image_extras: Extras | None = None) -> torch.Tensor:
        return self.adapter.positions(self.vlm, input_ids, attention_mask, image_extras or {})

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        image_extras: Extras | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (B, T, d) of the language model."""
        embeds = self.embed(input_ids, pixel_values, input_features, image_extras)
        out = self.adapter.language_model(self.vlm)(
            inputs_embeds=embeds, attention_mask=attention_mask,
            position_ids=self.positions(input_ids, attention_mask, image_extras), use_cache=False,
        )
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        image_extras: Extras | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, T, V), loss or None). ``labels`` is -100 where no loss applies."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, input_features,
                                    image_extras)
        logits = self.lm_head(hidden)
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
        image_extras: Extras | None = None,
    ) -> list[list[int]]:
        """Greedy decoding with a KV cache from left-padded prompts (B, T); returns new ids."""
        lm = self.adapter.language_model(self.vlm)
        embeds = self.embed(input_ids, pixel_values, input_features, image_extras)
        mask = attention_mask
        pos = self.positions(input_ids, mask, image_extras)  # (B, T), or (3, B, T) for M-RoPE
        cache = DynamicCache()
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                 past_key_values=cache, use_cache=True)
        next_pos = self.adapter.next_positions(pos)  # (B, 1) / (3, B, 1)
        b = input_ids.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        generated: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.lm_head(out.last_hidden_state[:, -1])  # (B, V)
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            generated.append(nxt)
            done |= nxt == self.eos_token_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = lm(inputs_embeds=self.get_input_embeddings()(nxt[:, None]),
                     attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                     use_cache=True)
            next_pos = next_pos + 1
        ids = torch.stack(generated, dim=1).tolist()  # (B, n)
        return [row[: _eos_cut(row, self.eos_token_id)] for row in ids]


def _scatter(embeds: torch.Tensor, slots: torch.Tensor, inputs: torch.Tensor | None, kind: str,
             encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Write ``encode(inputs)`` (N_feat, d) into the (B, T) ``slots`` of ``embeds`` (B, T, d)."""
    n_slots = int(slots.sum())
    if inputs is None or inputs.shape[0] == 0:
        if n_slots:
            raise ValueError(f"{n_slots} <{kind}> tokens in the batch but no {kind} inputs given")
        return embeds
    feats = encode(inputs)  # (N_feat, d)
    if feats.shape[0] != n_slots:
        raise ValueError(
            f"{inputs.shape[0]} {kind} inputs give {feats.shape[0]} features, but the batch has "
            f"{n_slots} <{kind}> tokens: the prompt's placeholders do not match the model's "
            f"{kind} encoder (a prompt built for another model?)"
        )
    return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))


def _eos_cut(row: list[int], eos: int) -> int:
    return row.index(eos) if eos in row else len(row)
