"""Splitting the run's task stream (built-in or a user's) across federated clients (non-IID, modality-skewed).

Two kinds of heterogeneity, both deterministic functions of ``federation.seed``:

* **Modalities.** Exactly ``round(f · clients)`` clients lack audio (``no-audio-fraction``) and,
  drawn independently, ``round(f · clients)`` lack images; every client has text. A client never
  gets data of a task that needs a modality it lacks.
* **Task shares** (label skew with each task as a "class"). For task t, over its eligible
  clients E_t (those holding all of t's modalities)::

      p_t ~ Dir(alpha · 1_|E_t|)            alpha → 0: one client holds t; alpha → ∞: even split
      n_tc = apportion(p_t, n_t)            largest remainders, sum_c n_tc = n_t exactly

  A client whose share gives it fewer than ``min-samples`` training samples drops out of t
  (smallest first) and its probability mass goes to the others in proportion to theirs; the
  client with the largest share always keeps t, so every item lands on exactly one client. Test
  records are split with the same p_t, every holder getting at least one test record when there
  are enough, so a client is evaluated on exactly the tasks it trains on.

The stream of task t is seeded with ``[seed, crc32(t), 0]`` and the modality draw with
``[seed, crc32(modality), 1]``, so a split never depends on which other tasks are listed.
:func:`materialize` writes one folder per client in the field's data format with its own stream
file (``client-NN/stream.toml``), which an edge client reads with
``edge.runtime.load_local_data`` — the reader of every stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from protocol.federation import FederationConfig
from protocol.llava_format import ids_of, record_to_json, write_records
from protocol.manifest import MODALITIES
from protocol.stream import STREAM_NAME as CLIENT_STREAM
from protocol.stream import StreamTask, TaskData, stream_text, write_stream
from simulation.benchmark import stable_index

PARTITION_FILE = "partition.json"
PARTITION_FORMAT = "fedmole-partition"
PARTITION_VERSION = 1
_PURPOSE = {"task": 0, "modality": 1}
_log = logging.getLogger(__name__)


class PartitionError(ValueError):
    """A partition file is invalid, or a folder already holds a different partition."""


def _rng(seed: int, name: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, stable_index(name), _PURPOSE[purpose]])


def client_dir(out_root: Path, client: int) -> Path:
    """``out_root/client-NN``: the data folder of one client."""
    return Path(out_root) / f"client-{client:02d}"


# -- modalities ------------------------------------------------------------------------------


def client_modalities(cfg: FederationConfig) -> list[frozenset[str]]:
    """The modalities each client holds; "text" always, image/audio missing on a seeded subset."""
    cfg.validate()
    lacking: dict[str, set[int]] = {}
    for modality in ("image", "audio"):
        rng = _rng(cfg.seed, modality, "modality")
        k = cfg.n_lacking(modality)
        lacking[modality] = set(rng.choice(cfg.clients, size=k, replace=False).tolist())
    return [
        frozenset({"text"} | {m for m in ("image", "audio") if c not in lacking[m]})
        for c in range(cfg.clients)
    ]


# -- Dirichlet split -------------------------------------------------------------------------


def apportion(p: np.ndarray, n: int) -> np.ndarray:
    """Integer counts (K,) with sum ``n``, proportional to ``p`` (K,) (largest remainders).

    Ties in the remainders go to the lower index, so the result is a pure function of ``p``.
    """
    p = np.asarray(p, dtype=np.float64)
    if n == 0 or p.sum() <= 0:
        return np.zeros(len(p), dtype=np.int64)
    exact = p / p.sum() * n
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")  # largest remainder first
    counts[order[:short]] += 1
    return counts


def task_proportions(n_items: int, n_clients: int, alpha: float, rng: np.random.Generator,
                     eligible: Sequence[int] | None = None, min_samples: int = 1,
                     task: str = "?") -> np.ndarray:
    """p (n_clients,): a task's share per client; zero for ineligible and dropped clients.

    ``p[E] ~ Dir(alpha)`` over the eligible clients E; then, while a holder would get fewer than
    ``min_samples`` of the ``n_items``, the smallest holder is dropped and p renormalised (its
    mass is re-distributed in proportion). The largest holder is never dropped.
    """
    if n_clients < 1:
        raise ValueError(f"task {task!r}: need at least one client, got n_clients={n_clients}")
    if not alpha > 0:
        raise ValueError(f"task {task!r}: the Dirichlet alpha must be > 0, got {alpha!r}")
    if n_items < 0:
        raise ValueError(f"task {task!r}: n_items must be >= 0, got {n_items}")
    elig = np.arange(n_clients) if eligible is None else np.unique(np.asarray(eligible, int))
    if len(elig) == 0:
        raise ValueError(
            f"task {task!r}: no client is eligible (none holds all of the task's modalities); "
            "lower federation.no-audio-fraction / no-image-fraction or drop the task")
    if elig.min() < 0 or elig.max() >= n_clients:
        raise ValueError(f"task {task!r}: eligible clients must be in [0, {n_clients}), "
                         f"got {elig.tolist()}")
    p = np.zeros(n_clients)
    p[elig] = rng.dirichlet(np.full(len(elig), float(alpha))) if len(elig) > 1 else 1.0
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # tiny alpha can underflow every draw
        p = np.zeros(n_clients)
        p[elig[int(rng.integers(len(elig)))]] = 1.0
    p /= p.sum()
    while True:
        counts = apportion(p, n_items)
        holders = np.flatnonzero(p > 0)
        # Holders whose rounded share is zero are dropped even when min_samples would allow it.
        small = [c for c in holders if counts[c] < min_samples or counts[c] == 0]
        if not small or len(holders) == 1:
            break
        # Drop the smallest share (ties: the lower probability, then the later client).
        drop = min(small, key=lambda c: (counts[c], p[c], -c))
        p[drop] = 0.0
        p /= p.sum()
    return p


def assign(n_items: int, p: np.ndarray, rng: np.random.Generator,
           every_holder: bool = False) -> list[np.ndarray]:
    """Item indices per client, sorted: a random permutation cut by ``apportion(p, n_items)``.

    ``every_holder``: a client with ``p > 0`` but a zero count takes one item from the client
    with the most (used for test records, so every holder is evaluated), when there are enough.
    """
    counts = apportion(p, n_items)
    if every_holder:
        for c in np.flatnonzero(p > 0):
            donor = int(np.argmax(counts))
            if counts[c] == 0 and counts[donor] > 1:
                counts[donor] -= 1
                counts[c] += 1
    perm = rng.permutation(n_items)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.sort(perm[bounds[c]:bounds[c + 1]]) for c in range(len(p))]


def dirichlet_split(n_items: int, n_clients: int, alpha: float, rng: np.random.Generator,
                    eligible: Sequence[int] | None = None, min_samples: int = 1,
                    task: str = "?") -> list[np.ndarray]:
    """Indices (sorted) of a task's items per client; every item goes to exactly one client.

    See :func:`task_proportions` for the shares (Dirichlet over ``eligible``, min-samples rule)
    and :func:`assign` for the cut. Raises ValueError naming ``task`` if nobody is eligible.
    """
    p = task_proportions(n_items, n_clients, alpha, rng, eligible, min_samples, task)
    return assign(n_items, p, rng)


# -- partition -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One client's share of one task: record ids of the train and test splits (manifest order)."""

    train: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class Partition:
    """Who holds what: client modalities and, per client, task → :class:`Shard`.

    ``shards[c]`` lists only the tasks client c holds, in stream order. Built by
    :func:`split_stream`; (de)serialised with :meth:`to_json` / :meth:`from_json`.
    """

    tasks: tuple[str, ...]
    task_modalities: Mapping[str, frozenset[str]]
    client_modalities: tuple[frozenset[str], ...]
    shards: tuple[Mapping[str, Shard], ...]

    @property
    def n_clients(self) -> int:
        return len(self.client_modalities)

    def client_tasks(self, client: int) -> list[str]:
        """Tasks client ``client`` holds, in stream order."""
        return [t for t in self.tasks if t in self.shards[client]]

    def clients_of(self, task: str) -> list[int]:
        """Clients holding ``task``."""
        return [c for c in range(self.n_clients) if task in self.shards[c]]

    def train_counts(self) -> np.ndarray:
        """(clients, tasks) number of training records."""
        return np.array([[len(s[t].train) if t in s else 0 for t in self.tasks]
                         for s in self.shards], dtype=np.int64).reshape(self.n_clients, -1)

    def test_counts(self) -> np.ndarray:
        """(clients, tasks) number of test records."""
        return np.array([[len(s[t].test) if t in s else 0 for t in self.tasks]
                         for s in self.shards], dtype=np.int64).reshape(self.n_clients, -1)

    def task_counts(self) -> dict[str, tuple[int, int]]:
        """task → (train, test) records over all clients (= the task's full splits)."""
        tr, te = self.train_counts().sum(0), self.test_counts().sum(0)
        return {t: (int(tr[i]), int(te[i])) for i, t in enumerate(self.tasks)}

    def summary(self) -> str:
        """A plain-text table of training records per client × task (test counts in the total)."""
        counts = self.train_counts()
        mods = ["+".join(m for m in MODALITIES if m in cm) for cm in self.client_modalities]
        w0 = max(len("client-00"), len("total (test)"))
        w1 = max(len("modalities"), *(len(m) for m in mods))
        cols = [max(6, len(t)) for t in self.tasks]
        head = (f"{'client':<{w0}}  {'modalities':<{w1}}  "
                + "  ".join(f"{t:>{w}}" for t, w in zip(self.tasks, cols, strict=True))
                + f"  {'total':>6}")
        lines = [head, "-" * len(head)]
        for c in range(self.n_clients):
            row = "  ".join(f"{int(n):>{w}}" for n, w in zip(counts[c], cols, strict=True))
            lines.append(f"{f'client-{c:02d}':<{w0}}  {mods[c]:<{w1}}  {row}  "
                         f"{int(counts[c].sum()):>6}")
        tc = self.task_counts()
        for label, k in (("total", 0), ("total (test)", 1)):
            row = "  ".join(f"{tc[t][k]:>{w}}" for t, w in zip(self.tasks, cols, strict=True))
            lines.append(f"{label:<{w0}}  {'':<{w1}}  {row}  "
                         f"{sum(v[k] for v in tc.values()):>6}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PARTITION_FORMAT,
            "version": PARTITION_VERSION,
            "tasks": list(self.tasks),
            "task_modalities": {t: sorted(self.task_modalities[t]) for t in self.tasks},
            "clients": [
                {"modalities": sorted(self.client_modalities[c]),
                 "tasks": {t: {"train": list(s.train), "test": list(s.test)}
                           for t, s in self.shards[c].items()}}
                for c in range(self.n_clients)
            ],
        }

    @classmethod
    def from_json(cls, d: Any, where: str = "partition") -> Partition:
        """Validate and rebuild; errors name ``where`` and the bad field."""
        def bad(field: str, rule: str, value: Any) -> PartitionError:
            return PartitionError(f"{where}: `{field}` must be {rule}, got {value!r}")

        if not isinstance(d, dict) or d.get("format") != PARTITION_FORMAT:
            raise PartitionError(f"{where}: not a {PARTITION_FORMAT} object (missing or wrong "
                                 "`format`); point to a partition.json written by materialize")
        if d.get("version") != PARTITION_VERSION:
            raise bad("version", str(PARTITION_VERSION), d.get("version"))
        tasks = d.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks) \
                or len(set(tasks)) != len(tasks):
            raise bad("tasks", "a list of distinct task names", tasks)
        tm = d.get("task_modalities")
        if not isinstance(tm, dict) or set(tm) != set(tasks):
            raise bad("task_modalities", "an object with one entry per task", tm)
        task_mods = {t: _modalities(tm[t], f"task_modalities.{t}", bad) for t in tasks}
        clients = d.get("clients")
        if not isinstance(clients, list) or not clients:
            raise bad("clients", "a non-empty list", clients)
        cmods: list[frozenset[str]] = []
        shards: list[Mapping[str, Shard]] = []
        for c, entry in enumerate(clients):
            f = f"clients[{c}]"
            if not isinstance(entry, dict) or set(entry) != {"modalities", "tasks"}:
                raise bad(f, "an object with `modalities` and `tasks`", entry)
            cmods.append(_modalities(entry["modalities"], f"{f}.modalities", bad))
            held = entry["tasks"]
            if not isinstance(held, dict) or not set(held) <= set(tasks):
                raise bad(f"{f}.tasks", f"an object keyed by tasks of {tasks}", held)
            s: dict[str, Shard] = {}
            for t in tasks:  # stream order, whatever the file's order
                if t not in held:
                    continue
                ids = held[t]
                if not isinstance(ids, dict) or set(ids) != {"train", "test"} or not all(
                        isinstance(v, list) and all(isinstance(i, str) for i in v)
                        for v in ids.values()):
                    raise bad(f"{f}.tasks.{t}", "an object with `train` and `test` id lists", ids)
                s[t] = Shard(tuple(ids["train"]), tuple(ids["test"]))
            shards.append(MappingProxyType(s))
        return cls(tuple(tasks), MappingProxyType(task_mods), tuple(cmods), tuple(shards))


