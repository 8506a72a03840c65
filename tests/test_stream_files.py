"""The shipped stream files (conf/streams/) against tiny copies of the benchmarks' layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mole.scoring import known_metrics
from protocol.llava_format import read_records
from protocol.stream import load_stream
from tests.stream_fixtures import build_coin_fixture, build_ucit_fixture

ROOT = Path(__file__).resolve().parents[1]
STREAMS = ROOT / "conf" / "streams"

# (task, primary metric) in the order of each paper's evaluation scripts (docs/streams.md).
COIN = [("scienceqa", "mc"), ("textvqa", "vqa"), ("imagenet", "exact"), ("gqa", "exact"),
        ("vizwiz", "exact"), ("grounding", "iou"), ("vqav2", "exact"), ("ocrvqa", "exact")]
UCIT = [("imagenet-r", "exact"), ("arxivqa", "exact"), ("vizwiz-caption", "cider"),
        ("iconqa", "exact"), ("clevr-math", "exact"), ("flickr30k", "cider")]
CASES = {"coin": (build_coin_fixture, COIN), "ucit": (build_ucit_fixture, UCIT)}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name)) for name, (build, _) in CASES.items()}


def test_every_shipped_stream_parses():
    files = sorted(STREAMS.glob("*.toml"))
    assert {f.stem for f in files} >= set(CASES)
    for f in files:
        stream = load_stream(f, known_metrics(), check_files=False)
        assert stream.tasks, f


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_order_and_primary_metrics(name, built):
    stream = load_stream(STREAMS / f"{name}.toml", known_metrics(), root=built[name])
    assert stream.name == name
    assert [(t.name, t.metrics[0]) for t in stream.tasks] == CASES[name][1]
    for t in stream.tasks:
        assert t.train.is_file() and t.test.is_file()
        assert t.image_root.is_dir()
        assert t.image_root.is_relative_to(built[name])
        assert 1 <= t.max_new_tokens <= 48


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_files_read(name, built):
    stream = load_stream(STREAMS / f"{name}.toml", known_metrics(), root=built[name])
    for t in stream.tasks:
        res = read_records(t.train, t.image_root)
        assert len(res.records) == 3 and not res.skipped, t.name
        assert all(r.answer for r in res.records)
        assert all(img.is_file() for r in res.records for img in r.images)


@pytest.mark.parametrize("name", sorted(CASES))
def test_test_files_match_the_benchmark_format(name, built):
    """The real test files are LLaVA eval question files; check the fixture has that shape."""
    stream = load_stream(STREAMS / f"{name}.toml", known_metrics(), root=built[name])
    for t in stream.tasks:
        data = json.loads(t.test.read_text(encoding="utf-8"))
        assert len(data) == 2, t.name
        for d in data:
            assert {"question_id", "text"} <= set(d) and "conversations" not in d
            assert "<image>" not in d["text"]
            if "image" in d:
                assert (t.image_root / d["image"]).is_file()
            if t.metrics[0] == "cider":
                refs = json.loads((t.test.parent / "val_coco_type_3000.json").read_text())
                names = [Path(x["image"]).name for x in data]
                assert [i["file_name"] for i in refs["images"]] == names
                assert [i["id"] for i in refs["images"]] == list(range(1, len(data) + 1))
            elif t.metrics[0] == "iou":
                assert "answer_bbox" in d and len(d["size"]) == 2
            else:
                assert isinstance(d["answer"], str)


@pytest.mark.parametrize("name", sorted(CASES))
def test_test_files_read(name, built):
    """The real test formats read as they are: LLaVA eval question records (question_id /
    image / text / answer), grounding boxes (answer_bbox), and references kept apart (TextVQA's
    ten answers, COCO caption annotations) joined by id or image file name."""
    stream = load_stream(STREAMS / f"{name}.toml", known_metrics(), root=built[name])
    for t in stream.tasks:
        res = read_records(t.test, t.image_root, references=t.references)
        assert len(res.records) == 2 and not res.skipped, t.name
        for r in res.records:
            assert r.turns[0].role == "user" and r.answer, (t.name, r.id)
            assert len(r.images) == r.image_turns.count(0)  # the implied image is in turn 0
            if t.references is not None:
                assert len(r.answers) >= 2 and r.answer == r.answers[0] or r.answer, t.name
            if t.metrics[0] == "iou":
                assert r.answer.startswith("[") and r.answer.count(",") == 3
        if name == "coin" and t.name == "textvqa":
            assert all(len(r.answers) == 10 for r in res.records)
        if t.name in ("vizwiz-caption", "flickr30k"):
            assert all(len(r.answers) >= 2 for r in res.records)


def test_stream_root_override_is_what_resolves(built):
    """Without data.stream-root the default root (data/CoIN next to the repo) is used."""
    stream = load_stream(STREAMS / "coin.toml", known_metrics(), check_files=False)
    assert stream.tasks[0].train.resolve() == (
        ROOT / "data" / "CoIN" / "playground" / "Instructions_Original" / "ScienceQA"
        / "train.json")
    moved = load_stream(STREAMS / "coin.toml", known_metrics(), root=built["coin"])
    assert moved.tasks[0].image_root == built["coin"] / "cl_dataset"
