"""The audio tower: a Whisper encoder over log-mel frames and a pooling projector into the LM.

Built from a ``transformers`` ``WhisperConfig`` (nothing downloaded) and the matching
``WhisperFeatureExtractor`` — the real processor, saved beside the base (``preprocessor_config.json``)
so an edge turns raw waveforms into the same features. Shapes for the default sizes::

    waveform (≤ 16000,) float32 @ 16 kHz ──WhisperFeatureExtractor──▶ (M=80 mels, F=64 frames)
    (N, M, F) ──WhisperEncoder (2 convs, the second strided)──▶ (N, F/2=32, d_a=64)
              ──avg-pool over time by p=2──▶ (N, 16, d_a) ──MLP──▶ (N, 16, d_text)

Each clip becomes ``n_tokens`` ``<audio>`` placeholders in the prompt, exactly like an image's
patch tokens. Whisper pads (or cuts) every clip to its window, so the encoder sees a fixed frame
count; clips longer than the window are rejected by the batcher rather than silently cut.
The encoder's attention projections are named ``…layers.N.self_attn.{q,k,v,out}_proj``: the
``audio`` modality's LoRA candidates (mole.modality).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from protocol.config import ModelConfig

N_FFT = 400  # Whisper's 25 ms window at 16 kHz


class AudioTower(nn.Module):
    """Whisper encoder + time pooling + a 2-layer MLP projector (LLaVA's projector shape)."""

    def __init__(self, whisper: WhisperConfig, pool: int, text_hidden: int):
        super().__init__()
        self.whisper_config = whisper
        self.pool = pool
        self.text_hidden = text_hidden
        self.encoder = WhisperEncoder(whisper)
        d = int(whisper.d_model)
        self.projector = nn.Sequential(nn.Linear(d, text_hidden), nn.GELU(),
                                       nn.Linear(text_hidden, text_hidden))
        positions = int(whisper.max_source_positions)
        if positions % pool:
            raise ValueError(f"encoder positions {positions} are not divisible by the pool {pool}")
        self.n_tokens = positions // pool
        self.n_mels = int(whisper.num_mel_bins)
        self.n_frames = 2 * positions  # Whisper's conv2 has stride 2

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """(N, M, F) log-mel → (N·n_tokens, d_text) projected features, clips in order."""
        if input_features.ndim != 3 or tuple(input_features.shape[1:]) != (self.n_mels, self.n_frames):
            raise ValueError(
                f"audio features must be (N, {self.n_mels}, {self.n_frames}), got "
                f"{tuple(input_features.shape)}; compute them with the base's feature extractor"
            )
        hidden = self.encoder(input_features).last_hidden_state  # (N, F/2, d_a)
        n, t, d = hidden.shape
        pooled = hidden.view(n, t // self.pool, self.pool, d).mean(dim=2)  # (N, n_tokens, d_a)
        return self.projector(pooled).reshape(n * self.n_tokens, -1)  # (N·n_tokens, d_text)

    def describe(self) -> dict[str, Any]:
        """What ``from_description`` needs to rebuild this tower (saved as JSON with the base)."""
        return {"whisper": self.whisper_config.to_dict(), "pool": self.pool,
                "text_hidden": self.text_hidden}

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> AudioTower:
        return cls(WhisperConfig(**d["whisper"]), int(d["pool"]), int(d["text_hidden"]))


def whisper_config(cfg: ModelConfig) -> WhisperConfig:
    """A tiny Whisper encoder sized by ``cfg`` (the decoder fields are unused)."""
    return WhisperConfig(
        num_mel_bins=cfg.audio_mels,
        d_model=cfg.audio_hidden,
        encoder_layers=cfg.audio_layers,
        encoder_attention_heads=cfg.audio_heads,
        encoder_ffn_dim=cfg.audio_hidden * cfg.mlp_ratio,
        max_source_positions=cfg.audio_frames // 2,
        decoder_layers=1, decoder_attention_heads=cfg.audio_heads,
        decoder_ffn_dim=cfg.audio_hidden, vocab_size=8, max_target_positions=8,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )


def build_audio_tower(cfg: ModelConfig) -> AudioTower:
    return AudioTower(whisper_config(cfg), cfg.audio_pool, cfg.text_hidden)


def build_feature_extractor(cfg: ModelConfig) -> WhisperFeatureExtractor:
    """Log-mel features with ``audio-frames`` frames per ``audio-seconds`` window."""
    samples = cfg.audio_sample_rate * cfg.audio_seconds
    return WhisperFeatureExtractor(
        feature_size=cfg.audio_mels, sampling_rate=cfg.audio_sample_rate,
        hop_length=samples // cfg.audio_frames, chunk_length=cfg.audio_seconds, n_fft=N_FFT,
    )


AUDIO_CONFIG = "audio_tower.json"
AUDIO_WEIGHTS = "audio_tower.safetensors"


def load_audio_extras(p: Any, tokenizer: Any) -> dict[str, Any]:
    """MoleModel's audio arguments from a checkpoint folder (empty when it has no audio tower).

    The tower sits beside the VLM's own files as ``audio_tower.json`` + ``audio_tower.safetensors``
    with the Whisper feature extractor's ``preprocessor_config.json``."""
    import json

    from safetensors.torch import load_file

    from mole.families.base import CheckpointError
    from mole.tokenizer import AUDIO

    if not (p / AUDIO_CONFIG).is_file():
        return {}
    try:
        tower = AudioTower.from_description(json.loads((p / AUDIO_CONFIG).read_text()))
        tower.load_state_dict(load_file(str(p / AUDIO_WEIGHTS)), strict=True)
        extractor = WhisperFeatureExtractor.from_pretrained(p, local_files_only=True)
    except Exception as e:  # json, safetensors, torch and transformers each raise their own types
        raise CheckpointError(
            f"cannot load the audio tower of base checkpoint {str(p)!r}: {e}; delete the folder "
            "to rebuild the cached base, or restore its audio_tower.* and preprocessor_config.json"
        ) from e
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO)
    if audio_id is None or audio_id == tokenizer.unk_token_id:
        raise CheckpointError(f"tokenizer of {str(p)!r} has no {AUDIO} token for its audio tower")
    return {"audio_tower": tower, "audio_token_id": int(audio_id), "feature_extractor": extractor}