def _modalities(v: Any, field: str, bad: Any) -> frozenset[str]:
    if not isinstance(v, list) or not v or not all(m in MODALITIES for m in v):
        raise bad(field, f"a non-empty list of {', '.join(MODALITIES)}", v)
    return frozenset(v)


def split_stream(tasks: Mapping[str, TaskData], cfg: FederationConfig) -> Partition:
    """Split every task of the run (in order; built-in or a user's stream) across
    ``cfg.clients`` clients.

    A task's modalities are those of its stream entry or its records; only clients holding all
    of them are eligible. Train records are split by :func:`task_proportions`, test records with
    the same proportions. Raises ValueError naming a task that has no eligible client or no
    training records.
    """
    cfg.validate()
    names = list(tasks)
    if not names:
        raise ValueError("tasks must be a non-empty mapping of the run's tasks")
    cmods = client_modalities(cfg)
    shards: list[dict[str, Shard]] = [{} for _ in range(cfg.clients)]
    task_mods: dict[str, frozenset[str]] = {}
    for task, data in tasks.items():
        train, test = ids_of(data.train), ids_of(data.test)
        if not train:
            raise ValueError(f"task {task!r}: no training records in {str(data.spec.train)!r}")
        mods = frozenset(data.modalities())
        task_mods[task] = mods
        eligible = [c for c in range(cfg.clients) if mods <= cmods[c]]
        rng = _rng(cfg.seed, task, "task")
        p = task_proportions(len(train), cfg.clients, cfg.dirichlet_alpha, rng, eligible,
                             cfg.min_samples, task)
        tr_idx = assign(len(train), p, rng)
        te_idx = assign(len(test), p, rng, every_holder=True)
        for c in np.flatnonzero(p > 0).tolist():
            shards[c][task] = Shard(tuple(train[i] for i in tr_idx[c].tolist()),
                                    tuple(test[i] for i in te_idx[c].tolist()))
    return Partition(tuple(names), MappingProxyType(task_mods), tuple(cmods),
                     tuple(MappingProxyType(s) for s in shards))


