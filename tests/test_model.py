"""The shared model: modality map, mixed batches, generation, PEFT experts, local checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mole.backbone import CheckpointError, load_backbone, save_backbone
from mole.batching import Encoder
from mole.experts import ExpertModel
from mole.modality import ModalitySpec, layer_of, modality_map, register_modality
from mole.steps import generate_answers, train_steps
from tests.conftest import make_samples


def _enc(model, tok):
    return Encoder.for_model(tok, model, 64)


def test_modality_map_tags_every_attention_projection(tiny_model, tiny_cfg):
    model, _ = tiny_model
    mmap = modality_map(model)
    vision = [n for n, m in mmap.items() if m == "vision"]
    language = [n for n, m in mmap.items() if m == "language"]
    audio = [n for n, m in mmap.items() if m == "audio"]
    # q, k, v and the output projection of every layer of each tower; MLPs get none.
    assert len(vision) == 4 * tiny_cfg.model.vision_layers
    assert len(language) == 4 * tiny_cfg.model.text_layers
    assert len(audio) == 4 * tiny_cfg.model.audio_layers
    assert all(n.startswith("audio_tower.encoder.layers.") for n in audio)
    assert any(n.endswith("out_proj") for n in vision)  # SigLIP's name, not o_proj
    assert any(n.endswith("o_proj") for n in language)
    assert not any("mlp" in n or "projector" in n for n in mmap)
    assert {layer_of(n, "language") for n in language} == set(range(tiny_cfg.model.text_layers))


def test_registering_a_modality_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        register_modality(ModalitySpec("vision", r"(?P<layer>\d+)"))
    with pytest.raises(ValueError, match="capture the layer"):
        register_modality(ModalitySpec("smell", r"nose\.\d+"))


def test_mixed_image_and_text_batch_runs_and_images_matter(tiny_model):
    model, tok = tiny_model
    enc = _enc(model, tok)
    samples = make_samples(2, 2)
    b = enc.train_batch(samples)
    assert b.pixel_values is not None and b.pixel_values.shape == (2, 3, 32, 32)
    logits, loss = model(**b.model_inputs(), labels=b.labels)
    assert logits.shape[:2] == b.input_ids.shape and torch.isfinite(loss)
    # The image features really enter the sequence: another image changes the output.
    b2 = enc.train_batch(samples)
    b2.pixel_values = torch.flip(b2.pixel_values, dims=[0])
    logits2, _ = model(**b2.model_inputs(), labels=b2.labels)
    assert not torch.allclose(logits[:2], logits2[:2])
    assert torch.allclose(logits[2:], logits2[2:], atol=1e-5)  # text-only rows unaffected


def test_batch_mixing_image_audio_and_text_rows(tiny_model):
    """Each row's own inputs reach it: swapping the two clips changes only the audio rows."""
    model, tok = tiny_model
    enc = _enc(model, tok)
    samples = make_samples(1, 1, 2)  # image, text, audio c, audio e
    b = enc.train_batch(samples)
    assert b.input_features is not None and b.input_features.shape[0] == 2
    assert int((b.input_ids == model.audio_token_id).sum()) == 2 * model.n_audio_tokens
    logits, loss = model(**b.model_inputs(), labels=b.labels)
    assert torch.isfinite(loss)
    b.input_features = torch.flip(b.input_features, dims=[0])
    logits2, _ = model(**b.model_inputs())
    assert torch.allclose(logits[:2], logits2[:2], atol=1e-5)
    assert not torch.allclose(logits[2:], logits2[2:])


def test_bad_audio_is_rejected_with_its_id(tiny_model):
    model, tok = tiny_model
    enc = _enc(model, tok)
    good = make_samples(0, 0, 1)[0]
    mk = type(good)
    with pytest.raises(ValueError, match=r"long-1.*over the model's window"):
        enc.train_batch([mk(id="long-1", task="pitch", instruction="which note is played",
                            answer="c", audio=np.zeros(5 * 16000, np.float32))])
    with pytest.raises(ValueError, match=r"rate-2.*8000 Hz.*16000 Hz"):
        enc.train_batch([mk(id="rate-2", task="pitch", instruction="which note is played",
                            answer="c", audio=good.audio, audio_rate=8000)])
    with pytest.raises(ValueError, match=r"int-3.*float32"):
        enc.train_batch([mk(id="int-3", task="pitch", instruction="which note is played",
                            answer="c", audio=np.zeros(100, np.int16))])
    no_audio = Encoder(tok, model.n_image_tokens, model.image_size, 64)
    with pytest.raises(ValueError, match="no audio tower"):
        no_audio.train_batch([good])


def test_wrong_image_shape_is_rejected_with_its_id(tiny_model):
    model, tok = tiny_model
    s = make_samples(1, 0)[0]
    bad = type(s)(id="bad-7", task="color", instruction="what color", answer="red",
                  image=np.zeros((16, 16, 3), np.uint8), audio=None)
    with pytest.raises(ValueError, match=r"bad-7.*\(16, 16, 3\).*expected \(32, 32, 3\)"):
        _enc(model, tok).train_batch([bad])


def test_generation_with_cache_equals_full_recompute(tiny_model):
    """Greedy decoding with the KV cache and left padding matches step-by-step full forwards."""
    model, tok = tiny_model
    enc = _enc(model, tok)
    samples = make_samples(2, 2, 2)
    b = enc.prompt_batch(samples)
    fast = model.generate(b.input_ids, b.attention_mask, b.pixel_values, max_new_tokens=4,
                          input_features=b.input_features)
    for i, s in enumerate(samples):
        one = enc.prompt_batch([s])  # no padding at all
        ids, mask = one.input_ids, one.attention_mask
        slow = []
        for _ in range(4):
            logits, _ = model(ids, mask, one.pixel_values, input_features=one.input_features)
            nxt = int(logits[0, -1].argmax())
            if nxt == model.eos_token_id:
                break
            slow.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        assert fast[i] == slow


