"""Federation config and scenario: Dirichlet splits, modality skew, client folders on disk."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.config import DataConfig
from protocol.federation import ConfigError, FederationConfig
from protocol.llava_format import DataError, TaskSamples, record_json, write_records
from protocol.manifest import Sample, write_wav
from protocol.stream import STREAM_NAME, StreamTask, TaskData, load_stream, open_task
from simulation.benchmark import generate_benchmark
from simulation.benchmark.generate import STREAM_TOML
from simulation.scenario import (
    PARTITION_FILE,
    Partition,
    PartitionError,
    apportion,
    client_modalities,
    dirichlet_split,
    load_partition,
    materialize,
    split_stream,
    task_proportions,
)

TASKS = ("color", "pitch")  # an image task and an audio task


# -- config ----------------------------------------------------------------------------------


def test_defaults_validate() -> None:
    FederationConfig().validate()


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("clients", 0, "`federation.clients` must be >= 1, got 0"),
        ("fraction", 0.0, "`federation.fraction` must be in (0, 1], got 0.0"),
        ("fraction", 1.5, "`federation.fraction` must be in (0, 1], got 1.5"),
        ("min_clients", 9, "`federation.min-clients` must be in [1, federation.clients=8], got 9"),
        ("dirichlet_alpha", 0.0, "`federation.dirichlet-alpha` must be > 0, got 0.0"),
        ("no_audio_fraction", 1.0, "`federation.no-audio-fraction` must be in [0, 1), got 1.0"),
        ("no_audio_fraction", 0.95, "`federation.no-audio-fraction` must be small enough to "
                                    "leave at least one"),
        ("no_image_fraction", -0.1, "`federation.no-image-fraction` must be in [0, 1), got -0.1"),
        ("dropout", 1.0, "`federation.dropout` must be in [0, 1), got 1.0"),
        ("rounds_per_task", 0, "`federation.rounds-per-task` must be >= 1, got 0"),
        ("local_steps", -2, "`federation.local-steps` must be >= 1, got -2"),
        ("seed", -1, "`federation.seed` must be >= 0, got -1"),
        ("min_samples", 0, "`federation.min-samples` must be >= 1, got 0"),
    ],
)
def test_validation_names_key_and_value(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        FederationConfig(**{field: value}).validate()  # type: ignore[arg-type]
    assert fragment in str(e.value)


# -- modalities ------------------------------------------------------------------------------


@pytest.mark.parametrize("clients,no_audio,no_image", [(8, 0.3, 0.0), (10, 0.5, 0.2), (5, 0.5, 0.5)])
def test_client_modalities_counts(clients: int, no_audio: float, no_image: float) -> None:
    cfg = FederationConfig(clients=clients, no_audio_fraction=no_audio,
                           no_image_fraction=no_image, min_clients=1)
    mods = client_modalities(cfg)
    assert len(mods) == clients and all("text" in m for m in mods)
    assert sum("audio" not in m for m in mods) == cfg.n_lacking("audio")
    assert sum("image" not in m for m in mods) == cfg.n_lacking("image")
    assert mods == client_modalities(cfg)  # deterministic
    assert cfg.n_lacking("audio") == int(np.floor(no_audio * clients + 0.5))  # halves round up


# -- Dirichlet split -------------------------------------------------------------------------


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_apportion_sums_exactly() -> None:
    rng = _rng()
    for _ in range(50):
        p = rng.dirichlet(np.ones(7))
        n = int(rng.integers(0, 500))
        counts = apportion(p, n)
        assert counts.sum() == n and np.all(np.abs(counts - p * n) < 1)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_every_item_assigned_exactly_once(alpha: float) -> None:
    parts = dirichlet_split(333, 9, alpha, _rng(1), min_samples=5)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(333))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


def test_deterministic_for_a_seed() -> None:
    a = dirichlet_split(200, 6, 0.5, _rng(7), min_samples=4)
    b = dirichlet_split(200, 6, 0.5, _rng(7), min_samples=4)
    c = dirichlet_split(200, 6, 0.5, _rng(8), min_samples=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_smaller_alpha_more_skew() -> None:
    def mean_max_share(alpha: float) -> float:
        shares = [max(len(p) for p in dirichlet_split(300, 10, alpha, _rng(s), min_samples=1))
                  / 300 for s in range(40)]
        return float(np.mean(shares))

    skewed, even = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.5 > 0.2 > even


def test_only_eligible_clients_get_items() -> None:
    eligible = [1, 4, 6]
    parts = dirichlet_split(120, 8, 1.0, _rng(), eligible=eligible, min_samples=1)
    assert {c for c, p in enumerate(parts) if len(p)} <= set(eligible)
    assert sum(len(p) for p in parts) == 120


@pytest.mark.parametrize("seed", range(10))
def test_min_samples_respected(seed: int) -> None:
    parts = dirichlet_split(100, 10, 0.3, _rng(seed), min_samples=12)
    sizes = [len(p) for p in parts if len(p)]
    assert sum(sizes) == 100 and min(sizes) >= 12


def test_min_samples_above_total_gives_all_to_one_client() -> None:
    parts = dirichlet_split(5, 4, 1.0, _rng(), min_samples=8)
    assert sorted(len(p) for p in parts) == [0, 0, 0, 5]


def test_no_eligible_client_names_the_task() -> None:
    with pytest.raises(ValueError, match=r"task 'pitch': no client is eligible"):
        dirichlet_split(10, 4, 0.5, _rng(), eligible=[], task="pitch")


def test_proportions_zero_outside_eligible() -> None:
    p = task_proportions(50, 5, 0.5, _rng(3), eligible=[0, 2], min_samples=1)
    assert p.sum() == pytest.approx(1.0) and p[1] == p[3] == p[4] == 0


# -- split_stream + materialize on a tiny benchmark ------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    return generate_benchmark(root, DataConfig(tasks=TASKS, train_per_task=40, test_per_task=10,
                                               pretrain_size=8))


@pytest.fixture(scope="module")
def tasks(data_root: Path) -> dict[str, TaskData]:
    """The benchmark's tasks, opened as a run opens any stream."""
    return {t.name: open_task(t) for t in load_stream(data_root / STREAM_TOML, None).tasks}


