"""A user's own data end to end: a folder in the field's LLaVA-style format + a stream file is
enough for `fedmole train --stream` and `fedmole simulate --stream` on a Hugging Face family."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mole.backbone import load_backbone
from mole.batching import Encoder
from protocol.config import ConfigError, load_config
from simulation.data import open_stream, open_tasks
from tests.vlm_fixtures import BUILDERS

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}

STREAM = """
name = "mini-user"
image-root = "media"
max-new-tokens = 6

[[tasks]]
name = "chat"
train = "chat/train.jsonl"
test = "chat/test.jsonl"
metrics = ["f1", "exact", "rougeL"]
max-new-tokens = 4

[[tasks]]
name = "colour-vqa"
train = "vqa/train.json"
test = "vqa/test.json"
metrics = ["vqa", "exact"]
"""


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def build_user_stream(root: Path, bad_record: bool = True) -> Path:
    """A tiny user dataset: JPEG photos under media/, a single-turn VQA task with annotator
    answers, a chat task with multi-turn, text-only and two-image records; one record of the
    VQA training file names an image that is not there."""
    rng = np.random.default_rng(0)
    (root / "media" / "photos").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        for k in range(3):
            arr = np.clip(np.array(rgb) + rng.integers(-20, 20, (28, 36, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / "media" / "photos" / f"{name}{k}.jpg",
                                                       format="JPEG")
    vqa = [{"id": f"v{name}{k}", "image": f"photos/{name}{k}.jpg",
            "conversations": _conv("<image>\nWhat colour is the picture?", name)}
           for name in COLOURS for k in range(2)]
    if bad_record:
        vqa.append({"id": "v-missing", "image": "photos/nowhere.jpg",
                    "conversations": _conv("<image>\nWhat colour?", "red")})
    test = [{"id": f"t{name}", "image": f"photos/{name}2.jpg", "answers": [name] * 3 + ["dark"],
             "conversations": _conv("<image>\nWhat colour is the picture?", name)}
            for name in COLOURS]
    (root / "vqa").mkdir()
    (root / "vqa" / "train.json").write_text(json.dumps(vqa))
    (root / "vqa" / "test.json").write_text(json.dumps(test))
    chat = [
        {"id": "c1", "conversations": _conv("Say hello.", "hello", "Say it again.", "hello")},
        {"id": "c2", "image": ["photos/red0.jpg", "photos/blue0.jpg"],
         "conversations": _conv("<image><image>\nTwo pictures: which colours?", "red and blue")},
        {"id": "c3", "image": "photos/green0.jpg",
         "conversations": _conv("Look.", "ok", "<image>\nAnd now?", "green")},
        {"id": "c4", "conversations": _conv("Count to two.", "one two")},
    ]
    (root / "chat").mkdir()
    (root / "chat" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (root / "chat" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat[:2]))
    (root / "stream.toml").write_text(STREAM)
    return root / "stream.toml"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return BUILDERS["qwen2-vl"](tmp_path_factory.mktemp("fam") / "qwen2-vl")


def test_a_stream_file_sets_the_tasks_and_needs_a_checkpoint(tmp_path, qwen):
    stream = build_user_stream(tmp_path / "data")
    with pytest.raises(ConfigError, match="needs `model.base-path`"):
        load_config(None, {"data.stream": str(stream)})
    cfg = load_config(ROOT / "conf" / "tiny.toml", {"data.stream": str(stream),
                                                    "model.base-path": str(qwen)})
    assert cfg.data.tasks == ("chat", "colour-vqa")  # tiny.toml's built-in list is not used
    with pytest.raises(ConfigError, match="must follow the stream's order"):
        open_stream(load_config(None, {"data.stream": str(stream), "model.base-path": str(qwen),
                                       "data.tasks": "colour-vqa,chat"}))
    from protocol.llava_format import DataError

    with pytest.raises(DataError, match=r"nowhere.jpg.*does not exist.*data.on-error"):
        open_tasks(cfg)
    skip = load_config(None, {"data.stream": str(stream), "model.base-path": str(qwen),
                              "data.on-error": "skip"})
    data = open_tasks(skip)
    assert len(data["colour-vqa"].train) == 6 and data["colour-vqa"].skipped == 1
    assert data["chat"].modalities() == ["image", "text"]


def test_multi_turn_and_two_image_records_go_through_the_checkpoint_template(tmp_path, qwen):
    stream = build_user_stream(tmp_path / "data", bad_record=False)
    cfg = load_config(None, {"data.stream": str(stream), "model.base-path": str(qwen)})
    chat = open_tasks(cfg)["chat"].train
    model, proc = load_backbone(qwen)
    enc = Encoder.for_any(proc, model, 512)
    b = enc.train_batch([chat[0], chat[1], chat[2]])
    assert b.pixel_values is not None and b.extras["image_grid_thw"].shape[0] == 3  # 0 + 2 + 1
    tok = proc.tokenizer
    for row, s in zip(range(3), (chat[0], chat[1], chat[2]), strict=True):
        lab = b.labels[row][b.labels[row] >= 0].tolist()
        text = tok.decode(lab)
        # every assistant turn is learnt, nothing of the user's
        for role, t in s.conversation:
            assert (t in text) == (role == "assistant"), (s.id, role, t, text)
    # the prompt ends at the last answer: earlier turns and both images are in it
    p = enc.prompt_batch([chat[0]])
    assert "hello" in tok.decode(p.input_ids[0]) and "again" in tok.decode(p.input_ids[0])
    assert torch.equal(p.attention_mask.sum(), p.attention_mask.sum())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmole_cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_fedmole_train_and_simulate_run_a_user_stream(tmp_path, qwen):
    stream = build_user_stream(tmp_path / "data")
    common = ["--stream", str(stream), "--config", str(ROOT / "conf" / "tiny.toml"), "--quiet",
              "--set", f"model.base-path={qwen}", "--set", "data.on-error=skip",
              "--set", f"data.cache-dir={tmp_path / 'cache'}", "--set", "federation.clients=2",
              "--set", "federation.min-clients=1", "--set", "federation.min-samples=1"]
    train = _cli("train", "--method", "dmole", "--out", str(tmp_path / "train"), *common)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    sim = _cli("simulate", "--out", str(tmp_path / "sim"), *common)
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    for run in ("train", "sim"):
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        # chat (multi-turn, two-image records) first: the replay buffer keeps them whole
        assert m["tasks"] == ["chat", "colour-vqa"] and len(m["acc_matrix"]) == 2
        assert m["data"]["skipped"] == 1 and "nowhere.jpg" in m["data"]["skipped_records"][0]
        assert m["data"]["tasks"]["chat"]["primary"] == "f1"
        assert sorted(p.name for p in (tmp_path / run / "peft").iterdir()) == ["chat",
                                                                              "colour-vqa"]
    for run in ("train", "sim"):  # every metric of every task; the matrix holds the primary
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        assert set(m["task_scores"]["colour-vqa"]) == {"vqa", "exact"}, run
        assert set(m["task_scores"]["chat"]) == {"f1", "exact", "rougeL"}, run
        assert m["acc_matrix"][-1][0] == pytest.approx(m["task_scores"]["chat"]["f1"], abs=0.051)
    # each client's folder is a stream in the same format: its tasks, its records, the metrics
    client = next(p for p in sorted((tmp_path / "sim" / "clients").iterdir())
                  if (p / "stream.toml").is_file())
    from edge.runtime import load_local_data

    local = load_local_data(client, ["chat", "colour-vqa"])
    assert local.train and all(local.primary(t) in ("vqa", "f1") for t in local.train)
