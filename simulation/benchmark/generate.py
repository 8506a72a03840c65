"""Writing the benchmark to disk, and the content-addressed cache that reuses it.

The benchmark is written in the field's own data format (protocol/llava_format.py) with a
stream file (protocol/stream.py), and read back through the same code as a user's data — one
data path. Layout of one generated benchmark (docs/design.md §3)::

    ROOT/stream.toml                  the task stream: every task's files, metrics, modalities
    ROOT/stream.json                  generator version, seed, image size, audio rate,
                                      ordered tasks, info (written last: "generation complete")
    ROOT/pretrain/train.json          the base's pretraining samples
    ROOT/pretrain-heldout/test.json   the same templates, balanced, never trained on (the
                                      base's held-out accuracy)
    ROOT/<task>/train.json, test.json LLaVA-style records: {"id", "image"|"audio",
                                      "conversations": [human, gpt]}
    ROOT/<task>/images/<id>.png       image samples (S, S, 3)
    ROOT/<task>/audio/<id>.wav        audio samples: mono 16-bit PCM at AUDIO_RATE, ≤ MAX_SECONDS

Every (task, split) stream is seeded with ``[seed, crc32(task), split_index]``, so a generation
depends only on the seed, the task name, the split and the sizes — never on Python's ``hash``
or on which other tasks are listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from protocol.config import DataConfig
from protocol.llava_format import record_json, write_records
from protocol.manifest import write_wav
from protocol.stream import StreamTask, write_stream
from simulation.benchmark.audio import AUDIO_RATE, MAX_SAMPLES, MAX_SECONDS
from simulation.benchmark.tasks import PRETRAIN, PRETRAIN_HELDOUT, TASKS, TaskSpec, check_tasks

# 2: audio tasks (pitch, beats, sweep) and audio in the pretraining mix; 3: hard negatives in
# the "is there a …" pretraining template and the held-out pretraining folder; 4: the field's
# instruction format (train.json / test.json) and stream.toml, same samples as 3.
GENERATOR_VERSION = "4"
HELDOUT_FOLDER = "pretrain-heldout"
SPLIT_INDEX: dict[str, int] = {"train": 0, "test": 1, "pretrain": 2}
STREAM_FILE = "stream.json"
STREAM_TOML = "stream.toml"
PRETRAIN_FILE = "pretrain/train.json"
HELDOUT_FILE = f"{HELDOUT_FOLDER}/test.json"
STALE_TMP_S = 3600.0  # a temp folder untouched this long belongs to a dead generation
_log = logging.getLogger(__name__)


def stable_index(name: str) -> int:
    """A process-independent integer for ``name`` (crc32; Python's hash() is salted)."""
    return zlib.crc32(name.encode("utf-8"))


def stream_rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, stable_index(task), SPLIT_INDEX[split]])


def _record_id(task: str, split: str, i: int) -> str:
    return f"{task}-{i:05d}" if task == split else f"{task}-{split}-{i:05d}"


def _kind_of(array: np.ndarray, task: str, rid: str, image_size: int) -> str:
    """"image" for (S, S, 3) uint8, "audio" for (T,) float32 with T ≤ MAX_SAMPLES, else raise.

    Checked here because a task generator bug would otherwise surface only when the model's
    collator meets a malformed array, far from the task that made it.
    """
    if array.ndim == 3 and array.shape == (image_size, image_size, 3) and array.dtype == np.uint8:
        return "image"
    if array.ndim == 1 and array.dtype == np.float32 and 0 < len(array) <= MAX_SAMPLES:
        return "audio"
    raise ValueError(
        f"task {task!r}, record {rid!r}: generated an array of shape {array.shape} "
        f"{array.dtype}; expected an image ({image_size}, {image_size}, 3) uint8 (data.image-size = "
        f"{image_size}) or an audio clip (T,) float32 with 1 ≤ T ≤ {MAX_SAMPLES} ({MAX_SECONDS} s "
        f"at {AUDIO_RATE} Hz); fix the task's generator in simulation/benchmark/tasks.py")


