"""The LLaVA family (``model_type = "llava"``): vision tower → MLP projector → causal LM.

Two prompt layouts, told apart by what the checkpoint folder holds:

* **chat** — a Hugging Face release (LLaVA-1.5 and its fine-tunes): a ``LlavaProcessor``
  (CLIP image processor with CLIP's mean/std, resize + centre crop; ``<image>`` expanded to
  ``image_seq_length`` tokens, one fewer than the patches + CLS under the ``default`` feature
  strategy) and a chat template. Samples go through both (mole.chat), loss on assistant turns.
* **fedmole** — the project's own base (``fedmole pretrain``): a word-level tokenizer with
  ``<sep>``/``<image>``/``<audio>``, no chat template, no image processor, a fixed 32-px SigLIP
  input with SigLIP's 0.5/0.5 normalisation, ``[<image>×P] instruction <sep> answer <eos>``
  (mole.batching.Encoder), optionally a Whisper audio tower beside it.

A folder that is neither (a chat template without a processor, a processor without a template,
a word tokenizer without ``<sep>``) is refused: either would be silently mis-preprocessed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from mole.audio import load_audio_extras
from mole.families.base import (
    CheckpointError,
    Family,
    VisionAdapter,
    check_tokens,
    context_length,
    load_checked,
    register_family,
    starts_with_bos,
)
from mole.modality import ModalitySpec
from mole.tokenizer import AUDIO, IMAGE, SEP

# SigLIP/CLIP towers name the attention output `out_proj`; Llama/Qwen2/Vicuna use `o_proj`.
VISION = ModalitySpec(
    "vision",
    r"(?:^|\.)vision_tower\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)$")
LANGUAGE = ModalitySpec(
    "language",
    r"(?:^|\.)language_model\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$")


class LlavaAdapter(VisionAdapter):
    def __init__(self, hf: LlavaForConditionalGeneration, extra_markers: Sequence[int] = ()):
        self.image_token_id = int(hf.config.image_token_index)
        self.image_marker_ids = (self.image_token_id, *extra_markers)

    def image_features(self, hf: nn.Module, pixel_values: torch.Tensor,
                       extras: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        cfg: Any = hf.config
        feats = hf.model.get_image_features(  # type: ignore[operator,union-attr]
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return list(feats)  # N × (P, d)

    def language_model(self, hf: nn.Module) -> nn.Module:
        return hf.model.language_model  # type: ignore[return-value,union-attr]


def _has_chat_files(p: Path, tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None)) or any(
        (p / f).is_file() for f in ("chat_template.json", "chat_template.jinja"))


def _image_processor_kind(p: Path) -> str | None:
    pre = p / "preprocessor_config.json"
    if not pre.is_file():
        return None
    try:
        cfg = json.loads(pre.read_text())
    except ValueError as e:
        raise CheckpointError(f"{str(pre)!r} is unreadable: {e}") from e
    kind = cfg.get("image_processor_type")
    return str(kind) if kind else None  # a Whisper feature extractor alone is the audio tower's


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)

    @property
    def modalities(self) -> Sequence[ModalitySpec]:
        return (VISION, LANGUAGE)

    def hf_class(self) -> type[nn.Module]:
        return LlavaForConditionalGeneration

    def load(self, path: Path, device: torch.device) -> tuple[Any, Any]:
        from mole.model import MoleModel

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load the tokenizer of {str(path)!r}: {e}") from e
        chat, kind = _has_chat_files(path, tok), _image_processor_kind(path)
        if chat or kind:
            if not (chat and kind):
                have, lack = (("a chat template", "an image processor (preprocessor_config.json)")
                              if chat else (f"an image processor ({kind})", "a chat template"))
                raise CheckpointError(
                    f"base checkpoint {str(path)!r} has {have} but lacks {lack}: its samples cannot "
                    "be preprocessed the way it was trained; save the checkpoint with its "
                    "processor (processor.save_pretrained)")
            return self._load_chat(path, device)
        hf = load_checked(LlavaForConditionalGeneration, path)
        _check_fedmole_layout(path, tok, hf)
        audio = load_audio_extras(path, tok)
        model = MoleModel(hf, LlavaAdapter(hf, [audio["audio_token_id"]] if audio else []), self,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          **audio, **fixed_image_geometry(hf))
        return model.eval().to(device), tok

    def _load_chat(self, path: Path, device: torch.device) -> tuple[Any, Any]:
        from mole.model import MoleModel

        try:
            proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load the processor of {str(path)!r}: {e}") from e
        if type(proc).__name__ != "LlavaProcessor":
            raise CheckpointError(f"base checkpoint {str(path)!r} is a LLaVA model but its "
                                  f"processor is a {type(proc).__name__}, not a LlavaProcessor")
        tok = proc.tokenizer
        if not getattr(tok, "chat_template", None):
            tok.chat_template = proc.chat_template  # saved beside the processor, not in it
        hf = load_checked(LlavaForConditionalGeneration, path)
        _check_vocab(path, tok, hf, int(hf.config.image_token_index))
        if proc.image_token_id != hf.config.image_token_index:
            raise CheckpointError(
                f"the processor of {str(path)!r} writes image token {proc.image_token_id} but the "
                f"model reads image_token_index {hf.config.image_token_index}")
        if (p := path / "audio_tower.json").is_file():
            raise CheckpointError(f"{str(p)!r}: an audio tower beside a chat-layout checkpoint "
                                  "is not supported yet")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # The geometry is fixed here too (the processor resizes every image to the tower's
        # size): the edge bundle's graphs are traced at it.
        model = MoleModel(hf, LlavaAdapter(hf), self, eos_token_id=int(tok.eos_token_id),
                          pad_token_id=int(pad), **fixed_image_geometry(hf))
        return model.eval().to(device), proc

    def encoder(self, model: Any, processor: Any, max_length: int) -> Any:
        from mole.batching import Encoder

        if not hasattr(processor, "image_processor"):  # the project's own layout
            return Encoder.for_model(processor, model, max_length)
        return chat_encoder(processor, context_length(model))


def chat_encoder(processor: Any, max_length: int) -> Any:
    """A LLaVA checkpoint's samples → tensors through its own processor and chat template (also
    what the edge runtime builds from the processor files a bundle carries)."""
    from mole.chat import ChatEncoder

    def process(text: str, images: list[Image.Image]) -> tuple[list[int], dict[str, torch.Tensor]]:
        out = processor(text=text, images=images or None, return_tensors="pt",
                        add_special_tokens=not starts_with_bos(processor.tokenizer, text))
        media = {"pixel_values": out["pixel_values"]} if images else {}
        return out["input_ids"][0].tolist(), media

    return ChatEncoder(processor.tokenizer, process, max_length)


def fixed_image_geometry(hf: Any) -> dict[str, Any]:
    """The project's fixed-size input: image size and placeholder count per image."""
    size = int(hf.config.vision_config.image_size)
    adapter = LlavaAdapter(hf)
    with torch.no_grad():
        feats = adapter.image_features(hf, torch.zeros(1, 3, size, size), {})
    return {"image_size": size, "n_image_tokens": int(feats[0].shape[0])}


