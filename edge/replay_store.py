"""The replay buffer persisted on the device: kept samples survive restarts, crashes and the loss
of the task's original data.

A :class:`ReplayStore` owns a :class:`~edge.replay.BalancedReservoirBuffer` whose items are
sample keys, plus a copy of every kept sample in its folder::

    FOLDER/replay_state.json    the commit point: buffer state (with its RNG), the byte-eviction
                                RNG, and one entry per kept sample (record, size, sha256 per file)
    FOLDER/manifest.jsonl       a view of the kept samples in the format of protocol.manifest
                                (one SampleRecord line each, plus `key`, `nbytes`, `sha256`),
                                rewritten from the state; not read back
    FOLDER/images/<key>.png     (H, W, 3) uint8 (a multi-image sample's others: <key>.<k>.png)
    FOLDER/audio/<key>.wav      mono 16-bit PCM (samples that came with a rate), or
    FOLDER/audio/<key>.npy      float32 (T,) (samples without one: already at the model's rate)

**Writes.** ``add`` first writes each newly kept sample's arrays under a temp name (fsync) and
renames them into place, then replaces the state file (temp file in the same folder + fsync +
``os.replace``: the commit), then rewrites the manifest view the same way, and only then deletes
the files of evicted samples. A crash anywhere before the state's ``os.replace`` leaves the old
state, and the files it references untouched; anywhere after, the new one. Files that the
committed state does not reference (new arrays of a crashed ``add``, temp files, evicted
samples not yet deleted) are garbage and are removed when the store is opened. A committed
state that references a missing or altered file is an error naming the file, unless the store
is opened with ``repair=True``, which drops those samples and logs them.

**Bounds.** The sample bound is the buffer's capacity (even quotas per task, reservoir within a
task; see :mod:`edge.replay`). The optional byte bound (``capacity_bytes``; a sample's bytes are
its array files on disk plus its UTF-8 text) is enforced *through* the balance rule rather than
beside it: while the kept samples exceed it, the buffer's sample capacity is lowered one slot at
a time and the task whose quota shrinks evicts a uniformly random sample. The task that loses a
slot is always a largest one, so tasks stay within one sample of each other where they are full,
and each stays a uniform subset of what it was offered. The lowered capacity is kept (a ratchet):
a reservoir cannot grow back once it has dropped samples, so later tasks share the lowered
capacity even if their samples are smaller. A single sample larger than ``capacity_bytes`` is
rejected.

One process per folder; the store takes no lock.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edge.replay import BalancedReservoirBuffer, task_quotas

# Loaders of one array file; shared with load_samples so both read files the same way.
from protocol.llava_format import TaskSamples, ids_of
from protocol.manifest import (
    MANIFEST_NAME,
    MODALITIES,
    ManifestError,
    Sample,
    SampleRecord,
    write_wav,
)
from protocol.manifest import load_audio as _read_audio_file
from protocol.manifest import load_image as _read_image_file

STATE_NAME = "replay_state.json"
STORE_FORMAT = "fedmole-replay-store"
STORE_VERSION = 1
UNBOUNDED = 2**31 - 1  # the buffer's sample capacity when only bytes bound the store
_SUBDIRS = ("images", "audio")
_STATE_KEYS = {"format", "version", "capacity_samples", "capacity_bytes", "buffer", "evict_rng",
               "samples"}
_log = logging.getLogger(__name__)


class ReplayStoreError(ValueError):
    """The store folder or its state is unusable; the message names the file and the next step."""


def sample_key(task: str, sample_id: str) -> str:
    """A file-name-safe key, unique per (task, sample id): ``<task>.<id>.<sha1[:10]>``."""
    digest = hashlib.sha1(f"{task}\0{sample_id}".encode()).hexdigest()[:10]

    def slug(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "_", s)[:60]

    return f"{slug(task)}.{slug(sample_id)}.{digest}"


@dataclass(frozen=True)
class _Entry:
    """A kept sample on disk: its record (paths relative to the folder), size and file hashes."""

    key: str
    record: SampleRecord
    nbytes: int
    sha256: Mapping[str, str]  # relative path → hex digest

    def files(self) -> list[str]:
        return [p for p in (self.record.image, *self.record.more_images, self.record.audio)
                if p is not None]

    def to_json(self) -> dict[str, Any]:
        return {**self.record.to_json(), "key": self.key, "nbytes": self.nbytes,
                "sha256": dict(self.sha256)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> _Entry:
        try:
            record = SampleRecord.from_json(d, where)
        except ManifestError as e:
            raise ReplayStoreError(str(e)) from e
        key, nbytes, sha = d.get("key"), d.get("nbytes"), d.get("sha256")
        if not isinstance(key, str) or key != sample_key(record.task, record.id):
            raise ReplayStoreError(f"{where}: `key` must be the sample's key "
                                   f"{sample_key(record.task, record.id)!r}, got {key!r}")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ReplayStoreError(f"{where}: `nbytes` must be an integer >= 0, got {nbytes!r}")
        files = [p for p in (record.image, *record.more_images, record.audio) if p is not None]
        if not isinstance(sha, dict) or set(sha) != set(files) or not all(
                isinstance(v, str) for v in sha.values()):
            raise ReplayStoreError(f"{where}: `sha256` must map each array file {files} to its "
                                   f"digest, got {sha!r}")
        for rel in files:  # only files inside images/ and audio/ are ever written or deleted
            parts = PurePosixPath(rel).parts
            if len(parts) != 2 or parts[0] not in _SUBDIRS or not parts[1].startswith(key + "."):
                raise ReplayStoreError(f"{where}: array path {rel!r} must be images/ or audio/ "
                                       f"followed by {key}.<ext>")
        return cls(key, record, nbytes, dict(sha))


# -- small file helpers ----------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a fresh temp file ``folder/.<name>.*.tmp``, fsync'd; return its path."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: temp file beside it, fsync, ``os.replace``, fsync the folder."""
    tmp = _write_tmp(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


# -- state-level eviction (keeps edge.replay's invariants: tasks over quota are cut to it) ----


def _evict_to(state: dict[str, Any], capacity: int, rng: np.random.Generator) -> list[str]:
    """Set ``state``'s capacity, evicting uniformly at random down to the new quotas."""
    evicted: list[str] = []
    tasks = state["tasks"]
    for t, q in zip(tasks, task_quotas(capacity, len(tasks)) if tasks else [], strict=True):
        items = t["items"]
        while len(items) > q:
            evicted.append(items.pop(int(rng.integers(len(items)))))
    state["capacity"] = capacity
    return evicted


def _keys_of(state: dict[str, Any]) -> list[str]:
    """Distinct keys the buffer state holds, in buffer order."""
    return list(dict.fromkeys(k for t in state["tasks"] for k in t["items"]))


class ReplayStore:
    """A replay buffer of samples kept on disk in ``folder`` (see the module docstring).

    ``capacity_samples``: the buffer's sample capacity (``replay.buffer-size``); None → bounded
    by ``capacity_bytes`` only. ``seed`` seeds a new store; an existing one continues its saved
    random streams. Reopening with a smaller ``capacity_samples`` or ``capacity_bytes`` evicts
    down to it; a larger ``capacity_samples`` is adopted only if no task has dropped a sample.
    """

    def __init__(self, folder: Path, capacity_samples: int | None, capacity_bytes: int | None,
                 seed: int, *, repair: bool = False) -> None:
        for name, v in (("capacity_samples", capacity_samples),
                        ("capacity_bytes", capacity_bytes)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"replay store `{name}` must be a positive integer or None, "
                                 f"got {v!r}")
        if capacity_samples is None and capacity_bytes is None:
            raise ValueError("replay store needs capacity_samples, capacity_bytes or both; "
                             "an unbounded buffer would fill the device")
        self.folder = Path(folder)
        self.capacity_samples = capacity_samples
        self.capacity_bytes = capacity_bytes
        self.state_path = self.folder / STATE_NAME
        requested = capacity_samples or UNBOUNDED
        if self.state_path.is_file():
            buf, entries, rng = self._read_state()
            self._buf, self._entries, self._evict_rng = buf, entries, rng
            state, dirty = self._reconcile(repair)
        else:
            self._check_new_folder()
            self._buf = BalancedReservoirBuffer(requested, seed)
            self._entries = {}
            self._evict_rng = np.random.default_rng([seed, 1])
            state, dirty = self._buf.state_dict(), True
        self._collect_garbage()
        if dirty:
            buf = BalancedReservoirBuffer.from_state_dict(state)
            self._commit(buf, {k: self._entries[k] for k in _keys_of(state)}, self._evict_rng,
                         old=self._entries)
        self._write_view(only_if_changed=True)

    # -- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._buf)

    def counts(self) -> dict[str, int]:
        """Samples kept per task (arrival order)."""
        return self._buf.counts()

    def tasks(self) -> list[str]:
        return self._buf.tasks()

    def seen(self) -> dict[str, int]:
        """Samples ever offered per task."""
        return self._buf.seen()

    @property
    def capacity(self) -> int:
        """The buffer's current sample capacity (below ``capacity_samples`` once bytes bound it)."""
        return self._buf.capacity

    def nbytes(self) -> int:
        """Bytes of the kept samples (array files on disk + UTF-8 text), each counted once."""
        return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[str]:
        """Distinct keys of the kept samples, in buffer order."""
        return _keys_of(self._buf.state_dict())

    def sample(self, n: int, rng: np.random.Generator) -> list[Sample]:
        """``n`` samples drawn as :meth:`BalancedReservoirBuffer.sample` draws, loaded from disk."""
        return [self._load(k) for k in self._buf.sample(n, rng)]

    def _load(self, key: str) -> Sample:
        e = self._entries[key]
        r = e.record
        image = audio = None
        rate: int | None = None
        try:
            if r.image is not None:
                image = _read_image_file(self.folder / r.image, r.id)
            more = tuple(_read_image_file(self.folder / p, r.id) for p in r.more_images)
            if r.audio is not None:
                audio, rate = _read_audio_file(self.folder / r.audio, r.id)
        except (OSError, ValueError) as err:
            raise ReplayStoreError(
                f"replay store {str(self.folder)!r}: cannot read the files of sample {r.id!r} "
                f"({type(err).__name__}: {err}); reopen the store with repair=True to drop "
                "it") from err
        return Sample(id=r.id, task=r.task, instruction=r.instruction, answer=r.answer,
                      image=image, audio=audio, audio_rate=rate, turns=r.turns,
                      more_images=more, image_turns=r.image_turns)

    # -- adding --------------------------------------------------------------------------
    def add(self, task: str, samples: Sequence[Sample]) -> None:
        """Offer ``samples`` of ``task`` to the buffer and persist the result (see module doc).

        A sample is identified by (task, id): re-offering a kept id reuses its stored copy.
        """
        if isinstance(samples, TaskSamples):  # lazy: ids off the index, only kept ones decoded
            if samples.task != task:
                raise ValueError(f"replay store: samples of task {samples.task!r} offered as "
                                 f"{task!r}")
        else:
            for s in samples:
                if not isinstance(s, Sample) or s.task != task:
                    raise ValueError(f"replay store: every sample must be a "
                                     f"protocol.manifest.Sample of task {task!r}, got "
                                     f"{getattr(s, 'task', s)!r}")
        ids = ids_of(samples)
        if not ids:
            return
        at: dict[str, int] = {}  # key → position of its first offer
        for i, sid in enumerate(ids):
            at.setdefault(sample_key(task, sid), i)
        buf = BalancedReservoirBuffer.from_state_dict(self._buf.state_dict())  # a copy
        buf.add(task, [sample_key(task, sid) for sid in ids])
        state = buf.state_dict()
        fresh = [k for k in _keys_of(state) if k not in self._entries and k in at]
        rng = np.random.default_rng()
        rng.bit_generator.state = self._evict_rng.bit_generator.state
        staged: dict[str, tuple[_Entry, list[tuple[Path, Path]]]] = {}
        try:
            for k in fresh:
                staged[k] = self._stage(k, samples[at[k]])
            entries = {k: self._entries.get(k) or staged[k][0] for k in _keys_of(state)}
            self._fit_bytes(state, entries, rng)
            kept = set(_keys_of(state))
            for k, (_, moves) in staged.items():
                for tmp, final in moves:
                    if k in kept:
                        os.replace(tmp, final)
                    else:
                        os.unlink(tmp)
            for sub in _SUBDIRS:
                if (self.folder / sub).is_dir():
                    _fsync_dir(self.folder / sub)
            self._commit(BalancedReservoirBuffer.from_state_dict(state),
                         {k: entries[k] for k in _keys_of(state)}, rng, old=self._entries)
        finally:
            for _, moves in staged.values():  # left-over temps of evicted or failed samples
                for tmp, _final in moves:
                    try:
                        tmp.unlink(missing_ok=True)
                    except OSError:
                        pass  # garbage; removed when the store is opened next

    def _stage(self, key: str, s: Sample) -> tuple[_Entry, list[tuple[Path, Path]]]:
        """Write ``s``'s arrays to temp files; return its entry and (temp, final) pairs."""
        files: list[tuple[str, bytes | np.ndarray]] = []  # (relative path, bytes or audio)
        mods = {"text"}
        for k, im in enumerate(s.images):  # the first, then a multi-image sample's others
            img = np.asarray(im)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"replay store: sample {s.id!r} image must be (H, W, 3) uint8, "
                                 f"got {img.shape} {img.dtype}")
            from PIL import Image

            out = io.BytesIO()
            Image.fromarray(img).save(out, format="PNG")
            files.append((f"images/{key}.png" if k == 0 else f"images/{key}.{k}.png",
                          out.getvalue()))
            mods.add("image")
        if s.audio is not None:
            aud = np.asarray(s.audio)
            if aud.ndim != 1 or not np.issubdtype(aud.dtype, np.floating):
                raise ValueError(f"replay store: sample {s.id!r} audio must be (T,) float, got "
                                 f"{aud.shape} {aud.dtype}")
            if s.audio_rate is None:
                out = io.BytesIO()
                np.save(out, aud.astype(np.float32), allow_pickle=False)
                files.append((f"audio/{key}.npy", out.getvalue()))
            else:
                files.append((f"audio/{key}.wav", aud))
            mods.add("audio")
        moves: list[tuple[Path, Path]] = []  # (temp, final)
        sha: dict[str, str] = {}
        size = len(s.instruction.encode()) + len(s.answer.encode()) + sum(
            len(t.encode()) for _, t in s.turns)
        try:
            for rel, payload in files:
                final = self.folder / rel
                if not final.parent.is_dir():
                    final.parent.mkdir()
                    _fsync_dir(self.folder)
                if isinstance(payload, bytes):
                    data = payload
                    moves.append((_write_tmp(final.parent, final.name, data), final))
                else:  # audio with a rate → .wav through the manifest's writer
                    tmp = _write_tmp(final.parent, final.name, b"")
                    moves.append((tmp, final))
                    write_wav(tmp, payload, int(s.audio_rate or 0))
                    with tmp.open("rb") as f:
                        data = f.read()
                        os.fsync(f.fileno())
                sha[rel] = hashlib.sha256(data).hexdigest()
                size += len(data)
        except BaseException:
            for tmp, _ in moves:
                tmp.unlink(missing_ok=True)
            raise
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            for tmp, _ in moves:
                tmp.unlink(missing_ok=True)
            raise ValueError(f"replay store: sample {s.id!r} of task {s.task!r} takes {size} "
                             f"bytes, more than capacity_bytes={self.capacity_bytes}; raise the "
                             "byte bound or shrink the sample")
        record = SampleRecord(
            id=s.id, task=s.task, modalities=tuple(m for m in MODALITIES if m in mods),
            instruction=s.instruction, answer=s.answer, split="train",
            image=next((r for r, _ in files if r.startswith("images/")), None),
            audio=next((r for r, _ in files if r.startswith("audio/")), None),
            turns=s.turns, more_images=tuple(r for r, _ in files if r.startswith("images/"))[1:],
            image_turns=s.image_turns)
        return _Entry(key, record, size, sha), moves

    def _fit_bytes(self, state: dict[str, Any], entries: Mapping[str, _Entry],
                   rng: np.random.Generator) -> None:
        """Lower ``state``'s capacity slot by slot until its samples fit ``capacity_bytes``."""
        cap = self.capacity_bytes
        if cap is None:
            return
        refs = Counter(k for t in state["tasks"] for k in t["items"])
        total = sum(entries[k].nbytes for k in refs)
        if total <= cap:
            return
        counts = [len(t["items"]) for t in state["tasks"]]
        # Quotas of k·max(count) hold every task as is, so no capacity above it evicts anything.
        c = min(state["capacity"], len(counts) * max(counts))
        _evict_to(state, c, rng)
        while total > cap:
            if c == 1:
                raise ReplayStoreError(
                    f"replay store {str(self.folder)!r}: capacity_bytes={cap} is smaller than a "
                    f"single kept sample ({total} bytes); raise the byte bound")
            c -= 1
            for k in _evict_to(state, c, rng):
                refs[k] -= 1
                if refs[k] == 0:
                    total -= entries[k].nbytes

    # -- committing ----------------------------------------------------------------------
    def _commit(self, buf: BalancedReservoirBuffer[str], entries: dict[str, _Entry],
                rng: np.random.Generator, old: Mapping[str, _Entry]) -> None:
        state = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "capacity_samples": self.capacity_samples,
            "capacity_bytes": self.capacity_bytes,
            "buffer": buf.state_dict(),
            "evict_rng": rng.bit_generator.state,
            "samples": [entries[k].to_json() for k in entries],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.state_path, json.dumps(state).encode())  # the commit point
        self._buf, self._entries, self._evict_rng = buf, entries, rng
        try:
            self._write_view(only_if_changed=False)
            for e in old.values():
                if e.key not in entries:
                    for rel in e.files():
                        (self.folder / rel).unlink(missing_ok=True)
        except OSError as err:  # committed already; what is left over is cleaned at next open
            _log.warning("replay store %s: committed, but tidying up failed (%s); left-over "
                         "files are removed when the store is next opened", self.folder, err)

    def _write_view(self, only_if_changed: bool) -> None:
        lines = "".join(json.dumps(self._entries[k].to_json(), ensure_ascii=False) + "\n"
                        for k in self.keys()).encode()
        path = self.folder / MANIFEST_NAME
        if only_if_changed and path.is_file() and path.read_bytes() == lines:
            return
        _write_atomic(path, lines)

    # -- opening -------------------------------------------------------------------------
    def _corrupt(self, why: str) -> ReplayStoreError:
        return ReplayStoreError(
            f"replay state file {str(self.state_path)!r} is corrupt: {why}; restore it from a "
            f"backup, or delete the folder {str(self.folder)!r} to start with an empty buffer")

    def _read_state(self) -> tuple[BalancedReservoirBuffer[str], dict[str, _Entry],
                                   np.random.Generator]:
        try:
            d = json.loads(self.state_path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"cannot read it as JSON ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict) or d.get("format") != STORE_FORMAT:
            raise self._corrupt(f"not a {STORE_FORMAT} state")
        if set(d) != _STATE_KEYS or d["version"] != STORE_VERSION:
            raise self._corrupt(f"expected version {STORE_VERSION} with keys "
                                f"{sorted(_STATE_KEYS)}, got version {d.get('version')!r} with "
                                f"{sorted(d)}")
        try:
            buf: BalancedReservoirBuffer[str] = BalancedReservoirBuffer.from_state_dict(
                d["buffer"])
            rng = np.random.default_rng()
            rng.bit_generator.state = d["evict_rng"]
        except (ValueError, TypeError, KeyError) as e:
            raise self._corrupt(f"bad buffer or RNG state ({e})") from e
        if not isinstance(d["samples"], list):
            raise self._corrupt("`samples` must be a list")
        entries: dict[str, _Entry] = {}
        for i, raw in enumerate(d["samples"]):
            try:
                entry = _Entry.from_json(raw, f"samples[{i}]")
            except ReplayStoreError as err:
                raise self._corrupt(str(err)) from err
            entries[entry.key] = entry
        for t in buf.state_dict()["tasks"]:
            for k in t["items"]:
                if k not in entries or entries[k].record.task != t["name"]:
                    raise self._corrupt(f"buffer item {k!r} of task {t['name']!r} has no sample "
                                        "entry")
        return buf, entries, rng

    def _reconcile(self, repair: bool) -> tuple[dict[str, Any], bool]:
        """Check files (drop bad samples if ``repair``) and apply the requested bounds."""
        state = self._buf.state_dict()
        dirty = False
        bad: dict[str, str] = {}  # key → "path (why)"
        for k in _keys_of(state):
            for rel, digest in self._entries[k].sha256.items():
                path = self.folder / rel
                try:
                    ok = hashlib.sha256(path.read_bytes()).hexdigest() == digest
                    why = "contents changed"
                except FileNotFoundError:
                    ok, why = False, "missing"
                if not ok:
                    bad.setdefault(k, f"{path} ({why})")
        if bad:
            listed = ", ".join(list(bad.values())[:5]) + (" …" if len(bad) > 5 else "")
            if not repair:
                raise ReplayStoreError(
                    f"replay store {str(self.folder)!r}: the committed state references "
                    f"{len(bad)} missing or corrupt file(s): {listed}; reopen with repair=True "
                    "to drop those samples, or restore the files")
            quotas = task_quotas(state["capacity"], len(state["tasks"]))
            for t, q in zip(state["tasks"], quotas, strict=True):
                t["items"] = [k for k in t["items"] if k not in bad]
                if len(t["items"]) < q:  # below quota the buffer's invariant is seen == kept:
                    t["seen"] = len(t["items"])  # the task refills before sampling again
            _log.warning("replay store %s: repair dropped %d sample(s) with bad files: %s",
                         self.folder, len(bad), listed)
            dirty = True
        requested = self.capacity_samples or UNBOUNDED
        if requested < state["capacity"]:
            _evict_to(state, requested, self._evict_rng)
            dirty = True
        elif requested > state["capacity"]:
            try:  # valid only while no task has dropped anything the larger quotas would keep
                BalancedReservoirBuffer.from_state_dict({**state, "capacity": requested})
                state["capacity"] = requested
                dirty = True
            except ValueError:
                _log.info("replay store %s keeps capacity %d (asked for %d): its tasks have "
                          "dropped samples, and a reservoir cannot grow back", self.folder,
                          state["capacity"], requested)
        entries = {k: self._entries[k] for k in _keys_of(state)}
        before = json.dumps(state["tasks"])
        self._fit_bytes(state, entries, self._evict_rng)
        return state, dirty or json.dumps(state["tasks"]) != before

    def _check_new_folder(self) -> None:
        """A folder without a state must be empty but for our temp files, or it is not ours."""
        if not self.folder.exists():
            return
        others = [p.name for p in self.folder.iterdir()
                  if not (p.is_file() and _is_tmp(p.name))
                  and not (p.is_dir() and p.name in _SUBDIRS and not any(p.iterdir()))]
        if others:
            raise ReplayStoreError(
                f"{str(self.folder)!r} holds {sorted(others)[:5]} but no {STATE_NAME}, so it is "
                "not a replay store; pass an empty or new folder")

    def _collect_garbage(self) -> None:
        """Remove temp files and array files that the committed state does not reference."""
        if not self.folder.is_dir():
            return
        referenced = {rel for e in self._entries.values() for rel in e.files()}
        removed = 0
        for p in self.folder.iterdir():
            if p.is_file() and _is_tmp(p.name):
                p.unlink(missing_ok=True)
                removed += 1
        for sub in _SUBDIRS:
            if not (self.folder / sub).is_dir():
                continue
            for p in (self.folder / sub).iterdir():
                if p.is_file() and f"{sub}/{p.name}" not in referenced:
                    p.unlink(missing_ok=True)
                    removed += 1
        if removed:
            _log.info("replay store %s: removed %d unreferenced file(s) left by an interrupted "
                      "write", self.folder, removed)

