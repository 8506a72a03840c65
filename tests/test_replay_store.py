"""Replay store: persistence across reopen, bounds, balance, crash safety, garbage, corruption."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge.replay_store as rs
from edge.replay_store import STATE_NAME, ReplayStore, ReplayStoreError
from protocol.manifest import (
    MANIFEST_NAME,
    Sample,
    SampleRecord,
    load_samples,
    read_manifest,
    write_manifest,
    write_wav,
)

KINDS = ("image", "wav", "npy", "text")


def make(task: str, n: int, kind: str, start: int = 0) -> list[Sample]:
    """Tiny samples: 8×8 noise images, 300-sample clips (exact in 16-bit .wav), or text only."""
    rng = np.random.default_rng([sum(map(ord, task)), start])
    out = []
    for i in range(start, start + n):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) if kind == "image" else None
        audio = None
        if kind in ("wav", "npy"):
            audio = (rng.integers(-20000, 20000, 300) / 32768.0).astype(np.float32)
        out.append(Sample(id=f"{task}-{i:03d}", task=task, instruction=f"question {task}",
                          answer=f"answer {i}", image=image, audio=audio,
                          audio_rate=16000 if kind == "wav" else None))
    return out


ORIGINALS: dict[str, Sample] = {}


def offer(store: ReplayStore, task: str, n: int, kind: str, start: int = 0) -> None:
    samples = make(task, n, kind, start)
    ORIGINALS.update({s.id: s for s in samples})
    store.add(task, samples)


def same_sample(a: Sample, b: Sample) -> bool:
    def eq(x: np.ndarray | None, y: np.ndarray | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None
                                             and np.array_equal(x, y))

    return (a.id, a.task, a.instruction, a.answer, a.audio_rate) == (
        b.id, b.task, b.instruction, b.answer, b.audio_rate) and eq(a.image, b.image) and eq(
        a.audio, b.audio)


def all_samples(store: ReplayStore) -> list[Sample]:
    """Every kept sample, loaded (a draw of len(store) is without replacement)."""
    return store.sample(len(store), np.random.default_rng(0)) if len(store) else []


def array_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for sub in ("images", "audio")
            if (folder / sub).is_dir() for p in (folder / sub).iterdir()}


def referenced(folder: Path) -> set[str]:
    return {p for r in read_manifest(folder) for p in (r.image, r.audio) if p is not None}


def fingerprint(store: ReplayStore) -> tuple[Any, ...]:
    return store.keys(), store.counts(), store.seen(), store.capacity


def filled(folder: Path, capacity: int = 6, nbytes: int | None = None) -> ReplayStore:
    store = ReplayStore(folder, capacity, nbytes, seed=0)
    offer(store, "a", 10, "image")
    offer(store, "b", 10, "wav")
    return store


# -- persistence -----------------------------------------------------------------------------


def test_round_trip_across_reopen(tmp_path: Path) -> None:
    store = filled(tmp_path / "s", capacity=9)
    offer(store, "c", 7, "npy")
    offer(store, "d", 4, "text")
    again = ReplayStore(tmp_path / "s", 9, None, seed=123)  # the saved seed and RNG win
    assert fingerprint(again) == fingerprint(store) and again.nbytes() == store.nbytes()
    for s in all_samples(again):
        assert same_sample(s, ORIGINALS[s.id])
    draw = [s.id for s in store.sample(20, np.random.default_rng(5))]
    assert [s.id for s in again.sample(20, np.random.default_rng(5))] == draw
    # The keep/evict stream continues exactly: the same future adds keep the same samples.
    offer(store, "e", 30, "image")
    offer(again, "e", 30, "image")
    assert fingerprint(again) == fingerprint(store)
    assert fingerprint(ReplayStore(tmp_path / "s", 9, None, 0)) == fingerprint(store)
    # The manifest view lists exactly the kept samples and their files.
    assert {r.id for r in read_manifest(tmp_path / "s")} == {s.id for s in all_samples(store)}
    assert referenced(tmp_path / "s") == array_files(tmp_path / "s")


def test_replay_survives_loss_of_the_original_data(tmp_path: Path) -> None:
    # A task folder as an edge client holds it (docs/design.md §3), loaded with load_samples.
    from PIL import Image

    task_dir = tmp_path / "pitch"
    (task_dir / "images").mkdir(parents=True)
    (task_dir / "audio").mkdir()
    records = []
    for s in make("pitch", 3, "wav") + make("pitch", 3, "image", start=3):
        if s.audio is not None:
            write_wav(task_dir / f"audio/{s.id}.wav", s.audio, 16000)
        if s.image is not None:
            Image.fromarray(s.image).save(task_dir / f"images/{s.id}.png")
        records.append(SampleRecord(
            id=s.id, task="pitch", modalities=("audio", "text") if s.audio is not None
            else ("image", "text"), instruction=s.instruction, answer=s.answer, split="train",
            image=f"images/{s.id}.png" if s.image is not None else None,
            audio=f"audio/{s.id}.wav" if s.audio is not None else None))
    write_manifest(task_dir, records)
    loaded = {s.id: s for s in load_samples(task_dir, "train")}
    ReplayStore(tmp_path / "replay", 10, None, 0).add("pitch", list(loaded.values()))
    shutil.rmtree(task_dir)
    kept = all_samples(ReplayStore(tmp_path / "replay", 10, None, 0))
    assert len(kept) == 6 and all(same_sample(s, loaded[s.id]) for s in kept)


# -- bounds and balance ----------------------------------------------------------------------


def test_bounded_by_samples_and_balanced(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / "s", 10, None, seed=1)
    for round_ in range(3):
        for task, kind in zip("abc", KINDS, strict=False):
            offer(store, task, 7, kind, start=7 * round_)
            assert len(store) <= 10
    counts = store.counts()
    assert sum(counts.values()) == 10 and max(counts.values()) - min(counts.values()) <= 1
    assert store.seen() == {"a": 21, "b": 21, "c": 21}
    assert len(array_files(tmp_path / "s")) == counts["a"] + counts["b"] + counts["c"]


def test_bounded_by_bytes(tmp_path: Path) -> None:
    cap = 4000
    store = ReplayStore(tmp_path / "s", None, cap, seed=0)
    for task, kind in zip("abcd", KINDS, strict=True):
        offer(store, task, 12, kind)
        assert store.nbytes() <= cap
        on_disk = sum((tmp_path / "s" / p).stat().st_size for p in array_files(tmp_path / "s"))
        assert on_disk <= store.nbytes()
        counts = store.counts()
        full = [n for n in counts.values() if n]
        assert max(full) - min(full) <= 1, counts  # the byte bound keeps the balance rule
    assert store.capacity < 48  # lowered by the byte bound, and kept on reopen
    assert fingerprint(ReplayStore(tmp_path / "s", None, cap, 0)) == fingerprint(store)


def test_reopen_with_smaller_bounds_evicts(tmp_path: Path) -> None:
    filled(tmp_path / "s", capacity=6)
    small = ReplayStore(tmp_path / "s", 4, None, 0)
    assert small.counts() == {"a": 2, "b": 2} and len(array_files(tmp_path / "s")) == 4
    # A reservoir that has dropped samples cannot grow back: the capacity stays 4.
    assert ReplayStore(tmp_path / "s", 6, None, 0).capacity == 4
    tight = ReplayStore(tmp_path / "s", 4, 1500, 0)
    assert tight.nbytes() <= 1500 and len(tight) < 4


def test_sample_larger_than_byte_bound_is_rejected(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / "s", 4, 200, seed=0)
    with pytest.raises(ValueError, match=r"takes \d+ bytes, more than capacity_bytes=200"):
        offer(store, "b", 1, "wav")
    assert len(store) == 0 and array_files(tmp_path / "s") == set()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"capacity_samples, capacity_bytes or both"):
        ReplayStore(tmp_path / "s", None, None, 0)
    with pytest.raises(ValueError, match=r"`capacity_bytes` must be a positive integer"):
        ReplayStore(tmp_path / "s", 4, 0, 0)
    store = ReplayStore(tmp_path / "s", 4, None, 0)
    with pytest.raises(ValueError, match=r"of task 'b'"):
        store.add("b", make("a", 1, "text"))


# -- crash safety ----------------------------------------------------------------------------


class Crash(BaseException):
    """A simulated power cut: not an Exception, so nothing on the way catches it."""


def _wrap(calls: list[str], name: str, real: Callable[..., Any], fail_at: int | None
          ) -> Callable[..., Any]:
    def f(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        if fail_at is not None and sum(c == name for c in calls) == fail_at:
            raise Crash(f"{name} call {fail_at}")
        return real(*args, **kwargs)

    return f


# (object, attribute) pairs that one add() goes through: renames, fsyncs, deletes, .wav writes.
STEPS: list[tuple[Any, str]] = [(os, "replace"), (os, "fsync"), (os, "unlink"),
                                (rs, "write_wav")]


# With 3500 bytes the new task's second sample is written, then evicted by the byte bound.
@pytest.mark.parametrize("nbytes", [None, 3500], ids=["samples-bound", "bytes-bound"])
def test_crash_at_every_step_keeps_old_or_new_state(tmp_path: Path, nbytes: int | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    filled(base, capacity=6, nbytes=nbytes)
    new_batch = make("c", 1, "wav") + make("c", 1, "npy", start=1) + make("c", 1, "image", 2)
    ORIGINALS.update({s.id: s for s in new_batch})

    def fresh(name: str) -> Path:
        shutil.copytree(base, tmp_path / name)
        return tmp_path / name

    old = fingerprint(ReplayStore(fresh("old"), 6, nbytes, 0))
    calls: list[str] = []
    ref = ReplayStore(fresh("ref"), 6, nbytes, 0)
    with monkeypatch.context() as m:
        for obj, attr in STEPS:
            m.setattr(obj, attr, _wrap(calls, attr, getattr(obj, attr), None))
        ref.add("c", new_batch)
    new = fingerprint(ref)
    assert new != old
    n_calls = {attr: calls.count(attr) for _, attr in STEPS}
    assert n_calls["replace"] >= 3 and n_calls["unlink"] >= 1 and n_calls["write_wav"] >= 1

    outcomes = set()
    for obj, attr in STEPS:
        for i in range(1, n_calls[attr] + 1):
            folder = fresh(f"{attr}-{i}")
            store = ReplayStore(folder, 6, nbytes, 0)
            with monkeypatch.context() as m:
                m.setattr(obj, attr, _wrap([], attr, getattr(obj, attr), i))
                try:
                    store.add("c", new_batch)
                except Crash:
                    pass
            reopened = ReplayStore(folder, 6, nbytes, 0)
            state = fingerprint(reopened)
            assert state in (old, new), f"crash at {attr} #{i} left a mixed state"
            outcomes.add("new" if state == new else "old")
            for s in all_samples(reopened):  # nothing committed is lost or altered
                assert same_sample(s, ORIGINALS[s.id])
            assert referenced(folder) == array_files(folder)  # garbage collected
            assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert outcomes == {"old", "new"}


# -- garbage and corruption ------------------------------------------------------------------


def test_stray_files_removed_on_open(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    store = filled(folder)
    kept = array_files(folder)
    strays = [folder / f".{STATE_NAME}.abc123.tmp", folder / "images" / ".x.png.q1.tmp",
              folder / "images" / "a.orphan.0123456789.png", folder / "audio" / "zzz.wav"]
    for p in strays:
        p.write_bytes(b"junk")
    (folder / "notes.txt").write_text("not ours: left alone")
    again = ReplayStore(folder, 6, None, 0)
    assert fingerprint(again) == fingerprint(store)
    assert array_files(folder) == kept and not any(p.exists() for p in strays)
    assert (folder / "notes.txt").exists()


def test_lost_manifest_view_is_rewritten(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    filled(folder)
    (folder / MANIFEST_NAME).unlink()
    ReplayStore(folder, 6, None, 0)
    assert referenced(folder) == array_files(folder)


def test_corrupt_state_file_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    filled(folder)
    state = folder / STATE_NAME
    state.write_text(state.read_text()[:-40])
    with pytest.raises(ReplayStoreError, match=rf"replay state file '{state}' is corrupt"):
        ReplayStore(folder, 6, None, 0)
    d = json.loads(json.dumps({"format": "fedmole-replay-store"}))
    state.write_text(json.dumps(d))
    with pytest.raises(ReplayStoreError, match=rf"'{state}' is corrupt: expected version 1"):
        ReplayStore(folder, 6, None, 0, repair=True)  # repair never guesses a lost state


@pytest.mark.parametrize("damage", ["delete", "alter"])
def test_missing_or_altered_file_is_named_unless_repair(tmp_path: Path, damage: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "s"
    store = filled(folder)
    victim = folder / sorted(array_files(folder))[0]
    victim.unlink() if damage == "delete" else victim.write_bytes(b"\x89PNG broken")
    with pytest.raises(ReplayStoreError, match=rf"{victim.name} \((missing|contents changed)\)"):
        ReplayStore(folder, 6, None, 0)
    with caplog.at_level(logging.WARNING, logger="edge.replay_store"):
        repaired = ReplayStore(folder, 6, None, 0, repair=True)
    assert "repair dropped 1 sample" in caplog.text
    assert len(repaired) == len(store) - 1 and not victim.exists()
    offer(repaired, "c", 10, "npy")  # the repaired state is a valid buffer that keeps working
    assert sum(repaired.counts().values()) == 6
    assert fingerprint(ReplayStore(folder, 6, None, 0)) == fingerprint(repaired)


def test_refuses_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"data")
    with pytest.raises(ReplayStoreError, match=rf"no {STATE_NAME}, so it is not a replay store"):
        ReplayStore(tmp_path, 6, None, 0)
    assert (tmp_path / "images" / "x.png").exists()


def test_multi_turn_and_multi_image_samples_round_trip(tmp_path):
    """A user's multi-turn record with two images is kept whole, across a reopen."""
    import numpy as np

    from edge.replay_store import ReplayStore
    from protocol.manifest import Sample

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (6, 9, 3), dtype=np.uint8) for _ in range(2))
    s = Sample(id="m1", task="chat", instruction="look", answer="blue",
               image=a, more_images=(b,), image_turns=(0, 2),
               turns=(("user", "look"), ("assistant", "ok"), ("user", "and this?"),
                      ("assistant", "blue")))
    store = ReplayStore(tmp_path / "r", 4, None, 0)
    store.add("chat", [s])
    got = ReplayStore(tmp_path / "r", 4, None, 0).sample(1, np.random.default_rng(1))[0]
    assert got.turns == s.turns and got.image_turns == (0, 2)
    assert np.array_equal(got.image, a) and np.array_equal(got.more_images[0], b)
