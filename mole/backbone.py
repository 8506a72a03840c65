"""Backbone: build a small LLaVA-architecture model from configs, or load a local checkpoint.

The default is sized for a CPU: a SigLIP vision tower (64-d × 2 layers, 8-px patches → 16
patch tokens for a 32-px image) and a Qwen2 language model (128-d × 4 layers, GQA 4/2 heads),
joined by LLaVA's 2-layer MLP projector, plus (``model.audio-hidden`` > 0) a Whisper audio
encoder with its own projector (mole.audio). Nothing is downloaded: configs come from
``ModelConfig``, the tokenizer from the data (mole.tokenizer). Any LLaVA-family checkpoint in
``save_pretrained`` layout loads by path with the same code (``model.base-path``); the audio
tower, when present, sits beside it as ``audio_tower.json`` + ``audio_tower.safetensors`` and
the Whisper feature extractor's ``preprocessor_config.json``.

Pitfalls handled here (shared/versions.md): SigLIP has no CLS token, so the feature strategy is
"full" with exactly one <image> token per patch; ``vision_feature_layer=-1`` for a tiny tower;
``vision_use_head=False``; the image token id must lie inside the text vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperFeatureExtractor,
)

from mole.audio import AudioTower, build_audio_tower, build_feature_extractor
from mole.model import MoleModel
from mole.tokenizer import AUDIO, IMAGE, SEP
from protocol.config import ModelConfig

BASE_INFO = "fedmole_base.json"
AUDIO_CONFIG = "audio_tower.json"
AUDIO_WEIGHTS = "audio_tower.safetensors"


class CheckpointError(ValueError):
    """A base checkpoint folder is missing, incomplete or corrupt."""


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda if available, else cpu; never requires a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`train.device` is {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


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
    if not cfg.audio_hidden:
        return MoleModel(llava, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return MoleModel(llava, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, audio_tower=build_audio_tower(cfg),
                     audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO),
                     feature_extractor=build_feature_extractor(cfg))


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


# The model types this loader handles; every other family is refused by name (not loaded into
# LlavaForConditionalGeneration, which warns and initialises a foreign checkpoint at random).
KNOWN_MODEL_TYPES = ("llava",)


def load_backbone(path: str | Path, device: torch.device | None = None
                  ) -> tuple[MoleModel, PreTrainedTokenizerBase]:
    """Load a local LLaVA checkpoint folder in the project's prompt layout (never the hub).

    What is loaded is checked, not assumed: the config's ``model_type``, every tensor of the
    model class (none missing, unexpected or of another shape), and a tokenizer in the
    project's ``<image>… instruction <sep> answer <eos>`` layout. A checkpoint that fails any
    of these is refused with a :class:`CheckpointError` that names what is wrong — it is never
    trained with random rows or random tensors in it.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"base checkpoint {str(p)!r} is not a folder; check `model.base-path`")
    if not (p / "config.json").is_file():
        raise CheckpointError(
            f"base checkpoint {str(p)!r} has no config.json; it must be a save_pretrained folder"
        )
    _check_model_type(p)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        llava, report = LlavaForConditionalGeneration.from_pretrained(
            p, local_files_only=True, output_loading_info=True)
    except Exception as e:  # safetensors, json and torch each raise their own types
        raise CheckpointError(
            f"cannot load base checkpoint {str(p)!r}: {e}; delete it to rebuild the cached base, "
            "or point `model.base-path` at an intact LLaVA checkpoint"
        ) from e
    _check_loading_report(p, report)
    _check_prompt_layout(p, tokenizer)
    if tokenizer.eos_token is None:
        raise CheckpointError(f"tokenizer of {str(p)!r} has no eos token; answers could not end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out: any id will do
    vocab = llava.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise CheckpointError(
            f"tokenizer of {str(p)!r} has {len(tokenizer)} tokens but the model's embedding has "
            f"{vocab} rows: the extra tokens would get untrained rows; save the tokenizer that "
            "belongs to these weights")
    if llava.config.image_token_index >= vocab:
        raise CheckpointError(
            f"image_token_index {llava.config.image_token_index} is outside the vocabulary "
            f"({vocab}) of {str(p)!r}"
        )
    audio = _load_audio_tower(p, tokenizer)
    model = MoleModel(llava, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **audio)
    model.eval()
    return model.to(device or torch.device("cpu")), tokenizer


def _check_model_type(p: Path) -> None:
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"config.json of base checkpoint {str(p)!r} is unreadable: {e}") from e
    if model_type not in KNOWN_MODEL_TYPES:
        raise CheckpointError(
            f"base checkpoint {str(p)!r} is a {model_type!r} model; the model types supported "
            f"are: {', '.join(KNOWN_MODEL_TYPES)}. Other VLM families (qwen2_vl, idefics3, "
            "internvl, …) are not supported yet; use a LLaVA checkpoint or the cached base "
            "(leave `model.base-path` empty)")


def _check_loading_report(p: Path, report: dict) -> None:
    """Refuse a load that left any tensor at its random init or dropped any stored tensor."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in report.get(kind) or []]
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (first: {', '.join(keys[:3])})")
    if problems:
        raise CheckpointError(
            f"base checkpoint {str(p)!r} does not match LlavaForConditionalGeneration: "
            f"{'; '.join(problems)}. Training it would start from random tensors; restore the "
            "checkpoint's weight files, or delete a cached base to rebuild it")


def _check_prompt_layout(p: Path, tok: PreTrainedTokenizerBase) -> None:
    """The project's prompt is ``<image>×P instruction <sep> answer <eos>`` with its own
    word-level tokenizer and no image processor; a LLaVA-1.5-style checkpoint (a chat template,
    a CLIPImageProcessor with its own normalisation) would be silently mis-preprocessed."""
    foreign = []
    if getattr(tok, "chat_template", None):
        foreign.append("its tokenizer has a chat template")
    pre = p / "preprocessor_config.json"
    if pre.is_file():
        try:
            pre_cfg = json.loads(pre.read_text())
        except ValueError as e:
            raise CheckpointError(f"{str(pre)!r} is unreadable: {e}") from e
        kind = pre_cfg.get("image_processor_type") or pre_cfg.get("processor_class")
        if kind:
            foreign.append(f"it has its own image processor ({kind})")
    if (p / "processor_config.json").is_file() or (p / "chat_template.json").is_file() or (
            p / "chat_template.jinja").is_file():
        foreign.append("it has its own processor / chat template files")
    vocab = tok.get_vocab()
    missing = [t for t in (SEP, IMAGE) if t not in vocab]
    if missing:
        foreign.append(f"its tokenizer lacks {', '.join(missing)} (they would get random rows)")
    if foreign:
        raise CheckpointError(
            f"base checkpoint {str(p)!r} is a LLaVA model but not in this project's prompt "
            f"layout: {'; '.join(foreign)}. Checkpoints with their own processor and chat "
            "template (LLaVA-1.5 and other Hugging Face releases) are not supported yet; use the "
            "cached base (leave `model.base-path` empty) or one saved by `fedmole pretrain`")


def _load_audio_tower(p: Path, tokenizer: PreTrainedTokenizerBase) -> dict:
    """MoleModel's audio arguments from the folder (empty when the base has no audio tower)."""
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
