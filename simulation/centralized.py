"""Centralized continual run: one LoRA adapter trained task after task on the whole stream.

For each task t of the stream: draw batches from the method's source, train the shared adapter
for ``train.steps-per-task`` steps, then evaluate on the test split of *every* task (future
ones too, for forward transfer) → row t of the accuracy matrix. The zero-shot row (base model,
no adapter) comes first. Outputs follow docs/design.md §3 (metrics.json, accuracy_matrix.png,
report.md) plus one PEFT adapter folder per task under ``experts/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mole.batching import Encoder, SampleEncoder
from mole.experts import ExpertModel
from mole.modality import modality_map, modules_by_modality
from mole.model import MoleModel
from mole.steps import evaluate, train_steps
from mole.task_loop import run_tasks
from protocol.config import RunConfig
from protocol.llava_format import TaskSamples
from protocol.stream import TaskData, TaskStream
from simulation.base import base_summary, load_base
from simulation.data import data_summary, open_stream, open_tasks
from simulation.methods import make_source
from simulation.metrics import modality_arrivals
from simulation.report import write_run_outputs

log = logging.getLogger(__name__)
ADAPTER = "shared"  # PEFT warns on names containing "lora"
# Every run's experts as adapters of the base's own HF class (mole.peft_export): OUT/peft/<name>
PEFT_DIR = "peft"


@dataclass
class Stream:
    """Everything a continual run needs: the base model, its encoder and the task data."""

    model: MoleModel
    enc: SampleEncoder
    base_path: Path
    stream: TaskStream
    data: dict[str, TaskData]
    max_new_tokens: int  # the run's default generation length (`train.max-new-tokens`)

    @property
    def tasks(self) -> list[str]:
        return self.stream.names

    @property
    def train(self) -> dict[str, TaskSamples]:
        return {t: d.train for t, d in self.data.items()}

    @property
    def test(self) -> dict[str, TaskSamples]:
        return {t: d.test for t, d in self.data.items()}

    @property
    def metrics(self) -> dict[str, tuple[str, ...]]:
        return {t: d.spec.metrics for t, d in self.data.items()}

    def primary(self, task: str) -> str:
        """The metric of ``task`` that the accuracy matrix holds (the stream's first)."""
        return self.data[task].spec.primary

    def tokens(self, task: str) -> int:
        """Generation length of ``task``: the stream's, else `train.max-new-tokens`."""
        return self.data[task].spec.max_new_tokens or self.max_new_tokens

    def modalities(self, task: str) -> list[str]:
        """The modalities ``task``'s samples carry (from the data, not the registry)."""
        return self.data[task].modalities()

    def data_summary(self) -> dict:
        return data_summary(self.stream, self.data, self.max_new_tokens)


def prepare_stream(cfg: RunConfig, progress: bool = True) -> Stream:
    stream = open_stream(cfg)
    data = open_tasks(cfg, stream)
    model, tok, base_path = load_base(cfg, data, progress)
    enc = Encoder.for_any(tok, model, cfg.model.max_length)
    return Stream(model, enc, base_path, stream, data, cfg.train.max_new_tokens)


def run_centralized(cfg: RunConfig, method: str, out: Path, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    source = make_source(method, cfg)  # fail fast on an unknown method
    st = prepare_stream(cfg, progress)
    model, enc, tasks, train, test, metrics = st.model, st.enc, st.tasks, st.train, st.test, st.metrics
    rng = np.random.default_rng(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    def score(task: str) -> dict[str, float]:
        return evaluate(model, enc, test[task], metrics[task], cfg.train.eval_batch_size,
                        st.tokens(task))

    experts = ExpertModel(model)
    zero = {t: score(t) for t in tasks}
    log.info("zero-shot: %s", {t: round(v[st.primary(t)], 1) for t, v in zero.items()})

    mmap = modality_map(model)
    experts.add_expert(ADAPTER, list(mmap), cfg.lora)
    experts.activate([ADAPTER], trainable=ADAPTER)
    n_trainable = sum(p.numel() for p in experts.trainable_parameters())

    bs = cfg.train.batch_size

    def learn(t: int, task: str) -> dict:
        source.start_task(task, train[task])
        stats = train_steps(
            model, lambda _s: enc.train_batch(source.batch(rng, bs)), cfg.train.steps_per_task,
            cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_fraction,
            desc=f"{method} task {t + 1}/{len(tasks)} {task}", progress=progress,
        )
        source.end_task(task, train[task])
        return {"task": task, "steps": stats.steps, "seconds": round(stats.seconds, 2),
                "first_loss": round(stats.first_loss, 4), "last_loss": round(stats.last_loss, 4),
                "note": f", {stats.seconds:.0f}s"}

    def save(t: int, task: str) -> None:
        experts.save_expert(ADAPTER, out / "experts" / f"after-{t:02d}-{task}")
        experts.save_peft(ADAPTER, st.base_path, out / PEFT_DIR / f"after-{t:02d}-{task}")

    res = run_tasks(method, tasks, learn, lambda task, _seen: score(task), save, st.primary,
                    progress)
    acc = res.acc
    extra = {
        "task_scores": res.rows[-1],
        "zero_shot_scores": zero,
        "train": [{k: v for k, v in e.items() if k != "note"} for e in res.logs],
        "trainable_params": n_trainable,
        "experts_per_modality": {m: len(v) for m, v in modules_by_modality(mmap).items()},
        "modality_arrivals": modality_arrivals(tasks, acc, {t: st.modalities(t) for t in tasks}),
        "base": base_summary(st.base_path),
        "data": st.data_summary(),
        "notes": [
            f"{method}: one LoRA adapter (rank {cfg.lora.rank}, alpha {cfg.lora.alpha}) on all "
            f"{len(mmap)} attention projections; {n_trainable} trainable parameters.",
            "Accuracy = each task's primary metric (the stream's first) on the greedy answer, in "
            "percent; every metric of every task is under task_scores.",
        ],
    }
    return write_run_outputs(
        out, method=method, tasks=tasks, acc_matrix=acc,
        zero_shot=[zero[t][st.primary(t)] for t in tasks], bytes_up=0, bytes_down=0,
        wall_s=time.perf_counter() - t_start, config=cfg.to_flat(), extra=extra,
    )
