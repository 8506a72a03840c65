"""The Idefics3 / SmolVLM family (``idefics3``): SigLIP tower → pixel-shuffle connector → Llama.

The checkpoint's ``Idefics3Processor`` splits a large image into tiles of the tower's size plus
one downscaled global view, and writes each tile as ``<fake_token_around_image><row_r_col_c>``
+ ``<image>`` × ``image_seq_len`` (the connector's pixel shuffle folds scale² patches into one
token). Per sample it returns ``pixel_values`` (n_tiles, 3, S, S) and ``pixel_attention_mask``
(n_tiles, S, S); the tiles of one image are counted in ``image_tiles`` (rows·cols + 1 global, or
1 for an unsplit image) so the router can pool each image's features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor

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

VISION = ModalitySpec(
    "vision",
    r"(?:^|\.)vision_model\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)$")
LANGUAGE = ModalitySpec(
    "language",
    r"(?:^|\.)text_model\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$")


class Idefics3Adapter(VisionAdapter):
    def __init__(self, hf: Any, tok: Any):
        self.image_token_id = int(hf.config.image_token_id)
        markers = [t for t in tok.get_vocab() if t.startswith("<row_") or t in (
            "<fake_token_around_image>", "<global-img>")]
        self.image_marker_ids = (self.image_token_id,
                                 *sorted(int(tok.convert_tokens_to_ids(t)) for t in markers))

    def image_features(self, hf: nn.Module, pixel_values: torch.Tensor,
                       extras: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        mask = extras.get("pixel_attention_mask")
        tiles = hf.model.get_image_features(  # type: ignore[operator,union-attr]
            pixel_values[None], None if mask is None else mask[None])  # (N_tiles, S', d)
        counts = extras.get("image_tiles")
        sizes = [pixel_values.shape[0]] if counts is None else [int(c) for c in counts]
        return [t.reshape(-1, t.shape[-1]) for t in torch.split(tiles, sizes)]  # per image

    def language_model(self, hf: nn.Module) -> nn.Module:
        return hf.model.text_model  # type: ignore[return-value,union-attr]


class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3",)

    @property
    def modalities(self) -> Sequence[ModalitySpec]:
        return (VISION, LANGUAGE)

    def hf_class(self) -> type[nn.Module]:
        from transformers import Idefics3ForConditionalGeneration
        return Idefics3ForConditionalGeneration

    def load(self, path: Path, device: torch.device) -> tuple[Any, Any]:
        from mole.model import MoleModel

        hf = load_checked(self.hf_class(), path)
        try:
            proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load the processor of {str(path)!r}: {e}") from e
        if type(proc).__name__ != "Idefics3Processor":
            raise CheckpointError(f"base checkpoint {str(path)!r} is an Idefics3 model but its "
                                  f"processor is a {type(proc).__name__}")
        tok = proc.tokenizer
        chat_template_of(path, tok, proc)
        check_tokens(path, tok, hf, {"<image>": hf.config.image_token_id})
        vc = hf.config.vision_config
        want = (vc.image_size // vc.patch_size) ** 2 // hf.config.scale_factor ** 2
        if proc.image_seq_len != want:
            raise CheckpointError(
                f"the processor of {str(path)!r} writes {proc.image_seq_len} <image> tokens per "
                f"tile, the model's connector gives {want}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model = MoleModel(hf, Idefics3Adapter(hf, tok), self, eos_token_id=int(tok.eos_token_id),
                          pad_token_id=int(pad))
        return model.eval().to(device), proc

    def encoder(self, model: Any, processor: Any, max_length: int) -> Any:
        from mole.chat import ChatEncoder, MediaLayout

        vocab = processor.tokenizer.get_vocab()
        rows = {i for t, i in vocab.items() if t.startswith("<row_")}
        glob = vocab.get("<global-img>")

        def process(text: str, images: list[Image.Image]) -> tuple[list[int], dict[str, torch.Tensor]]:
            out = processor(text=text, images=[images] if images else None, return_tensors="pt",
                            add_special_tokens=not starts_with_bos(processor.tokenizer, text))
            ids = out["input_ids"][0].tolist()
            if not images:
                return ids, {}
            # An image is its tiles (one <row_r_col_c> each) then one <global-img> view.
            tiles, seen = [], 0
            for t in ids:
                seen += t in rows
                if t == glob:
                    tiles.append(seen + 1)
                    seen = 0
            n = sum(tiles)
            if len(tiles) != len(images) or n > out["pixel_values"].shape[1]:
                raise ValueError(f"the processor wrote {len(tiles)} image blocks ({n} tiles) for "
                                 f"{len(images)} images")
            return ids, {"pixel_values": out["pixel_values"][0, :n],
                         "pixel_attention_mask": out["pixel_attention_mask"][0, :n].bool(),
                         "image_tiles": torch.tensor(tiles)}

        return ChatEncoder(processor.tokenizer, process, context_length(model),
                           MediaLayout(("pixel_values", "pixel_attention_mask", "image_tiles")))


IDEFICS3 = register_family(Idefics3Family())
