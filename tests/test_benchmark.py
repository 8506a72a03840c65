"""The embedded benchmark and the manifest contract: determinism, format, answers, cache.

The benchmark is written in the field's LLaVA format (``stream.toml`` + ``<task>/train.json``,
``test.json``) and read back here through the same reader as a user's data
(:mod:`protocol.llava_format`, :mod:`protocol.stream`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.config import DataConfig
from protocol.llava_format import IMAGE_MARKER, Record, TaskSamples, read_records
from protocol.manifest import (
    ManifestError,
    Sample,
    SampleRecord,
    load_samples,
    read_manifest,
    write_manifest,
)
from protocol.stream import load_stream, open_task
from simulation.benchmark import (
    COLORS,
    TASKS,
    benchmark_key,
    digits_pools,
    ensure_benchmark,
    generate_benchmark,
    list_tasks,
    task_metrics,
)
from simulation.benchmark import generate as gen_mod
from simulation.benchmark.generate import HELDOUT_FILE, PRETRAIN_FILE, STREAM_TOML
from simulation.benchmark.shapes import BACKGROUND, GRID
from simulation.benchmark.tasks import digits_data

ROOT = Path(__file__).resolve().parents[1]
WORDS = re.compile(r"^[a-z0-9]+( [a-z0-9]+)*$")


def tiny(tmp_path: Path, **kw: object) -> DataConfig:
    base = DataConfig(train_per_task=20, test_per_task=10, pretrain_size=30,
                      cache_dir=str(tmp_path / "cache"))
    return replace(base, **kw)  # type: ignore[arg-type]


def data_file(root: Path, folder: str, split: str) -> Path:
    """The data file of ``folder``'s ``split``: pretrain/train.json, <task>/train.json, …"""
    if folder == "pretrain":
        assert split == "pretrain"
        return root / PRETRAIN_FILE
    if folder == gen_mod.HELDOUT_FOLDER:
        assert split == "test"
        return root / HELDOUT_FILE
    assert split in ("train", "test")
    return root / folder / f"{split}.json"


def splits_of(folder: str) -> tuple[str, ...]:
    return (("pretrain",) if folder == "pretrain" else ("test",)
            if folder == gen_mod.HELDOUT_FOLDER else ("train", "test"))


def task_records(root: Path, folder: str, split: str | None = None) -> list[Record]:
    """The parsed records of ``folder`` (every split, train first, when ``split`` is None)."""
    return [r for sp in ((split,) if split else splits_of(folder))
            for r in read_records(data_file(root, folder, sp), root / folder).records]


def task_samples(root: Path, folder: str, split: str | None = None) -> list[Sample]:
    """The decoded samples of ``folder`` (every split, train first, when ``split`` is None)."""
    return [s for sp in ((split,) if split else splits_of(folder))
            for s in TaskSamples.read(folder if folder != gen_mod.HELDOUT_FOLDER else "pretrain",
                                      data_file(root, folder, sp), root / folder)]


