"""The Qwen2-VL families (``qwen2_vl``, ``qwen2_5_vl``): dynamic-resolution ViT → 2×2 patch
merger → Qwen2 with M-RoPE.

Images of any size are resized by the checkpoint's ``Qwen2VLImageProcessor`` to a multiple of
``patch_size × merge_size`` within [min_pixels, max_pixels] and flattened into patch rows
``pixel_values`` (ΣT·H·W, C·T_p·P·P) with one ``image_grid_thw`` (T, H, W) row per image; each
``<|image_pad|>`` of the rendered chat becomes T·H·W / merge² placeholders (what
``Qwen2VLProcessor`` does). The processor class itself is not used: it insists on a video
processor, which needs torchvision, and torchvision does not import with this torch; its text
side is this one string expansion, tested against the processor's rule in tests/test_families.py.

Positions are M-RoPE: (3, B, T) temporal/height/width ids from the model's own ``get_rope_index``
(the image's grid for its placeholders, shared 1-D ids for text), so decoding continues each
sample at its max position + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer

from mole.families.base import (
    CheckpointError,
    Family,
    VisionAdapter,
    chat_template_of,
    check_tokens,
    context_length,
    load_checked,
    register_family,
    starts_with_bos,
)
from mole.modality import ModalitySpec

IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"

# The ViT fuses q, k and v into one `qkv` Linear and names the output `proj`.
VISION = ModalitySpec("vision", r"(?:^|\.)visual\.blocks\.(?P<layer>\d+)\.attn\.(?:qkv|proj)$")
LANGUAGE = ModalitySpec(
    "language",
    r"(?:^|\.)language_model\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$")


class Qwen2VLAdapter(VisionAdapter):
    def __init__(self, hf: Any):
        cfg = hf.config
        self.image_token_id = int(cfg.image_token_id)
        self.image_marker_ids = (self.image_token_id, int(cfg.vision_start_token_id),
                                 int(cfg.vision_end_token_id))

    def image_features(self, hf: nn.Module, pixel_values: torch.Tensor,
                       extras: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        grid = extras.get("image_grid_thw")
        if grid is None:
            raise ValueError("Qwen2-VL images need their image_grid_thw rows")
        return list(hf.model.get_image_features(pixel_values, grid))  # type: ignore[operator,union-attr]

    def language_model(self, hf: nn.Module) -> nn.Module:
        return hf.model.language_model  # type: ignore[return-value,union-attr]

    def positions(self, hf: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  extras: dict[str, torch.Tensor]) -> torch.Tensor:
        pos, _ = hf.model.get_rope_index(  # type: ignore[operator,union-attr]
            input_ids=input_ids, image_grid_thw=extras.get("image_grid_thw"),
            attention_mask=attention_mask)
        return pos  # (3, B, T)


class Qwen2VLFamily(Family):
    """Qwen2-VL and Qwen2.5-VL: the same processor, prompt and M-RoPE; 2.5's ViT uses windowed
    attention and a gated MLP, its attention is still one fused ``qkv`` + ``proj``."""

    def __init__(self, name: str, model_type: str, cls_name: str):
        self.name = name
        self.model_types = (model_type,)
        self.cls_name = cls_name

    @property
    def modalities(self) -> Sequence[ModalitySpec]:
        return (VISION, LANGUAGE)

    def hf_class(self) -> type[nn.Module]:
        import transformers

        return getattr(transformers, self.cls_name)  # type: ignore[no-any-return]

    def load(self, path: Path, device: torch.device) -> tuple[Any, Any]:
        from mole.model import MoleModel

        hf = load_checked(self.hf_class(), path)
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            images = AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
        except Exception as e:
            raise CheckpointError(f"cannot load the tokenizer / image processor of {str(path)!r}: "
                                  f"{e}; a Qwen2-VL folder holds both (preprocessor_config.json)") from e
        if not hasattr(images, "merge_size"):
            raise CheckpointError(f"the image processor of {str(path)!r} is a "
                                  f"{type(images).__name__}, not Qwen2-VL's")
        chat_template_of(path, tok)
        cfg = hf.config
        check_tokens(path, tok, hf, {IMAGE_PAD: cfg.image_token_id,
                                     VISION_START: cfg.vision_start_token_id,
                                     VISION_END: cfg.vision_end_token_id})
        if images.merge_size != cfg.vision_config.spatial_merge_size or (
                images.patch_size != cfg.vision_config.patch_size):
            raise CheckpointError(
                f"the image processor of {str(path)!r} cuts {images.patch_size}-px patches merged "
                f"{images.merge_size}×{images.merge_size}, the model expects "
                f"{cfg.vision_config.patch_size} / {cfg.vision_config.spatial_merge_size}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model = MoleModel(hf, Qwen2VLAdapter(hf), self, eos_token_id=int(tok.eos_token_id),
                          pad_token_id=int(pad))
        return model.eval().to(device), Qwen2VLInputs(tok, images)

    def encoder(self, model: Any, processor: Any, max_length: int) -> Any:
        from mole.chat import ChatEncoder, MediaLayout

        return ChatEncoder(processor.tokenizer, processor, context_length(model),
                           MediaLayout(("pixel_values", "image_grid_thw")))


class Qwen2VLInputs:
    """The image half of ``Qwen2VLProcessor``: (chat text, images) → (ids, media)."""

    def __init__(self, tokenizer: Any, image_processor: Any):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def __call__(self, text: str, images: list[Image.Image]
                 ) -> tuple[list[int], dict[str, torch.Tensor]]:
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(images):
            raise ValueError(f"the rendered prompt has {len(parts) - 1} {IMAGE_PAD} for "
                             f"{len(images)} images")
        media: dict[str, torch.Tensor] = {}
        if images:
            out = self.image_processor(images=images, return_tensors="pt")
            grid = out["image_grid_thw"]  # (N_img, 3)
            merge = int(self.image_processor.merge_size) ** 2
            text = parts[0] + "".join(IMAGE_PAD * (int(g.prod()) // merge) + rest
                                      for g, rest in zip(grid, parts[1:], strict=True))
            media = {"pixel_values": out["pixel_values"], "image_grid_thw": grid}
        ids = self.tokenizer(text, add_special_tokens=not starts_with_bos(self.tokenizer, text))[
            "input_ids"]
        return list(ids), media


QWEN2_VL = register_family(Qwen2VLFamily("qwen2-vl", "qwen2_vl", "Qwen2VLForConditionalGeneration"))
QWEN2_5_VL = register_family(
    Qwen2VLFamily("qwen2.5-vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"))
