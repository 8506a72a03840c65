"""What an edge process keeps between messages: the base model with its experts, and per-client
local data and feature caches.

Flower may run many (virtual) clients in one process (a simulation actor) or one client per
process (a SuperNode). The frozen base model is loaded once per process and shared; its LoRA
experts are named PEFT adapters whose *values* come from each message (the global experts) and
are overwritten before every use, so clients sharing a process never see each other's weights.
Adapters are created from the plan the message carries, so every process holds the same module
sets. Router features are base-model outputs (experts off), hence cached per (client, split, task).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from mole.global_model import EdgeModel
from protocol.config import RunConfig
from protocol.llava_format import TaskSamples
from protocol.manifest import Sample
from protocol.stream import STREAM_NAME, StreamTask, load_stream, open_task

CLIENT_STREAM = STREAM_NAME  # a client folder's own stream file (simulation.scenario writes it)


@dataclass
class LocalData:
    """A client's on-disk data (docs/design.md §3): a folder in the field's format with its own stream
    file, ``folder/stream.toml`` listing the tasks it holds (``<task>/train.json``,
    ``<task>/test.json``, each task's metrics and generation length) — the same reader as a
    user's stream, so a deployed node's folder is a stream like any other."""

    client_id: str
    folder: Path
    train: dict[str, TaskSamples]
    test: dict[str, TaskSamples]
    specs: dict[str, StreamTask] = field(default_factory=dict)

    @property
    def modalities(self) -> frozenset[str]:
        """The model modalities the client's data feeds (mole.modality names)."""
        got = {m for v in self.train.values() for m in v.modalities()}
        return frozenset(["language"] + ["vision"] * ("image" in got) + ["audio"] * ("audio" in got))

    def primary(self, task: str) -> str:
        return self.metrics(task)[0]

    def metrics(self, task: str) -> tuple[str, ...]:
        """``task``'s metrics from the folder's stream file (the first is the primary one)."""
        spec = self.specs.get(task)
        return spec.metrics if spec else ("exact",)

    def tokens(self, task: str, default: int) -> int:
        spec = self.specs.get(task)
        return (spec.max_new_tokens if spec and spec.max_new_tokens else None) or default


def sample_modalities(samples: list[Sample]) -> frozenset[str]:
    """Which towers ``samples`` exercise: language always, vision/audio when present."""
    return frozenset(["language"] + ["vision"] * any(s.image is not None for s in samples)
                     + ["audio"] * any(s.audio is not None for s in samples))


def load_local_data(folder: Path, tasks: list[str] | tuple[str, ...],
                    on_error: str = "fail") -> LocalData:
    """Read the client's stream (a task it does not list: it holds no data of it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"client data folder {str(folder)!r} does not exist; materialize "
                                "the scenario first (fedmole simulate does) or fix node config "
                                "`data-dir`")
    train: dict[str, TaskSamples] = {}
    test: dict[str, TaskSamples] = {}
    specs: dict[str, StreamTask] = {}
    path = folder / CLIENT_STREAM
    if not path.is_file():
        # The node's own state (``_state/``: checkpoints, the downlink cache) may live here even
        # when the node holds no task; anything else without a stream file is a mistake.
        if any(not p.name.startswith(("_", ".")) for p in folder.iterdir()):
            raise FileNotFoundError(
                f"client data folder {str(folder)!r} has no {CLIENT_STREAM}: a node's folder is a "
                "task stream in the field's format (stream.toml + <task>/train.json, test.json); "
                "materialize it with `fedmole deploy init` or write the stream file")
        return LocalData(folder.name, folder, train, test, specs)  # a client holding no task
    for t in load_stream(path, None).tasks:
        if t.name in tasks:
            d = open_task(t, on_error)
            train[t.name], test[t.name], specs[t.name] = d.train, d.test, t
    return LocalData(folder.name, folder, train, test, specs)


_MODELS: dict[tuple[str, str], EdgeModel] = {}
_DATA: dict[str, LocalData] = {}
_GUARD = threading.Lock()


def edge_model(cfg: RunConfig, base_path: Path) -> EdgeModel:
    """The process-wide model for this base and config (created on first use)."""
    key = (str(Path(base_path).resolve()), repr(cfg))
    with _GUARD:
        if key not in _MODELS:
            _MODELS.clear()  # a new run in the same process: drop the old one
            _MODELS[key] = EdgeModel(cfg, base_path)
        return _MODELS[key]


def local_data(folder: Path, tasks: list[str] | tuple[str, ...], on_error: str = "fail"
               ) -> LocalData:
    key = f"{Path(folder).resolve()}|{','.join(tasks)}|{on_error}"
    with _GUARD:
        if key not in _DATA:
            _DATA[key] = load_local_data(folder, tasks, on_error)
        return _DATA[key]