def raw_records(root: Path, folder: str, split: str) -> list[dict[str, object]]:
    data = json.loads(data_file(root, folder, split).read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    return generate_benchmark(root, tiny(root))


# --- determinism -----------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes(tmp_path: Path, bench: Path) -> None:
    again = generate_benchmark(tmp_path / "again", tiny(bench))
    assert tree_bytes(again) == tree_bytes(bench)


def test_different_seed_gives_different_data(tmp_path: Path, bench: Path) -> None:
    other = generate_benchmark(tmp_path / "other", tiny(tmp_path, seed=1))
    for folder in ["pretrain", gen_mod.HELDOUT_FOLDER, *list_tasks()]:
        for split in splits_of(folder):
            a = data_file(bench, folder, split).read_bytes()
            assert a != data_file(other, folder, split).read_bytes(), (folder, split)
    img = "color/images/color-train-00000.png"
    assert (bench / img).read_bytes() != (other / img).read_bytes()


def test_a_task_does_not_depend_on_the_other_tasks(tmp_path: Path, bench: Path) -> None:
    alone = generate_benchmark(tmp_path / "alone", tiny(tmp_path, tasks=("digits",)))
    assert tree_bytes(alone / "digits") == tree_bytes(bench / "digits")


def test_generation_ignores_python_hash_seed(tmp_path: Path, bench: Path) -> None:
    code = ("import sys; from pathlib import Path; from protocol.config import DataConfig; "
            "from simulation.benchmark import generate_benchmark; "
            "generate_benchmark(Path(sys.argv[1]), DataConfig(tasks=('ground',), "
            "train_per_task=20, test_per_task=10, pretrain_size=30))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], cwd=ROOT, env=env,
                   check=True)
    assert tree_bytes(tmp_path / "sub" / "ground") == tree_bytes(bench / "ground")


# --- format ----------------------------------------------------------------------------------

def test_stream_json(bench: Path) -> None:
    stream = json.loads((bench / "stream.json").read_text())
    assert stream["tasks"] == list(DataConfig().tasks)
    assert stream["seed"] == 0 and stream["image_size"] == 32 and stream["audio_rate"] == 16000
    assert stream["task_info"]["caption"]["metrics"] == ["exact", "f1"]
    assert stream["task_info"]["arith"]["modalities"] == ["text"]
    assert stream["task_info"]["pitch"]["modalities"] == ["audio", "text"]


def test_stream_toml_lists_every_task_with_its_files(bench: Path) -> None:
    stream = load_stream(bench / STREAM_TOML, list({m for t in TASKS.values()
                                                    for m in t.metrics}))
    assert stream.names == list(DataConfig().tasks)
    for t in stream.tasks:
        assert t.train == bench / t.name / "train.json" and t.train.is_file()
        assert t.test == bench / t.name / "test.json" and t.test.is_file()
        assert t.image_root == bench / t.name
        assert t.metrics == TASKS[t.name].metrics and t.primary == TASKS[t.name].metrics[0]
        assert t.modalities == TASKS[t.name].modalities and t.max_new_tokens is None
        data = open_task(t)
        assert len(data.train) == 20 and len(data.test) == 10 and data.skipped == 0
        assert set(data.modalities()) == set(TASKS[t.name].modalities)
    assert (bench / "pretrain" / "train.json").is_file()
    assert (bench / gen_mod.HELDOUT_FOLDER / "test.json").is_file()
    assert not list(bench.rglob("manifest.jsonl"))  # the old format is gone
    assert not list(bench.rglob(".*.tmp"))  # no temp file of an atomic write left


def _modalities(r: Record) -> tuple[str, ...]:
    return (("image",) * bool(r.images) + ("audio",) * (r.audio is not None) + ("text",))


@pytest.mark.parametrize("folder", ["pretrain", *DataConfig().tasks])
def test_every_record_parses_and_loads(bench: Path, folder: str) -> None:
    records = task_records(bench, folder)
    samples = task_samples(bench, folder)
    raws = [d for sp in splits_of(folder) for d in raw_records(bench, folder, sp)]
    if folder == "pretrain":
        assert [r.id for r in records] == [f"pretrain-{i:05d}" for i in range(30)]
    else:
        assert [r.id for r in records] == ([f"{folder}-train-{i:05d}" for i in range(20)]
                                           + [f"{folder}-test-{i:05d}" for i in range(10)])
        assert records[12].id == f"{folder}-train-00012"
        assert len(task_records(bench, folder, "test")) == 10
        assert len(task_records(bench, folder, "train")) == 20
    assert len(raws) == len(records) == len(samples)
    for r, s, d in zip(records, samples, raws, strict=True):
        assert s.id == r.id == d["id"]
        assert WORDS.match(r.instruction) and WORDS.match(r.answer), r
        assert s.instruction == r.instruction and s.answer == r.answer
        assert len(r.turns) == 2 and r.answers == () and s.turns == ()
        assert len(r.images) <= 1 and not (r.images and r.audio)  # one array per sample
        human = f"{IMAGE_MARKER}\n{r.instruction}" if r.images else r.instruction
        assert d["conversations"] == [{"from": "human", "value": human},
                                      {"from": "gpt", "value": r.answer}]
        if r.images:
            assert _modalities(r) == ("image", "text") and d["image"] == f"images/{r.id}.png"
            assert "audio" not in d and r.images == (bench / folder / "images" / f"{r.id}.png",)
            assert r.images[0].is_file() and r.image_turns == (0,)
            assert s.image is not None and s.image.shape == (32, 32, 3)
            assert s.image.dtype == np.uint8 and s.audio is None
        elif r.audio is not None:
            assert _modalities(r) == ("audio", "text") and d["audio"] == f"audio/{r.id}.wav"
            assert "image" not in d and r.audio == bench / folder / "audio" / f"{r.id}.wav"
            assert s.audio is not None and s.audio.dtype == np.float32
            assert 0 < len(s.audio) <= 16000 and s.audio_rate == 16000 and s.image is None
        else:
            assert _modalities(r) == ("text",) and s.image is None and s.audio is None
            assert "image" not in d and "audio" not in d
    kinds = {m for r in records for m in _modalities(r)}
    if folder == "pretrain":
        assert kinds == {"image", "audio", "text"}
    else:
        assert all(_modalities(r) == TASKS[folder].modalities for r in records)


def test_heldout_pretraining_records_parse_and_load(bench: Path) -> None:
    records = task_records(bench, gen_mod.HELDOUT_FOLDER)
    n = DataConfig().pretrain_heldout  # tiny() keeps the default
    assert [r.id for r in records] == [f"pretrain-test-{i:05d}" for i in range(n)]
    assert all(any(r.instruction.startswith(k) for k in PRETRAIN_KINDS) for r in records)
    assert all(any(r.instruction.startswith(k) for r in records) for k in PRETRAIN_KINDS)
    for s in task_samples(bench, gen_mod.HELDOUT_FOLDER)[:50]:
        assert WORDS.match(s.instruction) and WORDS.match(s.answer), s.id
        assert s.image is None or s.image.shape == (32, 32, 3)
        assert s.audio is None or (s.audio.dtype == np.float32 and s.audio_rate == 16000)


def test_image_size_64(tmp_path: Path) -> None:
    root = generate_benchmark(tmp_path, tiny(tmp_path, image_size=64, tasks=("count", "digits"),
                                             train_per_task=3, test_per_task=2))
    for folder in ("count", "digits", "pretrain"):
        samples = task_samples(root, folder)
        assert samples and any(s.image is not None for s in samples), folder
        for s in samples:
            assert s.image is None or s.image.shape == (64, 64, 3)


PRETRAIN_KINDS = ("what shape is this", "is there a", "repeat", "what number comes after",
                  "is the digit greater than four", "is the tone high or low", "is there a sound",
                  "are there more than three beeps")


def test_pretrain_templates_differ_from_the_tasks(bench: Path) -> None:
    pre = [r.instruction for r in task_records(bench, "pretrain")]
    task_instr = {r.instruction for t in list_tasks() for r in task_records(bench, t)}
    assert not set(pre) & task_instr
    assert all(any(q.startswith(k) for k in PRETRAIN_KINDS) for q in pre)
    assert all(any(q.startswith(k) for q in pre) for k in PRETRAIN_KINDS)  # 30 hold every kind


# --- answers ---------------------------------------------------------------------------------

def bright_cells(image: np.ndarray) -> dict[int, np.ndarray]:
    """Cell index → mean RGB of its shape pixels, for cells that hold a shape."""
    cell = image.shape[0] // GRID
    out = {}
    for idx in range(GRID * GRID):
        r, c = divmod(idx, GRID)
        block = image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3)
        on = block.max(axis=1) > 100  # background is 20 ± 8, every colour has a channel ≥ 185
        if on.any():
            out[idx] = block[on].mean(axis=0)
    return out


def nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c]) - rgb) ** 2)))


def test_arith_answers(bench: Path) -> None:
    for r in task_records(bench, "arith"):
        a, op, b = r.instruction.split()[-3:]
        assert op in ("plus", "minus")
        expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
        assert expected >= 0 and r.answer == str(expected), r


def test_count_answers_match_the_drawn_shapes(bench: Path) -> None:
    for s in task_samples(bench, "count"):
        assert s.image is not None
        assert len(bright_cells(s.image)) == int(s.answer), s.id


def test_color_answers_match_the_drawn_shape(bench: Path) -> None:
    for s in task_samples(bench, "color"):
        assert s.image is not None
        cells = bright_cells(s.image)
        assert len(cells) == 1 and nearest_color(next(iter(cells.values()))) == s.answer, s.id


def test_caption_answers_list_objects_in_reading_order(bench: Path) -> None:
    for s in task_samples(bench, "caption"):
        assert s.image is not None
        m = re.fullmatch(r"a (\w+) (\w+) and a (\w+) (\w+)", s.answer)
        assert m, s.answer
        colors = [nearest_color(rgb) for _, rgb in sorted(bright_cells(s.image).items())]
        assert colors == [m.group(1), m.group(3)], s.id


def test_ground_answers_name_the_quadrant_of_the_object(bench: Path) -> None:
    for s in task_samples(bench, "ground"):
        assert s.image is not None
        color = s.instruction.split()[-2]
        cells = bright_cells(s.image)
        assert 2 <= len(cells) <= 3
        quads = {i: f"{'top' if i // GRID < 2 else 'bottom'} "
                    f"{'left' if i % GRID < 2 else 'right'}" for i in cells}
        assert len(set(quads.values())) == len(cells)  # one object per quadrant
        assert any(quads[i] == s.answer and nearest_color(rgb) == color
                   for i, rgb in cells.items()), s.id


