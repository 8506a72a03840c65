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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mole.backbone import load_backbone, pick_device, pick_dtype
from mole.batching import Encoder
from mole.experts import ExpertModel
from mole.modality import modality_map, module_dims
from mole.router import router_features
from protocol.config import LoraConfig, RunConfig
from protocol.llava_format import TaskSamples
from protocol.manifest import Sample
from protocol.plan import ExpertPlan
from protocol.stream import STREAM_NAME, StreamTask, load_stream, open_task

KINDS = ("lora_A", "lora_B")
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
        if any(folder.iterdir()):
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


class EdgeModel:
    """The process's base model + experts; values of experts are set per message."""

    def __init__(self, cfg: RunConfig, base_path: Path):
        device = pick_device(cfg.train.device)
        model, tok = load_backbone(base_path, device, pick_dtype(cfg.model.dtype, device))
        for p in model.parameters():
            p.requires_grad = False
        self.cfg = cfg
        self.model = model
        self.enc = Encoder.for_any(tok, model, cfg.model.max_length)
        self.experts = ExpertModel(model)
        self.mmap = modality_map(model)
        self.dims = module_dims(model, list(self.mmap))
        self.lock = threading.Lock()  # one message at a time uses the model
        self._features: dict[tuple[str, str, str], torch.Tensor] = {}

    def sync_plan(self, plan: ExpertPlan) -> None:
        """Make this process's adapters match ``plan``: create missing ones, and re-create one
        whose modules differ (a process that served another run with another plan)."""
        for task in plan.tasks:
            specs = [e for e in plan.experts if e.task == task]
            if task in self.experts.experts:
                if self.experts.modules_of(task) == {e.module for e in specs}:
                    continue
                self.experts.remove_expert(task)
            lora = LoraConfig(rank=specs[0].rank, alpha=specs[0].alpha, dropout=self.cfg.lora.dropout)
            self.experts.add_expert(task, [e.module for e in specs], lora)

    def set_factors(self, task: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Load ``{"<module>.lora_A": (r, d_in), "<module>.lora_B": (d_out, r)}`` into expert ``task``."""
        with torch.no_grad():
            for key, value in tensors.items():
                module, _, kind = key.rpartition(".")
                layer = self.model.get_submodule(module)
                param = getattr(layer, kind)[task].weight
                src = torch.as_tensor(np.asarray(value, dtype=np.float32))
                if tuple(src.shape) != tuple(param.shape):
                    raise ValueError(f"expert {task!r} {key!r}: got shape {tuple(src.shape)}, the "
                                     f"adapter has {tuple(param.shape)}")
                param.copy_(src.to(param.device))

    def get_factors(self, task: str, plan: ExpertPlan) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for module in plan.modules_of(task):
            layer = self.model.get_submodule(module)
            for kind in KINDS:
                out[f"{module}.{kind}"] = getattr(layer, kind)[task].weight.detach().cpu().numpy().copy()
        return out

    def features(self, data: LocalData, split: str, task: str) -> torch.Tensor:
        """(N, D) router features of the client's ``split`` samples of ``task`` (cached)."""
        key = (str(data.folder), split, task)
        if key not in self._features:
            samples = (data.train if split == "train" else data.test)[task]
            d = self.cfg.dmole
            self._features[key] = router_features(
                self.experts, self.enc, samples, self.cfg.train.eval_batch_size,
                weights=[d.router_vision_weight, 1.0, d.router_audio_weight])
        return self._features[key]


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
