"""Task streams: the ordered tasks of a continual run, each a train and a test file in the
field's instruction format (protocol/llava_format.py), with its metrics and generation length.

A stream file (TOML)::

    name = "my-stream"
    root = "/data/my-stream"      # optional: the folder paths below are relative to
                                  # (default: the stream file's folder; relative: to it;
                                  # `data.stream-root` overrides it)
    image-root = "images"         # optional default image root of every task (relative to root)
    max-new-tokens = 16           # optional default generation length (else the run's
                                  # `train.max-new-tokens`)

    [[tasks]]
    name = "scienceqa"            # lower-case letters, digits, '-' and '_'
    train = "ScienceQA/train.json"
    test = "ScienceQA/test.json"
    metrics = ["mc"]              # the first is the task's primary metric (the accuracy matrix)
    max-new-tokens = 8            # optional
    image-root = "ScienceQA/images"   # optional
    modalities = ["image", "text"]    # optional: what the task's samples carry
    references = "ScienceQA/answers.json"  # optional: reference answers kept apart from the
                                  # test file (protocol.llava_format.read_references)

Parsed once into frozen dataclasses; any unknown key, bad value, unknown metric, repeated task
name or missing file is a :class:`~protocol.config.ConfigError` that names the stream file, the
key and the value. This module only parses: the metric names it accepts are given by the caller
(the registry of ``mole.scoring``), so the contract layer imports nothing of the model side.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config import ConfigError
from protocol.llava_format import DataError, TaskSamples

STREAM_NAME = "stream.toml"  # the stream file inside a data folder (built-in, client, node)
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MODALITIES = ("image", "text", "audio")
_TOP = {"name", "root", "image-root", "max-new-tokens", "tasks"}
_TASK = {"name", "train", "test", "metrics", "max-new-tokens", "image-root", "modalities",
         "references"}


@dataclass(frozen=True)
class StreamTask:
    name: str
    train: Path
    test: Path
    image_root: Path
    metrics: tuple[str, ...]  # metrics[0] is the primary one
    max_new_tokens: int | None  # None: the run's `train.max-new-tokens`
    modalities: tuple[str, ...] | None = None  # None: read off the samples
    # Reference answers kept apart from the test file (TextVQA's answers, COCO captions):
    # protocol.llava_format.read_references
    references: Path | None = None

    @property
    def primary(self) -> str:
        return self.metrics[0]


@dataclass(frozen=True)
class TaskStream:
    name: str
    source: Path  # the stream file
    tasks: tuple[StreamTask, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def select(self, names: Sequence[str]) -> TaskStream:
        """The tasks ``names`` (``data.tasks``), in the stream's order."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ConfigError(f"`data.tasks` names {unknown}, which stream {str(self.source)!r} "
                              f"does not have; its tasks: {', '.join(self.names)}")
        return TaskStream(self.name, self.source, tuple(t for t in self.tasks if t.name in names))


def _fail(src: Path, key: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"stream {str(src)!r}: `{key}` must be {rule}, got {value!r}")


