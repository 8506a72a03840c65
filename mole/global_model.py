"""The base model with every task's expert as a named PEFT adapter whose *values* are set from
outside (a round's message on a client, the global state on the cloud's exporter): the model
both sides build from an expert plan, so it lives below both.

Adapters are created from the plan, so every process holds the same module sets; values are
overwritten before every use, so clients sharing a process never see each other's weights.
Router features are base-model outputs (experts off), hence cached per (folder, split, task).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mole.backbone import load_backbone, pick_device, pick_dtype
from mole.batching import Encoder
from mole.experts import ExpertModel
from mole.modality import modality_map, module_dims
from mole.router import router_features
from protocol.config import LoraConfig, RunConfig
from protocol.manifest import Sample
from protocol.plan import ExpertPlan

KINDS = ("lora_A", "lora_B")


class SplitData(Protocol):
    """What :meth:`EdgeModel.features` reads of a client's data (edge.runtime.LocalData)."""

    @property
    def folder(self) -> Path: ...
    @property
    def train(self) -> Mapping[str, Sequence[Sample]]: ...
    @property
    def test(self) -> Mapping[str, Sequence[Sample]]: ...


class EdgeModel:
    """The process's base model + experts; values of experts are set per message."""

    def __init__(self, cfg: RunConfig, base_path: Path):
        device = pick_device(cfg.train.device)
        model, tok = load_backbone(base_path, device, pick_dtype(cfg.model.dtype, device))
        for p in model.parameters():
            p.requires_grad = False
        self.cfg = cfg
        self.model = model
        self.processor = tok  # the checkpoint's processor (or the own base's tokenizer)
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

    def features(self, data: SplitData, split: str, task: str) -> torch.Tensor:
        """(N, D) router features of the client's ``split`` samples of ``task`` (cached)."""
        key = (str(data.folder), split, task)
        if key not in self._features:
            samples = (data.train if split == "train" else data.test)[task]
            d = self.cfg.dmole
            self._features[key] = router_features(
                self.experts, self.enc, samples, self.cfg.train.eval_batch_size,
                weights=[d.router_vision_weight, 1.0, d.router_audio_weight])
        return self._features[key]