def task_samples(root: Path, task: str, split: str) -> list[Sample]:
    """The decoded samples of ``root/<task>/<split>.json`` (a benchmark or a client folder)."""
    return list(TaskSamples.read(task, root / task / f"{split}.json", root / task))


def task_ids(root: Path, task: str, split: str) -> list[str]:
    return [r.id for r in TaskSamples.read(task, root / task / f"{split}.json",
                                           root / task).records]


CFG = FederationConfig(clients=5, no_audio_fraction=0.4, dirichlet_alpha=0.5, min_samples=4,
                       seed=3)


def test_split_stream_covers_every_record(data_root: Path, tasks: dict[str, TaskData]) -> None:
    assert list(tasks) == list(TASKS)
    part = split_stream(tasks, CFG)
    assert part.tasks == TASKS
    assert part.task_counts() == {t: (40, 10) for t in TASKS}
    for t in TASKS:
        train = [i for c in part.clients_of(t) for i in part.shards[c][t].train]
        test = [i for c in part.clients_of(t) for i in part.shards[c][t].test]
        assert sorted(train) == sorted(task_ids(data_root, t, "train"))
        assert sorted(test) == sorted(task_ids(data_root, t, "test"))
        for c in part.clients_of(t):  # holders train and are evaluated on the task
            assert len(part.shards[c][t].train) >= CFG.min_samples
            assert len(part.shards[c][t].test) >= 1
    assert part.task_modalities == {"color": {"image", "text"}, "pitch": {"audio", "text"}}
    assert split_stream(tasks, CFG) == part  # deterministic


def test_clients_without_audio_get_no_audio_task(tasks: dict[str, TaskData]) -> None:
    part = split_stream(tasks, CFG)
    no_audio = [c for c, m in enumerate(part.client_modalities) if "audio" not in m]
    assert len(no_audio) == 2
    assert all("pitch" not in part.shards[c] for c in no_audio)