def test_experts_train_only_the_chosen_one_and_round_trip(tiny_model, tiny_cfg, tmp_path):
    model, tok = tiny_model
    enc = _enc(model, tok)
    mmap = modality_map(model)
    em = ExpertModel(model)
    vision = [n for n, m in mmap.items() if m == "vision"]
    language = [n for n, m in mmap.items() if m == "language"]
    em.add_expert("t0", vision + language, tiny_cfg.lora)
    em.add_expert("t1", language[:2], tiny_cfg.lora)
    em.activate(["t0", "t1"], trainable="t1")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".t1." not in n}
    # Make B non-zero so the experts change the output.
    samples = make_samples(3, 3)
    rng = np.random.default_rng(0)
    train_steps(model, lambda _: enc.train_batch([samples[i] for i in rng.integers(0, 6, 6)]),
                5, 1e-2, progress=False)
    for n, p in model.named_parameters():
        if ".t1." not in n:
            assert torch.equal(p, frozen[n]), n  # base and t0 bit-identical
    b = enc.train_batch(samples)
    with torch.no_grad():
        before, _ = model(**b.model_inputs())
    path = em.save_expert("t1", tmp_path / "experts")
    assert (path / "adapter_config.json").is_file()
    assert (path / "adapter_model.safetensors").is_file()
    # A fresh model + the saved adapter reproduces the outputs of the same active set.
    with torch.no_grad():
        with em.only(["t1"]):
            only_t1, _ = model(**b.model_inputs())
        with em.only([]):
            base_out, _ = model(**b.model_inputs())
    assert not torch.allclose(only_t1, base_out)
    saved_base = tmp_path / "base"
    em.peft.unload()  # type: ignore[union-attr]
    save_backbone(model, tok, saved_base)
    fresh, tok2 = load_backbone(saved_base)
    em2 = ExpertModel(fresh)
    em2.load_expert("t1", path)
    em2.activate(["t1"])
    with torch.no_grad():
        again, _ = fresh(**b.model_inputs())
    assert torch.allclose(again, only_t1, atol=1e-5)
    assert before.shape == again.shape


def test_unknown_and_duplicate_experts_are_rejected(tiny_model, tiny_cfg):
    model, _ = tiny_model
    em = ExpertModel(model)
    em.add_expert("e1", list(modality_map(model))[:1], tiny_cfg.lora)
    with pytest.raises(ValueError, match="already exists"):
        em.add_expert("e1", list(modality_map(model))[:1], tiny_cfg.lora)
    with pytest.raises(ValueError, match="unknown experts"):
        em.activate(["b"])


def test_local_llava_checkpoint_loads_by_path(tiny_model, tmp_path):
    """A LLaVA-family checkpoint saved with save_pretrained loads with its tokenizer."""
    model, tok = tiny_model
    save_backbone(model, tok, tmp_path / "ckpt")
    loaded, tok2 = load_backbone(tmp_path / "ckpt")
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tmp_path / "ckpt" / "preprocessor_config.json").is_file()  # the audio processor
    enc = _enc(model, tok)
    b = enc.train_batch(make_samples(2, 1, 2))
    b2 = _enc(loaded, tok2).train_batch(make_samples(2, 1, 2))  # the reloaded feature extractor
    assert torch.equal(b.input_features, b2.input_features)
    with torch.no_grad():
        a, _ = model(**b.model_inputs())
        c, _ = loaded(**b.model_inputs())
    assert torch.allclose(a, c, atol=1e-6)
    assert generate_answers(loaded, enc, make_samples(2, 1, 2), 2, 3) == generate_answers(
        model, enc, make_samples(2, 1, 2), 2, 3)


def test_corrupt_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    model, tok = tiny_model
    save_backbone(model, tok, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load base checkpoint"):
        load_backbone(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_backbone(tmp_path / "missing")
    save_backbone(model, tok, tmp_path / "ckpt2")
    (tmp_path / "ckpt2" / "audio_tower.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="audio tower"):
        load_backbone(tmp_path / "ckpt2")


def test_corrupt_adapter_is_a_clear_error(tiny_model, tiny_cfg, tmp_path):
    model, _ = tiny_model
    em = ExpertModel(model)
    em.add_expert("t0", list(modality_map(model))[:2], tiny_cfg.lora)
    path = em.save_expert("t0", tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="unreadable"):
        em.load_expert("t9", path)
    assert em.experts == ["t0"]  # nothing half-loaded


def test_an_expert_on_many_modules_knows_them_and_exports_them(tiny_cfg, tmp_path):
    # PEFT rewrites a target list of more than 20 modules as suffixes ("q_proj", …); the
    # expert's modules must still be the full names, for the plan, the factors and the export.
    import dataclasses

    from mole.backbone import build_backbone
    from mole.tokenizer import build_word_tokenizer
    from tests.conftest import WORDS

    torch.manual_seed(0)
    tok = build_word_tokenizer([WORDS])
    model = build_backbone(dataclasses.replace(tiny_cfg.model, text_layers=6), tok, 32)
    save_backbone(model, tok, tmp_path / "base")
    mods = list(modality_map(model))
    assert len(mods) > 20
    em = ExpertModel(model)
    em.add_expert("all", mods, tiny_cfg.lora)
    assert em.modules_of("all") == set(mods)
    assert {k.rpartition(".")[0] for k in em.factors("all")} == set(mods)
    folder = em.save_peft("all", tmp_path / "base", tmp_path / "peft")
    assert (folder / "adapter_model.safetensors").is_file()
    assert (folder / "audio_tower" / "adapter_model.safetensors").is_file()