def test_digit_pools_are_disjoint_and_cover_the_data() -> None:
    train, test = digits_pools()
    assert not set(train.tolist()) & set(test.tolist())
    assert len(train) + len(test) == 1797
    assert 0.78 < len(train) / 1797 < 0.82


def _match_digit(image: np.ndarray) -> int:
    """Index of the sklearn digit the image was drawn from (undoing the ±2 px shift)."""
    images, _ = digits_data()
    inten = (image.astype(np.float64).mean(axis=2) - BACKGROUND) / (235 - BACKGROUND)
    best, best_d = -1, np.inf
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            un = np.roll(inten, (-dy, -dx), axis=(0, 1))  # wrapped borders fall outside [1:7]
            small = un.reshape(8, 4, 8, 4).mean(axis=(1, 3))[1:7, 1:7]
            d = ((images[:, 1:7, 1:7] - small) ** 2).sum(axis=(1, 2))
            if d.min() < best_d:
                best, best_d = int(d.argmin()), float(d.min())
    return best


def test_digits_come_from_the_pool_of_their_split(bench: Path) -> None:
    _, labels = digits_data()
    train, test = (set(p.tolist()) for p in digits_pools())
    for split, pool in (("train", train), ("test", test)):
        for s in task_samples(bench, "digits", split):
            assert s.image is not None
            i = _match_digit(s.image)
            assert i in pool and str(labels[i]) == s.answer, s.id
    for s in task_samples(bench, "pretrain"):
        if s.instruction == "is the digit greater than four":
            assert s.image is not None
            i = _match_digit(s.image)
            assert i in train and s.answer == ("yes" if labels[i] > 4 else "no")


# --- registry --------------------------------------------------------------------------------

def test_registry_helpers() -> None:
    assert list_tasks() == list(TASKS) == list(DataConfig().tasks)
    assert list_tasks() == ["color", "count", "ground", "caption", "digits", "arith",
                            "pitch", "beats", "sweep"]  # the audio tasks come last
    assert task_metrics("caption") == ("exact", "f1")
    assert task_metrics("arith") == task_metrics("pitch") == ("exact",)


