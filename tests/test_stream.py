"""Stream files: parsed once, every bad key or value named with the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mole.scoring import known_metrics
from protocol.config import ConfigError
from protocol.stream import load_stream

GOOD = """
name = "mini"
image-root = "images"
max-new-tokens = 12

[[tasks]]
name = "sqa"
train = "sqa/train.json"
test = "sqa/test.json"
metrics = ["mc", "exact"]
max-new-tokens = 4

[[tasks]]
name = "caps"
train = "caps/train.jsonl"
test = "caps/test.jsonl"
metrics = ["cider", "bleu4"]
image-root = "caps/imgs"
modalities = ["image", "text"]
"""


@pytest.fixture()
def stream_dir(tmp_path: Path) -> Path:
    for f in ("sqa/train.json", "sqa/test.json", "caps/train.jsonl", "caps/test.jsonl"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("[]")
    (tmp_path / "s.toml").write_text(GOOD)
    return tmp_path


def test_a_stream_file_is_parsed_with_its_defaults(stream_dir):
    s = load_stream(stream_dir / "s.toml", known_metrics())
    assert s.name == "mini" and s.names == ["sqa", "caps"]
    sqa, caps = s.tasks
    assert sqa.train == stream_dir / "sqa/train.json" and sqa.metrics == ("mc", "exact")
    assert sqa.max_new_tokens == 4 and caps.max_new_tokens == 12
    assert sqa.image_root == stream_dir / "images" and caps.image_root == stream_dir / "caps/imgs"
    assert sqa.modalities is None and caps.modalities == ("image", "text")
    assert s.select(["caps"]).names == ["caps"]
    with pytest.raises(ConfigError, match=r"names \['vqa'\].*its tasks: sqa, caps"):
        s.select(["vqa"])


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('metrics = ["mc", "exact"]', 'metrics = ["accuracy"]'),
     r"tasks\[0\].metrics names \['accuracy'\]; known metrics: anls, bleu4"),
    (lambda t: t.replace('name = "caps"', 'name = "sqa"'), "task 'sqa' appears twice"),
    (lambda t: t.replace('name = "caps"', 'name = "Caps!"'), r"tasks\[1\].name"),
    (lambda t: t.replace("max-new-tokens = 4", "max-new-tokens = 0"), "an integer >= 1"),
    (lambda t: t.replace('modalities = ["image", "text"]', 'modalities = ["video"]'),
     r"tasks\[1\].modalities"),
    (lambda t: t.replace('test = "sqa/test.json"', 'test = "sqa/missing.json"'),
     r"tasks\[0\].test .*does not exist"),
    (lambda t: t.replace('test = "sqa/test.json"\n', ""), r"tasks\[0\] has no `test`"),
    (lambda t: t + "\nepochs = 3\n", r"unknown keys \['epochs'\]"),
    (lambda t: t.replace("metrics = [\"cider\"", "metric = [\"cider\"").replace(
        'metric = ["cider", "bleu4"]', 'metric = ["cider", "bleu4"]\nmetrics = ["cider"]'),
     r"tasks\[1\] has unknown keys \['metric'\]"),
    (lambda t: "tasks = 3", "`tasks` must be a non-empty list"),
    (lambda t: "[[tasks]\n", "not valid TOML"),
])
def test_bad_stream_files_are_named(stream_dir, edit, message):
    (stream_dir / "bad.toml").write_text(edit(GOOD))
    with pytest.raises(ConfigError, match=message) as e:
        load_stream(stream_dir / "bad.toml", known_metrics())
    assert "bad.toml" in str(e.value)
