"""The LLaVA-style instruction format: records read and checked, bad data named, pixels lazy."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.llava_format import DataError, load_image, read_records


def _img(path: Path, fmt: str, size=(40, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path.name


def _write(path: Path, records: list, jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    _img(tmp_path / "imgs" / "a.jpg", "JPEG")
    _img(tmp_path / "imgs" / "b.png", "PNG")
    _img(tmp_path / "imgs" / "c.webp", "WEBP")
    return tmp_path


def test_single_multi_turn_text_only_and_several_images(folder):
    recs = [
        {"id": "1", "image": "imgs/a.jpg", "conversations": _conv("<image>\nWhat is it?", "A cat.")},
        {"id": "2", "conversations": _conv("What is 2 plus 3?", "5")},
        {"id": 3, "image": ["imgs/b.png", "imgs/c.webp"],
         "conversations": _conv("<image> <image> Which is brighter?", "The left one.",
                                "And the colour?", "Blue.")},
        {"question_id": "q4", "image": "imgs/a.jpg",
         "conversations": _conv("Describe it.", "Fine.", "<image>\nNow this?", "A dog.")},
    ]
    res = read_records(_write(folder / "data.json", recs), folder)
    a, b, c, d = res.records
    assert a.images == (folder / "imgs" / "a.jpg",) and a.instruction == "What is it?"
    assert a.answer == "A cat." and [t.role for t in a.turns] == ["user", "assistant"]
    assert b.images == () and b.instruction == "What is 2 plus 3?"
    assert c.id == "3" and len(c.images) == 2 and c.image_turns == (0, 0) and c.answer == "Blue."
    assert d.id == "q4" and d.image_turns == (2,)  # the marker's turn, not always the first
    # pixels on demand, any of the common formats, as RGB
    for p in (*a.images, *c.images):
        arr = load_image(p)
        assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


def test_jsonl_and_its_line_numbers(folder):
    path = folder / "data.jsonl"
    path.write_text(json.dumps({"id": "1", "conversations": _conv("q", "a")}) + "\n\n{broken\n")
    with pytest.raises(DataError, match=r"data.jsonl:3 is not valid JSON"):
        read_records(path)


@pytest.mark.parametrize("record,message", [
    ({"conversations": _conv("q", "a")}, "has no `id`"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "turn 0 is from 'gpt', expected human"),
    ({"id": "x", "conversations": _conv("q", "a", "q2")}, "last turn is from human"),
    ({"id": "x", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "turn 0 must be"),
    ({"id": "x", "conversations": _conv("<image> what?", "a")}, "an <image> marker without an image"),
    ({"id": "x", "image": "imgs/a.jpg", "conversations": _conv("what?", "a")},
     "an image without its <image> marker"),
    ({"id": "x", "image": "imgs/missing.png", "conversations": _conv("<image>", "a")},
     "does not exist"),
    ({"id": "x", "image": "imgs/a.gif", "conversations": _conv("<image>", "a")}, "is not one of"),
    ({"id": "x", "image": 7, "conversations": _conv("<image>", "a")}, "`image` must be a path"),
    ({"id": "x", "conversations": _conv("q", "<image> a")}, "images belong to human turns"),
    ("just a string", "must be a JSON object"),
])
def test_bad_records_are_named_with_the_file_and_id(folder, record, message):
    path = _write(folder / "bad.json", [{"id": "ok", "conversations": _conv("q", "a")}, record])
    with pytest.raises(DataError, match=message) as e:
        read_records(path, folder)
    assert "bad.json#1" in str(e.value)
    # skip: the good record stays, the bad one is reported, nothing raised
    res = read_records(path, folder, on_error="skip")
    assert [r.id for r in res.records] == ["ok"] and len(res.skipped) == 1
    assert message.split("`")[0] in res.skipped[0] or message in res.skipped[0]


def test_duplicate_ids_unreadable_files_and_empty_files(folder):
    rec = {"id": "same", "conversations": _conv("q", "a")}
    res = read_records(_write(folder / "dup.json", [rec, rec, rec]))  # UCIT: captions share ids
    assert [r.id for r in res.records] == ["same", "same#2", "same#3"] and res.renamed == 2
    (folder / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_records(folder / "x.json")
    (folder / "y.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="not a list of records"):
        read_records(folder / "y.json")
    with pytest.raises(DataError, match="no usable record"):
        read_records(_write(folder / "z.json", [{"id": "1"}]), on_error="skip")
    with pytest.raises(DataError, match="must be .json"):
        read_records(folder / "data.csv")
    (folder / "imgs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot be decoded"):
        load_image(folder / "imgs" / "broken.png")


def test_the_index_holds_no_pixels(folder):
    # 2,000 records of one 640×480 image: the index must not grow with the images' size.
    _img(folder / "imgs" / "big.png", "PNG", size=(640, 480))
    recs = [{"id": str(i), "image": "imgs/big.png", "conversations": _conv("<image> q", "a")}
            for i in range(2000)]
    path = _write(folder / "many.json", recs)
    tracemalloc.start()
    res = read_records(path, folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(res.records) == 2000
    # one decoded image is 0.9 MB; 2,000 of them would be 1.8 GB
    assert peak < 30 * 2**20, peak


# -- samples: decoded on demand -------------------------------------------------------------


def test_task_samples_decode_turns_images_refs_and_audio(folder):
    import soundfile

    from protocol.llava_format import TaskSamples, ids_of, record_to_json, references_of

    tone = (0.5 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    soundfile.write(folder / "clip.flac", tone, 8000, subtype="PCM_16")
    recs = [
        {"id": "1", "image": "imgs/a.jpg", "answers": ["cat", "a cat", "cat"],
         "conversations": _conv("<image>\nWhat is it?", "cat")},
        {"id": "2", "image": ["imgs/b.png", "imgs/c.webp"],
         "conversations": _conv("<image> <image> Which is brighter?", "The left one.",
                                "And the colour?", "Blue.")},
        {"id": "3", "audio": "clip.flac", "conversations": _conv("Which note?", "high")},
    ]
    ts = TaskSamples.read("t", _write(folder / "d.json", recs), folder)
    assert len(ts) == 3 and ids_of(ts) == ["1", "2", "3"] and ts.modalities() == [
        "image", "audio", "text"]
    a, b, c = ts[0], ts[1], ts[2]
    assert a.image.shape == (30, 40, 3) and a.turns == () and a.refs == ("cat", "a cat", "cat")
    assert a.references == ("cat", "a cat", "cat") and references_of(ts)[1] == "Blue."
    assert len(b.images) == 2 and b.image_turns == (0, 0) and b.answer == "Blue."
    assert [r for r, _ in b.turns] == ["user", "assistant", "user", "assistant"]
    assert b.instruction == "Which is brighter?"
    assert c.audio_rate == 8000 and c.audio.dtype == np.float32
    assert np.abs(c.audio - tone).max() < 1 / 2**14  # 16-bit FLAC: within a step
    # written back in the format, a record reads as itself
    again = record_to_json(ts.records[1], ["imgs/b.png", "imgs/c.webp"], None)
    back = read_records(_write(folder / "again.json", [again]), folder).records[0]
    assert back.turns == ts.records[1].turns and back.images == ts.records[1].images


def test_iterating_a_large_task_does_not_hold_its_images(folder):
    from protocol.llava_format import TaskSamples

    _img(folder / "imgs" / "big.png", "PNG", size=(320, 240))  # 230 KB decoded
    recs = [{"id": str(i), "image": "imgs/big.png", "conversations": _conv("<image> q", "a")}
            for i in range(400)]
    ts = TaskSamples.read("t", _write(folder / "many.json", recs), folder)
    tracemalloc.start()
    n = sum(int(s.image.shape[0] == 240) for s in ts)  # every image decoded once, then dropped
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 400
    assert peak < 8 * 2**20, peak  # all 400 held at once would be 92 MB


def test_question_records_and_references_kept_apart(folder):
    from protocol.llava_format import read_references

    qs = [{"question_id": 7, "image": "imgs/a.jpg", "text": "What is written?\nAnswer briefly.",
           "answer": "stop"},
          {"question_id": 8, "text": "Which option? A. cat B. dog", "answer": "B"},
          {"question_id": 9, "image": "imgs/b.png", "text": "Where is the dog?",
           "answer_bbox": [0.1, 0.2, 0.5, 0.9]},
          {"question_id": 10, "image": "imgs/c.webp", "text": "Describe the image."}]
    path = _write(folder / "q.json", qs)
    with pytest.raises(DataError, match=r"q.json#3 \(id '10'\).*needs its reference"):
        read_records(path, folder)
    (folder / "ans.json").write_text(json.dumps({"data": [
        {"question_id": 7, "answers": ["stop"] * 9 + ["stop sign"]}]}))
    (folder / "caps.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "c.webp"}],
        "annotations": [{"image_id": 1, "id": 1, "caption": "a picture"},
                        {"image_id": 1, "id": 2, "caption": "colour noise"}]}))
    coco = read_references(folder / "caps.json")
    assert coco == {"file:c.webp": ["a picture", "colour noise"]}
    a, b, c = read_records(path, folder, on_error="skip", references=folder / "ans.json").records
    assert a.images == (folder / "imgs" / "a.jpg",) and a.image_turns == (0,)
    assert a.instruction == "What is written? Answer briefly." and len(a.answers) == 10
    assert b.images == () and b.answer == "B" and b.answers == ()
    assert c.answer == "[0.1, 0.2, 0.5, 0.9]"  # a box is scored as its text (metric iou)
    d = read_records(path, folder, references=folder / "caps.json").records[3]
    assert d.answer == "a picture" and d.answers == ("a picture", "colour noise")
    (folder / "junk.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="no references in a known layout"):
        read_references(folder / "junk.json")