def test_task_with_no_eligible_client_raises(tmp_path: Path) -> None:
    # An audio-visual task, and two clients that each miss one of its modalities.
    folder = tmp_path / "av"
    (folder / "images").mkdir(parents=True)
    (folder / "audio").mkdir()
    for split in ("train", "test"):
        recs = []
        for i in range(4):
            rid = f"av-{split}-{i}"
            Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(folder / "images" / f"{rid}.png")
            write_wav(folder / "audio" / f"{rid}.wav", np.zeros(160, np.float32), 16000)
            recs.append(record_json(rid, "what do you see and hear", "a",
                                    image=f"images/{rid}.png", audio=f"audio/{rid}.wav"))
        write_records(folder / f"{split}.json", recs)
    spec = StreamTask(name="av", train=folder / "train.json", test=folder / "test.json",
                      image_root=folder, metrics=("exact",), max_new_tokens=None,
                      modalities=("image", "audio", "text"))
    data = open_task(spec)
    assert set(data.modalities()) == {"image", "audio", "text"}
    assert data.train[0].image is not None and data.train[0].audio is not None  # real files
    for modalities in (("image", "audio", "text"), None):  # declared, or read off the records
        task = open_task(dataclasses.replace(spec, modalities=modalities))
        assert set(task.modalities()) == {"image", "audio", "text"}
        cfg = next(c for c in (FederationConfig(clients=2, min_clients=1, no_image_fraction=0.5,
                                                no_audio_fraction=0.5, seed=s) for s in range(50))
                   if not any({"image", "audio"} <= m for m in client_modalities(c)))
        with pytest.raises(ValueError, match=r"task 'av': no client is eligible"):
            split_stream({"av": task}, cfg)


def test_partition_json_round_trip(tasks: dict[str, TaskData]) -> None:
    part = split_stream(tasks, CFG)
    again = Partition.from_json(json.loads(json.dumps(part.to_json())))
    assert again == part
    assert "client-04" in part.summary() and "total" in part.summary()
    with pytest.raises(PartitionError, match=r"`version` must be 1"):
        Partition.from_json({**part.to_json(), "version": 9})


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _check_client(d: Path, c: int, part: Partition, data_root: Path) -> None:
    """Client folder ``d`` holds exactly client ``c``'s shards, readable as a stream."""
    from edge.runtime import load_local_data  # the edge reader (imports the model side)

    held = part.client_tasks(c)
    names = sorted(p.name for p in d.iterdir())
    assert names == (sorted([*held, STREAM_NAME]) if held else [])
    if held:
        stream = load_stream(d / STREAM_NAME, None)
        assert stream.names == held
        for spec in stream.tasks:
            assert spec.train == d / spec.name / "train.json"
            assert spec.test == d / spec.name / "test.json"
            assert spec.image_root == d / spec.name
    local = load_local_data(d, list(TASKS))
    assert sorted(local.train) == sorted(local.test) == sorted(held)
    for t in held:
        assert {p.name for p in (d / t).iterdir()} == (
            {"train.json", "test.json", "images" if t == "color" else "audio"})
        train, test = task_samples(d, t, "train"), task_samples(d, t, "test")
        assert [s.id for s in train] == list(part.shards[c][t].train)
        assert [s.id for s in test] == list(part.shards[c][t].test)
        assert [r.id for r in local.train[t].records] == list(part.shards[c][t].train)
        assert [r.id for r in local.test[t].records] == list(part.shards[c][t].test)
        assert all((s.image is not None) == (t == "color") for s in train + test)
        assert all((s.audio is not None) == (t == "pitch") for s in train + test)
        # The same content as the benchmark's records, media at the same relative paths.
        orig = {s.id: s for sp in ("train", "test") for s in task_samples(data_root, t, sp)}
        for s in train + test:
            o = orig[s.id]
            assert (s.instruction, s.answer) == (o.instruction, o.answer)
            if t == "color":
                assert s.image is not None and o.image is not None
                assert np.array_equal(s.image, o.image)
                media = f"images/{s.id}.png"
            else:
                assert s.audio is not None and o.audio is not None
                assert np.array_equal(s.audio, o.audio) and s.audio_rate == o.audio_rate
                media = f"audio/{s.id}.wav"
            assert os.path.samefile(d / t / media, data_root / t / media)  # a hard link
        n_media = len(list((d / t / ("images" if t == "color" else "audio")).iterdir()))
        assert n_media == len(train) + len(test)  # only this client's files


