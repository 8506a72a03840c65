"""Tiny random-init checkpoints of real Hugging Face VLM families, built offline.

Each builder makes the family's own model class from its config classes, a byte-level BPE
tokenizer trained here with ``tokenizers`` (with the family's special tokens and a chat template
in the family's style), the family's real processor class, and saves all of it with
``save_pretrained`` — the folder a user would point ``model.base-path`` at, only small and
random. Nothing is downloaded.

    llava-1.5 layout: CLIP tower (``default`` strategy: CLS dropped, feature layer −2) + Llama,
                      LlavaProcessor(CLIPImageProcessor) — USER/ASSISTANT template
    qwen2-vl:         Qwen2VLForConditionalGeneration, Qwen2VLProcessor (dynamic resolution,
                      ``image_grid_thw``, M-RoPE) — ChatML template
    qwen2.5-vl:       Qwen2_5_VLForConditionalGeneration (windowed ViT), the same processor
    idefics3:         Idefics3ForConditionalGeneration, Idefics3Processor (image splitting,
                      pixel-shuffle connector) — ``User:/Assistant:`` template
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "what colour is the shape in the picture", "how many shapes are there", "red green blue",
    "yellow orange purple white black", "the answer is one two three four five six seven",
    "describe the image in a few words", "a small circle next to a square and a triangle",
    "add the two numbers", "what is the next number", "which option is correct", "A B C D",
    "question answer yes no", "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


def bpe_tokenizer(special: Sequence[str], vocab_size: int = 400,
                  cls: type[PreTrainedTokenizerFast] = PreTrainedTokenizerFast, **roles: str
                  ) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS, ``special`` tokens first (ids 0..), roles by name.

    ``cls`` is the tokenizer class the family's processor insists on (Qwen2-VL's processor
    accepts only ``Qwen2TokenizerFast``)."""
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(CORPUS * 4, trainer)
    return cls(tokenizer_object=core, **roles)


# A LLaVA-1.5-style template (Vicuna USER/ASSISTANT turns, images first in a user turn);
# the assistant text is marked with {% generation %} so the processor can return the
# assistant-token mask.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ c['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}{{ ' ' }}"
    "{% else %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ c['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_llava15(path: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 layout: CLIP (30 px, 15-px patches → 4 patches + CLS; ``default`` drops the CLS,
    feature layer −2) → 2-layer MLP projector → Llama (64-d × 2)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = bpe_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], unk_token="<unk>",
                        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = LLAVA_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=30, patch_size=15,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=4)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    images = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    proc = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=15,
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                          num_additional_image_tokens=1)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _qwen_tokenizer() -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """The ChatML BPE both Qwen-VL fixtures use, and its special tokens' ids."""
    from transformers import Qwen2TokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = bpe_tokenizer(special, cls=Qwen2TokenizerFast, eos_token="<|im_end|>",
                        pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = CHATML_TEMPLATE
    return tok, {t: tok.convert_tokens_to_ids(t) for t in special}


def _qwen_lm(tok: PreTrainedTokenizerFast, ids: dict[str, int]) -> dict:
    """The Qwen2 LM (64-d × 2, M-RoPE) and token ids of both Qwen-VL configs."""
    return dict(
        text_config={"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 1024,
                     "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


def build_qwen2vl(path: Path, seed: int = 0) -> Path:
    """Qwen2-VL: ViT (32-d, 14-px patches, 2×2 merge) → Qwen2 LM (64-d × 2) with M-RoPE."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    tok, ids = _qwen_tokenizer()
    cfg = Qwen2VLConfig(
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                       "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "in_channels": 3},
        **_qwen_lm(tok, ids))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    # Qwen2VLProcessor insists on a video processor, and that one needs torchvision, which does
    # not import with this torch; the folder gets what a hub Qwen2-VL holds for images: the
    # tokenizer (chat template inside) and the image processor's preprocessor_config.json.
    model.save_pretrained(path)
    tok.save_pretrained(path)
    images.save_pretrained(path)
    return path


def build_qwen25vl(path: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: windowed-attention ViT (32-d, 14-px patches, 2×2 merge, gated MLP) → Qwen2
    LM (64-d × 2) with M-RoPE; the same image processor and chat format as Qwen2-VL."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    tok, ids = _qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "out_hidden_size": 64,
                       "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                       "window_size": 56, "fullatt_block_indexes": [1]},
        **_qwen_lm(tok, ids))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    images.save_pretrained(path)
    return path


def build_idefics3(path: Path, seed: int = 0) -> Path:
    """Idefics3 / SmolVLM: SigLIP-style tower (32 px, 8-px patches) → pixel-shuffle connector
    (scale 2) → Llama LM (64-d × 2); the processor splits large images into 32-px tiles."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
               "<fake_token_around_image>", "<global-img>", *grid]
    tok = bpe_tokenizer(special, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                        pad_token="<|endoftext|>")
    tok.chat_template = IDEFICS3_TEMPLATE
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "pad_token_id": tok.pad_token_id},
        image_token_id=image_id, scale_factor=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    images = Idefics3ImageProcessor(size={"longest_edge": 64},
                                    max_image_size={"longest_edge": 32})
    # (32/8)² patches / scale² = 4 image tokens per tile
    proc = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                             chat_template=IDEFICS3_TEMPLATE)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


BUILDERS = {"llava-1.5": build_llava15, "qwen2-vl": build_qwen2vl, "qwen2.5-vl": build_qwen25vl,
            "idefics3": build_idefics3}
