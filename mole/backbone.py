"""Backbone: build a small LLaVA-architecture model from configs, or load a local checkpoint.

The default is sized for a CPU: a SigLIP vision tower (64-d × 2 layers, 8-px patches → 16
patch tokens for a 32-px image) and a Qwen2 language model (128-d × 4 layers, GQA 4/2 heads),
joined by LLaVA's 2-layer MLP projector, plus (``model.audio-hidden`` > 0) a Whisper audio
encoder with its own projector (mole.audio). Nothing is downloaded: configs come from
``ModelConfig``, the tokenizer from the data (mole.tokenizer). Any LLaVA-family checkpoint in
``save_pretrained`` layout loads by path with the same code (``model.base-path``); the audio
tower, when present, sits beside it as ``audio_tower.json`` + ``audio_tower.safetensors`` and
the Whisper feature extractor's ``preprocessor_config.json``.

Pitfalls handled here: SigLIP has no CLS token, so the feature strategy is
"full" with exactly one <image> token per patch; ``vision_feature_layer=-1`` for a tiny tower;
``vision_use_head=False``; the image token id must lie inside the text vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mole.audio import AUDIO_CONFIG, AUDIO_WEIGHTS, build_audio_tower, build_feature_extractor
from mole.families.base import CheckpointError
from mole.families.llava import LLAVA, LlavaAdapter, fixed_image_geometry
from mole.model import MoleModel
from mole.tokenizer import AUDIO, IMAGE
from protocol.config import ModelConfig

BASE_INFO = "fedmole_base.json"
__all__ = ["AUDIO_CONFIG", "AUDIO_WEIGHTS", "BASE_INFO", "CheckpointError", "build_backbone",
           "load_backbone", "pick_device", "pick_dtype", "read_base_info", "save_backbone", "weights_digest"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda if available, else cpu; never requires a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`train.device` is {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype``: ``auto`` → bfloat16 on CUDA, float32 elsewhere (CPU kernels for bf16
    are slow and round differently from the fp32 the project's results were measured with)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_backbone(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, image_size: int,
                   init_seed: int = 0) -> MoleModel:
    """A freshly initialised LLaVA model sized by ``cfg`` for ``tokenizer``'s vocabulary."""
    if image_size % cfg.patch_size:
        raise ValueError(
            f"`data.image-size` {image_size} is not a multiple of `model.patch-size` {cfg.patch_size}"
        )
    vision = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * cfg.mlp_ratio,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=image_size,
        patch_size=cfg.patch_size,
        vision_use_head=False,
    )
    n_patches = (image_size // cfg.patch_size) ** 2
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * cfg.mlp_ratio,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=max(cfg.max_length, n_patches + 32),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=n_patches,
        tie_word_embeddings=True,
    )
    torch.manual_seed(init_seed)  # the init is part of the (cached) base's identity
    llava = LlavaForConditionalGeneration(config)
    # LLaVA's generic init draws every Linear/Conv/Embedding of the whole model from N(0, 0.02),
    # the vision tower included; the tower gets SigLIP's own init (lecun / xavier), the one its
    # architecture is trained from. (Alone this did not make pretraining learn to see at every
    # seed; the vision tower's auxiliary loss in simulation/base.py does.)
    llava.model.vision_tower.load_state_dict(SiglipVisionModel(vision).state_dict())
    geometry: dict[str, Any] = fixed_image_geometry(llava)
    if not cfg.audio_hidden:
        return MoleModel(llava, LlavaAdapter(llava), LLAVA, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **geometry)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO)
    return MoleModel(llava, LlavaAdapter(llava, [audio_id]), LLAVA,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     audio_tower=build_audio_tower(cfg), audio_token_id=audio_id,
                     feature_extractor=build_feature_extractor(cfg), **geometry)


def save_backbone(model: MoleModel, tokenizer: PreTrainedTokenizerBase, path: Path,
                  info: dict | None = None) -> None:
    """``save_pretrained`` layout (safetensors + config.json + tokenizer files) + our info JSON."""
    path.mkdir(parents=True, exist_ok=True)
    model.llava.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if model.audio_tower is not None:
        assert model.feature_extractor is not None
        save_file({k: v.contiguous() for k, v in model.audio_tower.state_dict().items()},
                  str(path / AUDIO_WEIGHTS))
        (path / AUDIO_CONFIG).write_text(json.dumps(model.audio_tower.describe(), indent=2))
        model.feature_extractor.save_pretrained(path)
    (path / BASE_INFO).write_text(json.dumps(info or {}, indent=2, sort_keys=True))


def load_backbone(path: str | Path, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[MoleModel, Any]:
    """Load a local checkpoint folder through its family (never the hub).

    The family comes from ``config.model_type`` (mole.families; an unknown type is refused with
    the list of known ones). What is loaded is checked, not assumed: every tensor of the
    family's model class (none missing, unexpected or of another shape), the processor and
    chat template the checkpoint was saved with (or the project's own prompt layout). Returns
    (model, processor): the processor is what ``Encoder.for_any`` turns into the sample encoder
    (the tokenizer for the project's own layout).
    """
    from mole.families import family_for, read_model_type

    p = Path(path)
    model_type = read_model_type(p)
    model, processor = family_for(model_type, p).load(p, device or torch.device("cpu"))
    if dtype != torch.float32:
        model.to(dtype)
    return model, processor


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) in name order: the base's identity.

    Two machines that pretrained "the same" base (same data and config) may hold different
    weights (other CPU kernels round differently); this digest tells them apart, and a base that
    was loaded is checked against the digest recorded when it was saved.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_base_info(path: Path) -> dict:
    f = path / BASE_INFO
    return json.loads(f.read_text()) if f.is_file() else {}