def _int(src: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(src, key, "an integer >= 1", value)
    return value


def _path(src: Path, key: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(src, key, "a path", value)
    p = Path(value)
    return p if p.is_absolute() else base / p


def load_stream(path: str | Path, known_metrics: Sequence[str] | None, check_files: bool = True,
                root: str | Path | None = None) -> TaskStream:
    """Parse and check a stream file (see the module docstring).

    ``root`` (``data.stream-root``) replaces the file's own ``root``: the shipped stream files
    (``conf/streams/``) name a layout, the user says where on their disk it is."""
    src = Path(path)
    try:
        raw = tomllib.loads(src.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read stream file {str(src)!r}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"stream file {str(src)!r} is not valid TOML: {e}") from e
    extra = sorted(set(raw) - _TOP)
    if extra:
        raise ConfigError(f"stream {str(src)!r}: unknown keys {extra}; known: {sorted(_TOP)}")
    name = raw.get("name", src.stem)
    if not isinstance(name, str) or not name:
        raise _fail(src, "name", "a string", name)
    if root is not None and str(root):
        root = Path(root)
    elif "root" in raw:
        root = _path(src, "root", raw["root"], src.parent)
    else:
        root = src.parent
    image_root = _path(src, "image-root", raw["image-root"], root) if "image-root" in raw else root
    default_tokens = (_int(src, "max-new-tokens", raw["max-new-tokens"])
                      if "max-new-tokens" in raw else None)
    entries = raw.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise _fail(src, "tasks", "a non-empty list of [[tasks]] tables", entries)
    tasks: list[StreamTask] = []
    for i, t in enumerate(entries):
        at = f"tasks[{i}]"
        if not isinstance(t, dict):
            raise _fail(src, at, "a table", t)
        extra = sorted(set(t) - _TASK)
        if extra:
            raise ConfigError(f"stream {str(src)!r}: {at} has unknown keys {extra}; known: "
                              f"{sorted(_TASK)}")
        for key in ("name", "train", "test", "metrics"):
            if key not in t:
                raise ConfigError(f"stream {str(src)!r}: {at} has no `{key}`")
        tname = t["name"]
        if not isinstance(tname, str) or not NAME.match(tname):
            raise _fail(src, f"{at}.name", "lower-case letters, digits, '-' and '_'", tname)
        if tname in [x.name for x in tasks]:
            raise ConfigError(f"stream {str(src)!r}: task {tname!r} appears twice")
        metrics = t["metrics"]
        if (not isinstance(metrics, list) or not metrics
                or not all(isinstance(m, str) for m in metrics)):
            raise _fail(src, f"{at}.metrics", "a non-empty list of metric names", metrics)
        unknown = [] if known_metrics is None else [m for m in metrics if m not in known_metrics]
        if unknown and known_metrics is not None:
            raise ConfigError(f"stream {str(src)!r}: {at}.metrics names {unknown}; known "
                              f"metrics: {', '.join(sorted(known_metrics))}")
        mods = t.get("modalities")
        if mods is not None and (not isinstance(mods, list) or not mods
                                 or not set(mods) <= set(MODALITIES)):
            raise _fail(src, f"{at}.modalities", f"a list of {', '.join(MODALITIES)}", mods)
        task = StreamTask(
            name=tname,
            train=_path(src, f"{at}.train", t["train"], root),
            test=_path(src, f"{at}.test", t["test"], root),
            image_root=(_path(src, f"{at}.image-root", t["image-root"], root)
                        if "image-root" in t else image_root),
            metrics=tuple(metrics),
            max_new_tokens=(_int(src, f"{at}.max-new-tokens", t["max-new-tokens"])
                            if "max-new-tokens" in t else default_tokens),
            modalities=None if mods is None else tuple(mods),
            references=(_path(src, f"{at}.references", t["references"], root)
                        if "references" in t else None))
        if check_files:
            for key, p in (("train", task.train), ("test", task.test),
                           ("references", task.references)):
                if p is None:
                    continue
                if not p.is_file():
                    raise ConfigError(f"stream {str(src)!r}: {at}.{key} {str(p)!r} does not "
                                      "exist; place the data there or fix the path")
        tasks.append(task)
    return TaskStream(name, src, tuple(tasks))


@dataclass(frozen=True)
class TaskData:
    """One task of a run, opened: its samples (read lazily) and how it is scored."""

    spec: StreamTask
    train: TaskSamples
    test: TaskSamples

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def skipped(self) -> int:
        return len(self.train.skipped) + len(self.test.skipped)

    def modalities(self) -> list[str]:
        """The task's modalities: the stream file's list, else what its records carry."""
        if self.spec.modalities is not None:
            return [m for m in MODALITIES if m in self.spec.modalities]
        got = set(self.train.modalities()) | set(self.test.modalities())
        return [m for m in MODALITIES if m in got]


def open_task(task: StreamTask, on_error: str = "fail") -> TaskData:
    """Index a task's train and test files (no pixels read); bad records per ``on_error``.

    A task whose records carry a modality its stream entry does not list is refused: the run
    would otherwise feed a tower the stream says this task never uses."""
    data = TaskData(task, TaskSamples.read(task.name, task.train, task.image_root, on_error),
                    TaskSamples.read(task.name, task.test, task.image_root, on_error,
                                     task.references))
    if task.modalities is not None:
        got = set(data.train.modalities()) | set(data.test.modalities())
        extra = sorted(got - set(task.modalities))
        if extra:
            raise DataError(f"task {task.name!r}: its records carry {extra}, which its stream "
                            f"entry's `modalities` {list(task.modalities)} does not list; add "
                            "them or drop the `modalities` key")
    return data


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stream_text(folder: Path, name: str, tasks: Sequence[StreamTask]) -> str:
    """The stream file of ``tasks`` as written in ``folder`` (paths relative to it when inside)."""
    def rel(p: Path) -> str:
        return p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p)

    lines = [f"name = {_toml_str(name)}", ""]
    for t in tasks:
        lines += ["[[tasks]]", f"name = {_toml_str(t.name)}", f"train = {_toml_str(rel(t.train))}",
                  f"test = {_toml_str(rel(t.test))}",
                  f"image-root = {_toml_str(rel(t.image_root) if t.image_root != folder else '.')}",
                  "metrics = [" + ", ".join(_toml_str(m) for m in t.metrics) + "]"]
        if t.max_new_tokens is not None:
            lines.append(f"max-new-tokens = {t.max_new_tokens}")
        if t.modalities is not None:
            lines.append("modalities = [" + ", ".join(_toml_str(m) for m in t.modalities) + "]")
        if t.references is not None:
            lines.append(f"references = {_toml_str(rel(t.references))}")
        lines.append("")
    return "\n".join(lines)


def write_stream(path: Path, name: str, tasks: Sequence[StreamTask]) -> Path:
    """Write a stream file for ``tasks`` (atomically): the built-in benchmark's ``stream.toml``
    and every client folder's are written this way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(stream_text(path.parent, name, tasks), encoding="utf-8")
    tmp.replace(path)
    return path
