"""What a user points `model.base-path` at is checked, never silently trained at random.

The checkpoints are tiny random-init instances of real Hugging Face VLM families with their own
processors and chat templates (tests/vlm_fixtures.py). Until a family is supported, loading it
must fail loudly and say why — LlavaForConditionalGeneration itself would load a Qwen2-VL or
Idefics3 folder with a warning and every tensor at random.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mole.backbone import CheckpointError, load_backbone, save_backbone
from tests.vlm_fixtures import BUILDERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family,model_type", [("qwen2-vl", "qwen2_vl"), ("idefics3", "idefics3")])
def test_other_families_are_refused_by_model_type(family, model_type, tmp_path):
    path = BUILDERS[family](tmp_path / family)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path)
    msg = str(e.value)
    assert repr(model_type) in msg and "supported are: llava" in msg and "not supported yet" in msg


def test_llava15_layout_is_refused_not_mis_preprocessed(tmp_path):
    # A LLaVA-1.5-layout checkpoint loads into LlavaForConditionalGeneration completely, but the
    # project's prompt would give it a random <sep> row and skip its CLIP normalisation.
    path = BUILDERS["llava-1.5"](tmp_path / "llava15")
    with pytest.raises(CheckpointError) as e:
        load_backbone(path)
    msg = str(e.value)
    assert "chat template" in msg and "CLIPImageProcessor" in msg and "<sep>" in msg


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


def test_fedmole_train_on_a_foreign_family_exits_with_the_data_error(tmp_path):
    path = BUILDERS["qwen2-vl"](tmp_path / "qwen2vl")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmole_cli", "train", "--config", str(ROOT / "conf" / "tiny.toml"),
         "--out", str(tmp_path / "run"), "--quiet", "--set", f"model.base-path={path}",
         "--set", f"data.cache-dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "'qwen2_vl' model" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "metrics.json").exists()