# -- writing client folders ------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_file(a: Path, b: Path) -> bool:
    """True when ``b`` is ``a`` (a hard link) or a byte-identical copy of it."""
    try:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
    except FileNotFoundError:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(1 << 16), fb.read(1 << 16)
            if x != y:
                return False
            if not x:
                return True


def _place(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy across filesystems), atomically; skip if equal."""
    if _same_file(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # EXDEV (other filesystem) or no hard links here: copy instead
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_out_root(partition: Partition, out_root: Path) -> None:
    """Write ``partition.json`` first, or refuse if ``out_root`` holds anything else."""
    path = out_root / PARTITION_FILE
    if path.is_file():
        try:
            existing = Partition.from_json(json.loads(path.read_text(encoding="utf-8")),
                                           str(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PartitionError(f"{str(path)!r} is not valid JSON ({e}); delete "
                                 f"{str(out_root)!r} and materialize again") from e
        if existing != partition:
            raise PartitionError(
                f"{str(out_root)!r} already holds a different partition ({PARTITION_FILE} "
                "differs: another seed, alpha, client count or task list); materialize into an "
                "empty folder, or delete this one first")
        return
    if out_root.exists() and any(out_root.iterdir()):
        raise PartitionError(f"{str(out_root)!r} is not empty and holds no {PARTITION_FILE}, so "
                             "it is not a materialized partition; pass an empty or new folder")
    out_root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, partition.to_json())


def _media_path(src: Path, image_root: Path, digest_dir: str = "files") -> str:
    """Where a record's file goes inside the client's task folder: its path under the task's
    image root (as the user laid it out), else ``files/<hash>-<name>`` (an absolute path)."""
    try:
        return src.relative_to(image_root).as_posix()
    except ValueError:
        h = hashlib.sha1(str(src).encode()).hexdigest()[:12]
        return f"{digest_dir}/{h}-{src.name}"


def materialize(partition: Partition, tasks: Mapping[str, TaskData], out_root: Path
                ) -> list[Path]:
    """Write ``out_root/client-NN/`` for every client: a stream file (``stream.toml``) of the
    tasks it holds, and per task ``train.json`` / ``test.json`` in the field's format with the
    record's images and audio beside them; return the client folders (``client-00`` …, one per
    client, empty for a client holding no task).

    Files are hard links to the originals (copies across filesystems), so clients must treat
    them as read-only. ``partition.json`` is written first; re-running with the same partition
    (e.g. after a crash) completes or re-checks the folders and changes nothing else, and a
    folder holding a different partition is refused with :class:`PartitionError`.
    """
    out_root = Path(out_root)
    _check_out_root(partition, out_root)
    dirs = [client_dir(out_root, c) for c in range(partition.n_clients)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    held: list[list[StreamTask]] = [[] for _ in dirs]
    for task in partition.tasks:
        holders = partition.clients_of(task)
        if not holders:
            continue
        data = tasks[task]
        root = data.spec.image_root
        by_id = {r.id: r for r in data.train.records + data.test.records}
        for c in holders:
            shard = partition.shards[c][task]
            folder = dirs[c] / task
            for split, ids in (("train", shard.train), ("test", shard.test)):
                out: list[dict[str, Any]] = []
                for rid in ids:
                    if rid not in by_id:
                        raise PartitionError(
                            f"record {rid!r} of task {task!r} (client {c}) is not in "
                            f"{str(data.spec.train)!r} or its test file; the partition was made "
                            "from other data: split this stream again")
                    rec = by_id[rid]
                    images = [_media_path(p, root) for p in rec.images]
                    audio = None if rec.audio is None else _media_path(rec.audio, root)
                    for src, rel in zip([*rec.images, rec.audio], [*images, audio], strict=True):
                        if src is not None and rel is not None:
                            _place(src, folder / rel)
                    out.append(record_to_json(rec, images, audio))
                path = folder / f"{split}.json"
                text = json.dumps(out, ensure_ascii=False) + "\n"
                if not (path.is_file() and path.read_text(encoding="utf-8") == text):
                    write_records(path, out)
            held[c].append(StreamTask(
                name=task, train=folder / "train.json", test=folder / "test.json",
                image_root=folder, metrics=data.spec.metrics,
                max_new_tokens=data.spec.max_new_tokens, modalities=data.spec.modalities))
    for d, specs in zip(dirs, held, strict=True):
        if specs:
            stream = d / CLIENT_STREAM
            new_text = stream_text(d, d.name, specs)
            if not (stream.is_file() and stream.read_text(encoding="utf-8") == new_text):
                write_stream(stream, d.name, specs)
    _log.info("materialized %d clients × %d tasks under %s", partition.n_clients,
              len(partition.tasks), out_root)
    return dirs


def load_partition(out_root: Path) -> Partition:
    """The partition a :func:`materialize` call wrote under ``out_root``."""
    path = Path(out_root) / PARTITION_FILE
    if not path.is_file():
        raise PartitionError(f"no {PARTITION_FILE} in {str(out_root)!r}; run materialize first")
    return Partition.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