def _write_split(folder: Path, spec: TaskSpec, split: str, n: int, cfg: DataConfig
                 ) -> list[dict]:
    rng = stream_rng(cfg.seed, spec.name, split)
    records = []
    for i, (instruction, answer, array) in enumerate(spec.generate(rng, n, split,
                                                                   cfg.image_size)):
        rid = _record_id(spec.name, split, i)
        image = audio = None
        if array is not None:
            kind = _kind_of(array, spec.name, rid, cfg.image_size)
            if kind not in spec.modalities:
                raise ValueError(f"task {spec.name!r} generated {kind} for record {rid!r} but "
                                 f"declares modalities {spec.modalities}; add {kind!r} to its "
                                 "TaskSpec in simulation/benchmark/tasks.py")
            if kind == "image":
                image = f"images/{rid}.png"
                Image.fromarray(array).save(folder / image, format="PNG")
            else:
                audio = f"audio/{rid}.wav"
                write_wav(folder / audio, array, AUDIO_RATE)
        records.append(record_json(rid, instruction, answer, image=image, audio=audio))
    return records


def _write_task(root: Path, spec: TaskSpec, splits: list[tuple[str, int, str]], cfg: DataConfig,
                folder_name: str | None = None) -> None:
    """``splits``: (split, count, file name) — the records of each split go to their file."""
    folder = root / (folder_name or spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    if "image" in spec.modalities:
        (folder / "images").mkdir(exist_ok=True)
    if "audio" in spec.modalities:
        (folder / "audio").mkdir(exist_ok=True)
    for split, n, name in splits:
        write_records(folder / name, _write_split(folder, spec, split, n, cfg))


def builtin_stream_tasks(root: Path, tasks: tuple[str, ...] | list[str]) -> list[StreamTask]:
    """The stream entries of the generated tasks (what ``ROOT/stream.toml`` lists)."""
    return [StreamTask(name=t, train=root / t / "train.json", test=root / t / "test.json",
                       image_root=root / t, metrics=tuple(TASKS[t].metrics),
                       max_new_tokens=None, modalities=tuple(TASKS[t].modalities))
            for t in tasks]


def generate_benchmark(root: Path, cfg: DataConfig) -> Path:
    """Generate the pretraining split and every task of ``cfg.tasks`` under ``root``."""
    check_tasks(cfg.tasks)
    cfg.validate()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_task(root, PRETRAIN, [("pretrain", cfg.pretrain_size, "train.json")], cfg)
    _write_task(root, PRETRAIN_HELDOUT, [("test", cfg.pretrain_heldout, "test.json")], cfg,
                HELDOUT_FOLDER)
    for name in cfg.tasks:
        _write_task(root, TASKS[name], [("train", cfg.train_per_task, "train.json"),
                                        ("test", cfg.test_per_task, "test.json")], cfg)
    write_stream(root / STREAM_TOML, "fedmole-builtin", builtin_stream_tasks(root, cfg.tasks))
    stream = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "audio_rate": AUDIO_RATE,
        "tasks": list(cfg.tasks),
        "task_info": {
            name: {"description": TASKS[name].description,
                   "modalities": list(TASKS[name].modalities),
                   "metrics": list(TASKS[name].metrics)}
            for name in cfg.tasks
        },
    }
    (root / STREAM_FILE).write_text(json.dumps(stream, indent=2) + "\n", encoding="utf-8")
    return root


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, else ``$FEDMOLE_CACHE``, else ``.cache/fedmole`` (relative to cwd)."""
    return Path(cfg.cache_dir or os.environ.get("FEDMOLE_CACHE") or ".cache/fedmole")


def benchmark_key(cfg: DataConfig) -> str:
    """sha256[:16] of the generator version and every DataConfig field that shapes the data."""
    fields = asdict(cfg)
    fields.pop("cache_dir")  # where, not what
    fields["tasks"] = list(cfg.tasks)
    blob = json.dumps({"generator_version": GENERATOR_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _clean_stale(parent: Path, key: str) -> None:
    now = time.time()
    for tmp in parent.glob(f".{key}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process cleaned it


def ensure_benchmark(cfg: DataConfig) -> Path:
    """Return the cached benchmark folder for ``cfg``, generating it first if absent.

    Generation happens in a temp folder beside the final one and is moved into place with
    ``os.replace``, so the final folder exists only once complete; a crashed generation leaves a
    temp folder that is never reused (and is removed once stale).
    """
    check_tasks(cfg.tasks)
    cfg.validate()
    parent = cache_root(cfg) / "data"
    key = benchmark_key(cfg)
    final = parent / key
    if (final / STREAM_FILE).is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(parent, key)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{key}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
    try:
        start = time.perf_counter()
        generate_benchmark(tmp, cfg)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / STREAM_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent generation won the race
        _log.info("generated benchmark %s in %.1fs", final, time.perf_counter() - start)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
