"""Continual-learning baselines as batch sources: what each training batch is drawn from.

All baselines train one shared LoRA adapter task after task with the same loop; they differ
only in the data of each batch:
- ``seq-lora``: the current task only (the forgetting reference);
- ``replay-lora``: the current task plus a bounded, task-balanced replay buffer
  (``replay.buffer-size`` samples in all, ``replay.mix-ratio`` of each batch);
- ``joint``: every task seen so far, balanced per task, with all their data (the multitask
  upper bound, run incrementally so it has a full accuracy matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from edge.replay import make_replay_buffer, mix_batch_sizes
from protocol.config import RunConfig
from protocol.manifest import Sample


class BatchSource(Protocol):
    def start_task(self, task: str, train: Sequence[Sample]) -> None: ...
    def batch(self, rng: np.random.Generator, batch_size: int) -> list[Sample]: ...
    def end_task(self, task: str, train: Sequence[Sample]) -> None: ...


def _draw(pool: Sequence[Sample], n: int, rng: np.random.Generator) -> list[Sample]:
    return [pool[i] for i in rng.integers(0, len(pool), n)]


class SequentialSource:
    def __init__(self, cfg: RunConfig):
        self.current: Sequence[Sample] = []

    def start_task(self, task: str, train: Sequence[Sample]) -> None:
        self.current = train

    def batch(self, rng: np.random.Generator, batch_size: int) -> list[Sample]:
        return _draw(self.current, batch_size, rng)

    def end_task(self, task: str, train: Sequence[Sample]) -> None:
        pass


class ReplaySource(SequentialSource):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.mix = cfg.replay.mix_ratio
        self.buffer = make_replay_buffer(cfg.replay.policy, cfg.replay.buffer_size, cfg.train.seed)

    def batch(self, rng: np.random.Generator, batch_size: int) -> list[Sample]:
        n_cur, n_old = mix_batch_sizes(batch_size, self.mix, len(self.buffer))
        old = self.buffer.sample(n_old, rng) if n_old else []
        return _draw(self.current, n_cur, rng) + old

    def end_task(self, task: str, train: Sequence[Sample]) -> None:
        self.buffer.add(task, train)


class JointSource:
    def __init__(self, cfg: RunConfig):
        self.seen: list[Sequence[Sample]] = []

    def start_task(self, task: str, train: Sequence[Sample]) -> None:
        self.seen.append(train)

    def batch(self, rng: np.random.Generator, batch_size: int) -> list[Sample]:
        which = rng.integers(0, len(self.seen), batch_size)
        return [self.seen[k][int(rng.integers(0, len(self.seen[k])))] for k in which]

    def end_task(self, task: str, train: Sequence[Sample]) -> None:
        pass


METHODS: dict[str, Callable[[RunConfig], BatchSource]] = {
    "seq-lora": SequentialSource,
    "replay-lora": ReplaySource,
    "joint": JointSource,
}


def make_source(method: str, cfg: RunConfig) -> BatchSource:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method](cfg)
