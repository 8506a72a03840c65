"""The continual task loop: one function for every run — centralized baselines, centralized
D-MoLE and the federated cloud (whose ``learn`` runs the task's Flower rounds).

For each task t of the stream: ``learn(t, task)`` trains it, then ``score(i, seen)`` scores every
task i of the stream (future ones too: forward transfer) with the tasks seen so far, giving row
t of the accuracy matrix (each task's primary metric), then ``save(t, task)`` keeps the experts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class StreamResult:
    """What the task loop measured: row t of ``acc`` after task t (every task's primary
    metric), and every metric of every task in ``rows``."""

    acc: list[list[float]]
    rows: list[dict[str, dict[str, float]]]  # per row: task → every metric of that task
    logs: list[dict]  # per task: what ``learn`` reported


def run_tasks(label: str, tasks: list[str], learn: Callable[[int, str], dict],
              score: Callable[[str, list[str]], dict[str, float]],
              save: Callable[[int, str], None], primary: Callable[[str], str],
              progress: bool = True) -> StreamResult:
    """Learn task t, score every task of the stream with the tasks seen so far, save; a row of
    the matrix per task. Exceptions from the callbacks propagate (a stopped run stops here)."""
    res = StreamResult([], [], [])
    for t, task in enumerate(tasks):
        entry = learn(t, task)
        seen = tasks[: t + 1]
        detail = {i: score(i, seen) for i in tasks}
        res.rows.append(detail)
        res.acc.append([detail[i][primary(i)] for i in tasks])
        res.logs.append(entry)
        save(t, task)
        line = " ".join(f"{i}={a:.1f}" for i, a in zip(tasks, res.acc[-1], strict=True))
        log.info("[%s] after %s: %s", label, task, line)
        if progress:
            note = entry.get("note", "")
            print(f"[{label}] after task {t + 1}/{len(tasks)} ({task}{note}): {line}", flush=True)
    return res