def test_materialize_loads_and_is_idempotent(data_root: Path, tasks: dict[str, TaskData],
                                             tmp_path: Path) -> None:
    part = split_stream(tasks, CFG)
    out = tmp_path / "clients"
    dirs = materialize(part, tasks, out)
    assert [d.name for d in dirs] == [f"client-{c:02d}" for c in range(CFG.clients)]
    assert sorted(p.name for p in out.iterdir()) == sorted([PARTITION_FILE, *(d.name
                                                                              for d in dirs)])
    for c, d in enumerate(dirs):
        _check_client(d, c, part, data_root)
    assert load_partition(out) == part
    before = _snapshot(out)
    assert materialize(part, tasks, out) == dirs
    assert _snapshot(out) == before  # nothing rewritten

    # A crash halfway: a lost image and train.json are put back by a re-run.
    c = part.clients_of("color")[0]
    victim = next((dirs[c] / "color" / "images").iterdir())
    victim.unlink()
    (dirs[c] / "color" / "train.json").unlink()
    with pytest.raises(DataError, match=r"cannot read data file .*train\.json"):
        TaskSamples.read("color", dirs[c] / "color" / "train.json", dirs[c] / "color")
    materialize(part, tasks, out)
    assert victim.is_file()
    _check_client(dirs[c], c, part, data_root)
    assert len(task_samples(dirs[c], "color", "train")) + len(
        task_samples(dirs[c], "color", "test")) == len(part.shards[c]["color"].train) + len(
        part.shards[c]["color"].test)
    after = _snapshot(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed <= {str((dirs[c] / "color" / "train.json").relative_to(out)),
                       str(victim.relative_to(out))}  # only the lost files were written
    assert set(after) == set(before)


def test_clients_without_a_task_get_an_empty_folder(tasks: dict[str, TaskData],
                                                   tmp_path: Path) -> None:
    # Eight clients, two of them without images and without audio: they hold no task.
    cfg = FederationConfig(clients=8, no_audio_fraction=0.25, no_image_fraction=0.25,
                           dirichlet_alpha=0.5, min_samples=4, seed=0)
    part = next(p for p in (split_stream(tasks, dataclasses.replace(cfg, seed=s))
                            for s in range(50)) if any(not p.client_tasks(c)
                                                       for c in range(p.n_clients)))
    from edge.runtime import load_local_data

    dirs = materialize(part, tasks, tmp_path / "clients")
    empty = [c for c in range(part.n_clients) if not part.client_tasks(c)]
    for c in empty:
        assert list(dirs[c].iterdir()) == []  # no stream.toml for a client holding no task
        local = load_local_data(dirs[c], list(TASKS))
        assert local.train == {} and local.test == {}


def test_materialize_refuses_a_different_partition(tasks: dict[str, TaskData],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "clients"
    materialize(split_stream(tasks, CFG), tasks, out)
    other = split_stream(tasks, dataclasses.replace(CFG, seed=4))
    assert other != split_stream(tasks, CFG)
    before = _snapshot(out)
    with pytest.raises(PartitionError, match=r"already holds a different partition"):
        materialize(other, tasks, out)
    assert _snapshot(out) == before


def test_materialize_refuses_a_foreign_folder(tasks: dict[str, TaskData], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PartitionError, match=rf"holds no {PARTITION_FILE}"):
        materialize(split_stream(tasks, CFG), tasks, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
