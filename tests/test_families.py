"""Hugging Face VLM families go through the checkpoint's own processor and chat template.

The checkpoints are tiny random-init instances of the real families (tests/vlm_fixtures.py):
LLaVA-1.5 layout (CLIP tower, ``default`` strategy, feature layer −2, LlavaProcessor), Qwen2-VL
(dynamic resolution, ``image_grid_thw``, M-RoPE) and Idefics3 / SmolVLM (image splitting,
pixel-shuffle connector). What a family makes of a sample is compared with what the
checkpoint's own processor makes of the same conversation; what is loaded is checked (a foreign
or incomplete checkpoint fails loudly instead of training at random).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mole.backbone import CheckpointError, load_backbone, save_backbone
from mole.batching import Encoder
from mole.chat import messages_of
from mole.modality import modality_map, modules_by_modality
from protocol.manifest import Sample
from tests.vlm_fixtures import BUILDERS

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llava-1.5", "qwen2-vl", "qwen2.5-vl", "idefics3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: BUILDERS[name](root / name) for name in FAMILIES}


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _samples() -> list[Sample]:
    return [Sample(id="a", task="t", instruction="what colour is the shape", answer="red",
                   image=_image(40, 70)),
            Sample(id="b", task="t", instruction="add the two numbers", answer="seven",
                   image=None),
            Sample(id="c", task="t", instruction="how many shapes are there", answer="three",
                   image=_image(64, 64, 1))]


def _loaded(checkpoints, name):
    model, proc = load_backbone(checkpoints[name])
    return model, proc, Encoder.for_any(proc, model, 64)


def test_llava15_gets_clip_normalisation_and_its_chat_template(checkpoints):
    model, proc, enc = _loaded(checkpoints, "llava-1.5")
    assert type(proc).__name__ == "LlavaProcessor" and model.family.name == "llava"
    s = _samples()[0]
    img = Image.fromarray(s.image)
    text = proc.apply_chat_template(messages_of(s, with_answer=False), add_generation_prompt=True)
    want = proc(text=text, images=[img], return_tensors="pt")
    ids, media = enc.encode_prompt(s)
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(media["pixel_values"], want["pixel_values"])
    # CLIP's own statistics, not SigLIP's 0.5/0.5 (the project's base) nor none at all
    assert proc.image_processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert proc.image_processor.image_std == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    # any input size → the tower's 30×30 (shortest edge resize + centre crop)
    assert tuple(media["pixel_values"].shape) == (1, 3, 30, 30)
    # no <sep> or other token was added to the checkpoint's tokenizer; the rendered prompt is
    # the template's (USER: <image>\n … ASSISTANT:), one <image> expanded to its 4 patches
    assert len(enc.tok) == len(proc.tokenizer) and "<sep>" not in enc.tok.get_vocab()
    assert ids.count(model.image_token_id) == 4 and text.endswith("ASSISTANT:")


@pytest.mark.parametrize("name", ("qwen2-vl", "qwen2.5-vl"))
def test_qwen2vl_inputs_equal_the_qwen2vl_processor(checkpoints, name):
    from transformers import Qwen2VLProcessor

    model, proc, enc = _loaded(checkpoints, name)
    # Qwen2VLProcessor needs a video processor (torchvision, which does not import with this
    # torch) to be constructed; its __call__ for images does not touch it.
    real = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    real.image_processor, real.tokenizer = proc.image_processor, proc.tokenizer
    real.image_token, real.video_token = "<|image_pad|>", "<|video_pad|>"
    real.image_token_id = proc.tokenizer.convert_tokens_to_ids(real.image_token)
    real.video_token_id = proc.tokenizer.convert_tokens_to_ids(real.video_token)
    for s in _samples():
        text = proc.tokenizer.apply_chat_template(messages_of(s, with_answer=False), tokenize=False,
                                                  add_generation_prompt=True)
        images = [Image.fromarray(s.image)] if s.image is not None else None
        want = real(text=[text], images=images, return_tensors="pt")
        ids, media = enc.encode_prompt(s)
        assert ids == want["input_ids"][0].tolist()
        if images:
            assert torch.equal(media["pixel_values"], want["pixel_values"])
            assert torch.equal(media["image_grid_thw"], want["image_grid_thw"])
    # a 40×70 image is resized to a multiple of 28 px: a (1, 2, 4) grid → 2 merged tokens
    b = enc.prompt_batch(_samples())
    assert b.extras["image_grid_thw"].tolist() == [[1, 2, 4], [1, 4, 4]]
    assert int((b.input_ids == model.image_token_id).sum()) == 2 + 4
    pos = model.positions(b.input_ids, b.attention_mask, b.extras)
    assert pos.shape == (3, 3, b.input_ids.shape[1])  # M-RoPE: temporal / height / width ids
    assert not torch.equal(pos[1], pos[2])  # the image's rows and columns get their own ids


def test_idefics3_splits_images_like_its_processor(checkpoints):
    model, proc, enc = _loaded(checkpoints, "idefics3")
    s = _samples()[2]  # 64×64 > the tower's 32 px: 2×2 tiles + one global view
    text = proc.apply_chat_template(messages_of(s, with_answer=False), add_generation_prompt=True)
    want = proc(text=text, images=[[Image.fromarray(s.image)]], return_tensors="pt")
    ids, media = enc.encode_prompt(s)
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(media["pixel_values"], want["pixel_values"][0])
    assert media["image_tiles"].tolist() == [5]
    feats = model.image_features(media["pixel_values"], {k: v for k, v in media.items()
                                                          if k != "pixel_values"})
    assert [f.shape[0] for f in feats] == [5 * 4]  # 4 tokens per tile after the pixel shuffle
    assert ids.count(model.image_token_id) == 20


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_is_on_the_assistant_turn_only(checkpoints, name):
    model, proc, enc = _loaded(checkpoints, name)
    samples = _samples()
    b = enc.train_batch(samples)
    for i, s in enumerate(samples):
        row = b.labels[i]
        answer = [int(t) for t in row[row != -100]]
        # the answer, then the template's end of turn (eos), nothing of the prompt
        assert enc.tok.decode(answer, skip_special_tokens=True).strip() == s.answer
        assert model.eos_token_id in answer
        prompt, _ = enc.encode_prompt(s)
        assert (row[:len(prompt) - 1] == -100).all()
    _, loss = model(**b.model_inputs(), labels=b.labels)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name,vision,language", [
    ("llava-1.5", 2 * 4, 2 * 4), ("qwen2-vl", 1 * 2, 2 * 4), ("qwen2.5-vl", 2 * 2, 2 * 4),
    ("idefics3", 2 * 4, 2 * 4)])
def test_modalities_find_the_family_modules(checkpoints, name, vision, language):
    model, _, _ = _loaded(checkpoints, name)
    mods = modules_by_modality(modality_map(model))
    assert len(mods["vision"]) == vision and len(mods["language"]) == language
    if name.startswith("qwen2"):  # the fused projection is a target of its own
        assert any(m.endswith("attn.qkv") for m in mods["vision"])


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_runs_through_the_family(checkpoints, name):
    model, _, enc = _loaded(checkpoints, name)
    b = enc.prompt_batch(_samples())
    out = model.generate(b.input_ids, b.attention_mask, b.pixel_values, 3, None, b.extras)
    assert len(out) == 3 and all(len(o) <= 3 for o in out)


def test_an_unsupported_model_type_names_the_known_ones(checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(checkpoints["llava-1.5"], tmp_path / "pali")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "paligemma"}))
    with pytest.raises(CheckpointError) as e:
        load_backbone(path)
    msg = str(e.value)
    assert "'paligemma'" in msg and "idefics3, llava, qwen2_5_vl, qwen2_vl" in msg


def test_a_chat_template_without_its_processor_is_refused(checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(checkpoints["llava-1.5"], tmp_path / "noproc")
    for f in ("preprocessor_config.json", "processor_config.json"):
        (path / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="a chat template but lacks an image processor"):
        load_backbone(path)


@pytest.mark.parametrize("name", ("qwen2-vl", "idefics3"))
def test_a_family_checkpoint_with_a_missing_tensor_is_refused(checkpoints, name, tmp_path):
    import shutil

    path = shutil.copytree(checkpoints[name], tmp_path / name)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors[sorted(tensors)[0]]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing keys") as e:
        load_backbone(path)
    assert "random" in str(e.value)


def test_a_checkpoint_with_a_missing_tensor_is_refused(tiny_model, tmp_path):
    model, tok = tiny_model
    save_backbone(model, tok, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(k for k in tensors if "vision_tower" in k)[0]
    del tensors[dropped]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing keys") as e:
        load_backbone(tmp_path / "ckpt")
    assert "random" in str(e.value)


def test_a_checkpoint_of_another_shape_is_refused(tiny_model, tmp_path):
    model, tok = tiny_model
    save_backbone(model, tok, tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["text_config"]["intermediate_size"] *= 2  # the stored MLP weights no longer fit
    cfg_file.write_text(json.dumps(cfg))
    # transformers refuses a size mismatch itself (unless told to ignore it); it stays refused.
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_backbone(tmp_path / "ckpt")


def test_fedmole_train_on_an_unsupported_type_exits_with_the_data_error(checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(checkpoints["llava-1.5"], tmp_path / "pali")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "paligemma"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmole_cli", "train", "--config", str(ROOT / "conf" / "tiny.toml"),
         "--out", str(tmp_path / "run"), "--quiet", "--set", f"model.base-path={path}",
         "--set", f"data.cache-dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "'paligemma' model" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "metrics.json").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fedmole_cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)


def _stock_peft(name: str, base: Path, folder: Path):
    """The family's own HF class with the adapter loaded by PEFT, and a check that every tensor
    of the adapter file landed in the model (PEFT itself only warns about missing keys)."""
    import warnings

    from peft import PeftModel

    from mole.families import family_for, read_model_type

    cls = family_for(read_model_type(base)).hf_class()
    hf = cls.from_pretrained(base, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Found missing adapter keys" would be a warning
        pm = PeftModel.from_pretrained(hf, str(folder)).eval()
    assert type(pm.base_model.model) is cls
    stored = load_file(str(folder / "adapter_model.safetensors"))
    params = dict(pm.named_parameters())
    for key, value in stored.items():
        loaded = params[key.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, value), key
    return pm


def _hf_inputs(name: str, b) -> dict:
    """A FedMoLE batch of one sample as the stock class's forward/generate kwargs."""
    kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
    if b.pixel_values is not None:
        lead = (lambda t: t[None]) if name == "idefics3" else (lambda t: t)  # (B, tiles, …)
        kw["pixel_values"] = lead(b.pixel_values)
        kw.update({k: lead(v) for k, v in b.extras.items() if k != "image_tiles"})
    return kw


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_train_simulate_and_the_experts_reload_on_the_stock_class(checkpoints, name, tmp_path):
    from mole.experts import ExpertModel

    base = checkpoints[name]
    common = ["--config", str(ROOT / "conf" / "tiny.toml"), "--quiet",
              "--set", f"model.base-path={base}", "--set", f"data.cache-dir={tmp_path / 'cache'}",
              "--set", "data.tasks=color,arith"]  # a vision task, then a text task
    train = _cli("train", "--method", "dmole", "--out", str(tmp_path / "train"), *common)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    sim = _cli("simulate", "--out", str(tmp_path / "sim"), *common)
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    for run in ("train", "sim"):
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        assert len(m["acc_matrix"]) == 2
        assert sorted(p.name for p in (tmp_path / run / "peft").iterdir()) == ["arith", "color"]

    # The centralized experts, on the stock class through PEFT, give the logits and answers
    # that FedMoLE's own model gives with the same expert active.
    model, proc = load_backbone(base)
    enc = Encoder.for_any(proc, model, 64)
    em = ExpertModel(model)
    em.load_expert("color", tmp_path / "train" / "experts" / "color")
    em.activate(["color"])
    model.eval()
    pm = _stock_peft(name, base, tmp_path / "train" / "peft" / "color")
    for s in _samples()[:2]:  # with an image and text-only
        b = enc.prompt_batch([s])
        with torch.no_grad():
            ours, _ = model(**b.model_inputs())
            theirs = pm(**_hf_inputs(name, b)).logits
        assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
        mine = model.generate(b.input_ids, b.attention_mask, b.pixel_values, 4, None, b.extras)[0]
        gen = pm.generate(**_hf_inputs(name, b), max_new_tokens=4, do_sample=False,
                          eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id)
        stock = gen[0, b.input_ids.shape[1]:].tolist()
        if model.eos_token_id in stock:
            stock = stock[:stock.index(model.eos_token_id)]
        assert mine == stock

    # The federated experts load completely too; the CLI writes the same folders for a run.
    _stock_peft(name, base, tmp_path / "sim" / "peft" / "arith")
    exp = _cli("export", "--run", str(tmp_path / "sim"), "--out", str(tmp_path / "exported"),
               "--peft")
    assert exp.returncode == 0, exp.stderr[-3000:]
    for task in ("color", "arith"):
        a = load_file(str(tmp_path / "exported" / task / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "sim" / "peft" / task / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The edge ONNX bundle is built for LLaVA layouts (fixed-resolution tower); the dynamic-
    # resolution families are refused, nothing written.
    assert _cli("keys", "--out", str(tmp_path / "keys")).returncode == 0
    bundle = _cli("export", "--run", str(tmp_path / "sim"), "--out", str(tmp_path / "bundle"),
                  "--signing-key", str(tmp_path / "keys" / "bundle.key"))
    if name == "llava-1.5":
        assert bundle.returncode == 0, bundle.stdout[-2000:] + bundle.stderr[-2000:]
        assert (tmp_path / "bundle" / "processor" / "preprocessor_config.json").is_file()
    else:
        assert bundle.returncode == 3, bundle.stdout[-2000:] + bundle.stderr[-2000:]
        assert "PEFT adapters" in bundle.stderr and not (tmp_path / "bundle").exists()


def test_an_audio_task_on_a_base_without_audio_is_a_config_error_before_any_work(checkpoints,
                                                                                 tmp_path):
    for command in ("train", "simulate"):
        proc = _cli(command, "--config", str(ROOT / "conf" / "tiny.toml"), "--quiet",
                    "--out", str(tmp_path / command),
                    "--set", f"model.base-path={checkpoints['qwen2-vl']}",
                    "--set", f"data.cache-dir={tmp_path / 'cache'}",
                    "--set", "data.tasks=color,pitch")
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "tasks ['pitch'] carry audio" in proc.stderr and "no audio tower" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / command / "metrics.json").exists()


def test_export_peft_of_a_centralized_run_points_at_its_adapters(tmp_path):
    run = tmp_path / "run"
    (run / "peft" / "color").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"config": {"model.base-path": ""}}))
    proc = _cli("export", "--run", str(run), "--out", str(tmp_path / "out"), "--peft")
    assert proc.returncode == 3, proc.stderr
    assert "not a federated run" in proc.stderr and "already PEFT adapters" in proc.stderr