def _check_vocab(p: Path, tok: Any, hf: Any, image_token: int) -> None:
    check_tokens(p, tok, hf, {})  # an eos, and no token beyond the embedding
    vocab = hf.get_input_embeddings().weight.shape[0]
    if image_token >= vocab:
        raise CheckpointError(f"image token id {image_token} is outside the vocabulary ({vocab}) "
                              f"of {str(p)!r}")


def _check_fedmole_layout(p: Path, tok: Any, hf: Any) -> None:
    """The project's prompt needs its <sep> and <image> rows (they are trained, not added)."""
    missing = [t for t in (SEP, IMAGE) if t not in tok.get_vocab()]
    if missing:
        raise CheckpointError(
            f"base checkpoint {str(p)!r} is a LLaVA model with neither a chat template and "
            f"processor nor this project's prompt layout: its tokenizer lacks {', '.join(missing)} "
            "(they would get random rows). Save it with its processor and chat template, or use "
            "a base saved by `fedmole pretrain`")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked out: any id will do
    _check_vocab(p, tok, hf, int(hf.config.image_token_index))
    if (p / "audio_tower.json").is_file() and AUDIO not in tok.get_vocab():
        raise CheckpointError(f"tokenizer of {str(p)!r} has no {AUDIO} token for its audio tower")


LLAVA = register_family(LlavaFamily())
