"""Which task and phase a Flower server round belongs to (docs/design.md §2 on Flower's round loop).

Flower's ``Strategy.start`` runs numbered server rounds (train → evaluate each round). FedMoLE
lays the continual task loop onto them without re-implementing that loop: task t (0-based) owns
``1 + R`` consecutive rounds, R = ``federation.rounds-per-task``::

    round 1 + t·(1+R)           probe  — clients send proxy scores; the cloud allocates t's experts
    rounds 2 + t·(1+R) … (1+R)(t+1)   train — clients train t's experts; the cloud aggregates them
    the last train round of t    also evaluates every task seen so far (row t of the matrix)

so a stream of T tasks takes T·(1+R) server rounds. The FedAvg baselines (one shared adapter, no
allocation) have no probe round: ``probe=False`` gives each task R rounds, all training. A
resumed run continues from a checkpointed round: it calls ``start`` with the remaining rounds and
adds the offset to Flower's round number.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE, TRAIN = "probe", "train"


@dataclass(frozen=True)
class RoundPlan:
    server_round: int  # global, 1-based
    task_index: int  # 0-based position in the stream
    task: str
    phase: str  # "probe" | "train"
    train_round: int  # 1..R within the task's training rounds; 0 in the probe round
    evaluate: bool  # the task's last training round: evaluate every task seen so far


def total_rounds(n_tasks: int, rounds_per_task: int, probe: bool = True) -> int:
    if n_tasks < 1 or rounds_per_task < 1:
        raise ValueError(f"need >= 1 task and >= 1 round per task, got {n_tasks} and {rounds_per_task}")
    return n_tasks * (int(probe) + rounds_per_task)


def round_plan(server_round: int, tasks: list[str] | tuple[str, ...], rounds_per_task: int,
               probe: bool = True) -> RoundPlan:
    """The task and phase of global round ``server_round`` (1-based)."""
    last = total_rounds(len(tasks), rounds_per_task, probe)
    if not 1 <= server_round <= last:
        raise ValueError(f"server round {server_round} is outside 1..{last} ({len(tasks)} tasks × "
                         f"({int(probe)} probe + {rounds_per_task} training rounds))")
    t, k = divmod(server_round - 1, int(probe) + rounds_per_task)  # k = 0 probe, 1..R train
    k += int(not probe)
    return RoundPlan(server_round, t, tasks[t], PROBE if k == 0 else TRAIN, k,
                     evaluate=k == rounds_per_task)