def test_unknown_task_names_it_and_lists_the_known(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, tasks=("color", "colour"))
    for call in (lambda: ensure_benchmark(cfg), lambda: generate_benchmark(tmp_path, cfg),
                 lambda: task_metrics("colour")):
        with pytest.raises(ValueError, match=r"'colour'.*data\.tasks.*color, count, ground"):
            call()
    assert not (tmp_path / "cache").exists()


# --- cache -----------------------------------------------------------------------------------

def test_ensure_benchmark_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    cfg = tiny(tmp_path)
    first = ensure_benchmark(cfg)
    assert first == tmp_path / "cache" / "data" / benchmark_key(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("regenerated a cached benchmark")

    monkeypatch.setattr(gen_mod, "generate_benchmark", boom)
    assert ensure_benchmark(cfg) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps


def test_cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(tmp_path)
    assert benchmark_key(cfg) == benchmark_key(replace(cfg, cache_dir="/elsewhere"))
    for change in ({"seed": 1}, {"image_size": 64}, {"tasks": ("color",)},
                   {"train_per_task": 21}, {"test_per_task": 11}, {"pretrain_size": 31}):
        assert benchmark_key(replace(cfg, **change)) != benchmark_key(cfg), change  # type: ignore[arg-type]
    monkeypatch.setenv("FEDMOLE_CACHE", str(tmp_path / "env"))
    path = ensure_benchmark(replace(cfg, cache_dir="", tasks=("arith",)))
    assert path.parent == tmp_path / "env" / "data"
    monkeypatch.delenv("FEDMOLE_CACHE")
    monkeypatch.chdir(tmp_path)
    path = ensure_benchmark(replace(cfg, cache_dir="", tasks=("arith",)))
    assert path.resolve().parent == (tmp_path / ".cache" / "fedmole" / "data").resolve()


def test_interrupted_generation_leaves_nothing_reusable(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(tmp_path, tasks=("color", "arith"))
    real = gen_mod._write_task
    calls = []

    def crash_on_second(*a: object, **k: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(gen_mod, "_write_task", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ensure_benchmark(cfg)
    data = tmp_path / "cache" / "data"
    assert list(data.iterdir()) == []  # neither a final folder nor a temp folder
    monkeypatch.undo()
    assert (ensure_benchmark(cfg) / "stream.json").is_file()


def test_leftover_temp_folders_are_ignored_then_cleaned(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, tasks=("arith",))
    data = tmp_path / "cache" / "data"
    key = benchmark_key(cfg)
    fresh, stale = data / f".{key}.tmp-fresh", data / f".{key}.tmp-stale"
    for d in (fresh, stale):  # what a killed generation leaves: a partial folder
        (d / "arith").mkdir(parents=True)
        (d / "arith" / "train.json").write_text("garbage\n")
        (d / STREAM_TOML).write_text("garbage\n")
    old = os.stat(stale).st_mtime - 2 * gen_mod.STALE_TMP_S
    os.utime(stale, (old, old))
    path = ensure_benchmark(cfg)
    assert path == data / key
    assert len(task_records(path, "arith")) == 30  # the real data, not the leftover
    assert load_stream(path / STREAM_TOML, None).names == ["arith"]
    assert fresh.exists()  # may belong to a live concurrent generation
    assert not stale.exists()


# --- manifest contract -----------------------------------------------------------------------

def record(**kw: object) -> SampleRecord:
    base = dict(id="t-train-00000", task="t", modalities=("image", "text"), instruction="q",
                answer="a", split="train", image="images/t-train-00000.npy", audio=None)
    return SampleRecord(**{**base, **kw})  # type: ignore[arg-type]


def test_record_roundtrip() -> None:
    r = record()
    assert SampleRecord.from_json(json.loads(json.dumps(r.to_json())), "x") == r


def _write_lines(folder: Path, lines: list[object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.jsonl").write_text(
        "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


@pytest.mark.parametrize("change, field, shown", [
    ({"answer": None}, "answer", "None"),
    ({"modalities": "image"}, "modalities", "'image'"),
    ({"modalities": ["image", "smell"]}, "modalities", "smell"),
    ({"split": "valid"}, "split", "'valid'"),
    ({"image": "../escape.png"}, "image", "../escape.png"),
    ({"image": None}, "image", "None"),
    ({"id": 7}, "id", "7"),
])
def test_manifest_errors_name_line_field_and_value(tmp_path: Path, change: dict[str, object],
                                                   field: str, shown: str) -> None:
    good = record().to_json()
    _write_lines(tmp_path, [good, {**good, "id": "t-train-00001", **change}])
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    msg = str(e.value)
    assert "manifest.jsonl:2" in msg and f"`{field}`" in msg and shown in msg
    assert "regenerate" in msg


def test_manifest_errors_for_missing_field_bad_json_and_duplicates(tmp_path: Path) -> None:
    good = record().to_json()
    second = {**good, "id": "t-train-00001"}
    missing = {k: v for k, v in good.items() if k != "instruction"}
    cases: list[tuple[list[object], str]] = [
        ([good, second, missing], r":3: missing field `instruction`"),
        ([good, "{not json"], r":2: not valid JSON"),
        ([good, good], r":2: field `id` must be unique \(also on line 1\)"),
    ]
    for lines, pattern in cases:
        _write_lines(tmp_path, lines)
        with pytest.raises(ManifestError, match=pattern):
            read_manifest(tmp_path)


def test_missing_manifest_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=re.escape(str(tmp_path / "manifest.jsonl"))):
        read_manifest(tmp_path)


def test_write_manifest_is_atomic_and_readable(tmp_path: Path) -> None:
    recs = [record(id=f"t-train-{i:05d}", image=None, modalities=("text",)) for i in range(3)]
    path = write_manifest(tmp_path / "t", recs)
    assert read_manifest(tmp_path / "t") == recs
    assert [p.name for p in path.parent.iterdir()] == ["manifest.jsonl"]  # no temp files left


def test_load_samples_missing_and_unreadable_files(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    write_manifest(folder, [record()])
    with pytest.raises(ManifestError, match=r"'t-train-00000'.*images/t-train-00000\.npy"):
        load_samples(folder)
    (folder / "images").mkdir()
    (folder / "images" / "bad.png").write_bytes(b"not a png")
    write_manifest(folder, [record(image="images/bad.png")])
    with pytest.raises(ManifestError, match=r"'t-train-00000'.*bad\.png"):
        load_samples(folder)


def test_load_samples_npy_png_and_audio(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    (folder / "images").mkdir(parents=True)
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    np.save(folder / "images" / "a.npy", img)
    Image.fromarray(img).save(folder / "images" / "b.png")
    np.save(folder / "images" / "c.npy", np.zeros(5, np.float32))
    write_manifest(folder, [
        record(id="a", image="images/a.npy"),
        record(id="b", image="images/b.png"),
        record(id="c", image=None, modalities=("audio", "text"), audio="images/c.npy"),
    ])
    a, b, c = load_samples(folder)
    assert np.array_equal(a.image, img) and np.array_equal(b.image, img)  # type: ignore[arg-type]
    assert c.image is None and c.audio is not None and c.audio.shape == (5,)
    assert a.audio_rate is None and c.audio_rate is None  # .npy audio carries no rate
    write_manifest(folder, [record(id="d", image=None, modalities=("audio",),
                                   audio="sound.wav")])
    with pytest.raises(ManifestError, match=r"'d'.*cannot read audio file.*sound\.wav"):
        load_samples(folder)
    write_manifest(folder, [record(id="e", image=None, modalities=("audio",),
                                   audio="sound.flac")])
    with pytest.raises(ManifestError, match=r"'e'.*sound\.flac.*must be \.wav or \.npy"):
        load_samples(folder)
