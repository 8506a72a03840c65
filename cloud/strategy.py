"""FedMoLE's Flower strategy: the D-MoLE task loop on Flower's own round loop (DESIGN §2).

It subclasses Flower's ``FedAvg`` and keeps its node sampling, message construction and round
loop (``Strategy.start``); only what a round *means* changes, by :mod:`cloud.schedule`:

* probe round of task t — clients reply with proxy scores (:class:`protocol.updates.ProbeReply`);
  the cloud takes their sample-weighted mean, runs the D-MoLE allocator (cloud.allocator) and
  extends the plan; the new experts start from one shared seeded init (A small, B = 0) so every
  client trains the same starting point;
* training rounds — clients reply with task t's LoRA factors (:class:`protocol.updates.ClientUpdate`);
  they are aggregated per modality by :class:`cloud.aggregation.DeltaAccumulator` (exact
  weighted-mean ΔW, then an SVD re-factor; see that module). A malformed or invalid reply is
  counted under ``rejected`` (reason → count) and the round goes on with the others.

Stock ``FedAvg.aggregate_train`` cannot do this: replies carry different keys per modality and
FedAvg averages A and B separately. A task's last training round also evaluates: every seen
task's experts go out and the clients' per-task accuracies, weighted by their test counts, form
row t of the accuracy matrix. Status: routers, checkpoints/--resume and the ClientApp come with
the rest of the federated issue.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from cloud.aggregation import AggregationSpec, DeltaAccumulator, UpdateError
from cloud.allocator import AllocationError, allocate, weighted_mean_scores
from cloud.schedule import PROBE, round_plan
from protocol.config import RunConfig
from protocol.plan import ExpertPlan
from protocol.updates import ClientUpdate, MessageError, decode_eval, decode_probe, decode_update

log = logging.getLogger(__name__)


def initial_factors(plan: ExpertPlan, task: str, dims: Mapping[str, tuple[int, int]], seed: int
                    ) -> dict[str, np.ndarray]:
    """Task ``task``'s experts at init: A ~ U(±1/√d_in) (PEFT's kaiming-uniform bound), B = 0."""
    rng = np.random.default_rng([seed, len(plan.tasks)])
    out: dict[str, np.ndarray] = {}
    for e in (e for e in plan.experts if e.task == task):
        d_in, d_out = dims[e.module]
        bound = 1.0 / np.sqrt(d_in)
        out[f"{e.module}.lora_A"] = rng.uniform(-bound, bound, (e.rank, d_in)).astype(np.float32)
        out[f"{e.module}.lora_B"] = np.zeros((d_out, e.rank), np.float32)
    return out


class FedMoleStrategy(FedAvg):
    def __init__(self, cfg: RunConfig, modality_of: Mapping[str, str],
                 dims: Mapping[str, tuple[int, int]], rule: str = "svd", round_offset: int = 0):
        fed = cfg.federation
        super().__init__(fraction_train=fed.fraction, fraction_evaluate=fed.fraction,
                         min_train_nodes=fed.min_clients, min_evaluate_nodes=fed.min_clients,
                         min_available_nodes=fed.min_clients)
        self.cfg = cfg
        self.tasks = list(cfg.data.tasks)
        self.dims = dict(dims)
        self.rule = rule
        self.offset = round_offset
        self.plan = ExpertPlan.empty(modality_of)
        self.experts: dict[str, dict[str, np.ndarray]] = {}  # task → global LoRA factors
        self.rejected: Counter[str] = Counter()
        # Row t: accuracy (%) on every task after training through task t, NaN where no client
        # holding that task replied (weighted by the clients' test counts).
        self.acc_matrix: dict[int, list[float]] = {}

    def _round(self, server_round: int):  # Flower's round → the global schedule
        return round_plan(server_round + self.offset, self.tasks, self.cfg.federation.rounds_per_task)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rp = self._round(server_round)
        # Clients echo "global-round" in their updates: a reply for another round is stale.
        config = ConfigRecord({"phase": rp.phase, "task": rp.task, "task-index": rp.task_index,
                               "train-round": rp.train_round, "global-round": rp.server_round})
        if rp.phase == PROBE:
            arrays = ArrayRecord()
        else:
            config["plan"] = json.dumps(self.plan.to_json())
            arrays = _as_record(self.experts[rp.task])
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rp = self._round(server_round)
        contents = []
        for m in replies:
            if m.has_error():
                self.rejected["client-error"] += 1
            else:
                contents.append(m.content)
        if rp.phase == PROBE:
            return self._allocate(rp.task, contents)
        return self._aggregate(rp.task, rp.server_round, contents)

    def _allocate(self, task: str, contents: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rows = []
        for c in contents:
            try:
                p = decode_probe(c)
            except MessageError as e:
                self.rejected["malformed"] += 1
                log.warning("probe reply rejected: %s", e)
                continue
            if p.task != task:
                self.rejected["stale-task"] += 1
                continue
            rows.append((p.scores, p.n_samples))
        if not rows:
            raise RuntimeError(f"no valid probe reply for task {task!r}; cannot allocate its experts")
        try:
            scores = weighted_mean_scores(rows)
            d = self.cfg.dmole
            alloc = allocate(task, scores, self.plan.modality_of, kappa=d.budget_fraction,
                             floor=d.modality_floor, uniform=d.allocation == "uniform")
        except AllocationError as e:
            raise RuntimeError(f"allocation of task {task!r} failed: {e}") from e
        self.plan = self.plan.with_task(alloc, self.cfg.lora.rank, self.cfg.lora.alpha)
        self.experts[task] = initial_factors(self.plan, task, self.dims, self.cfg.federation.seed)
        return _as_record(self.experts[task]), MetricRecord(
            {"probe-clients": len(rows), "experts": len(alloc.modules)})

    def _aggregate(self, task: str, global_round: int, contents: list
                   ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        acc = DeltaAccumulator(AggregationSpec.from_plan(self.plan, task, self.dims), self.rule,
                               round=global_round)
        for c in contents:
            try:
                update: ClientUpdate = decode_update(c)
                acc.add(update)
            except (MessageError, UpdateError) as e:
                self.rejected["malformed" if isinstance(e, MessageError) else "invalid"] += 1
                log.warning("update rejected: %s", e)
        result = acc.finalize()
        self.experts[task] = {**self.experts[task], **result.tensors()}
        errors = [r.error for r in result.modules.values()]
        return _as_record(self.experts[task]), MetricRecord(
            {"clients": len(result.clients), "max-truncation-error": max(errors, default=0.0)})


    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Only a task's last training round evaluates: every expert seen so far goes out."""
        rp = self._round(server_round)
        if not rp.evaluate:
            return []
        seen = self.tasks[: rp.task_index + 1]
        config = ConfigRecord({"phase": "evaluate", "task": rp.task, "seen": seen,
                               "global-round": rp.server_round,
                               "plan": json.dumps(self.plan.to_json())})
        arrays = _as_record({f"{t}/{k}": v for t in seen for k, v in self.experts[t].items()})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        rp = self._round(server_round)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for m in replies:
            if m.has_error():
                self.rejected["client-error"] += 1
                continue
            try:
                e = decode_eval(m.content)
            except MessageError as err:
                self.rejected["malformed"] += 1
                log.warning("evaluation reply rejected: %s", err)
                continue
            if e.global_round != rp.server_round or not set(e.scores) <= set(self.tasks):
                self.rejected["stale-or-unknown"] += 1
                continue
            for task, (acc, n) in e.scores.items():
                sums[task] = sums.get(task, 0.0) + acc * n
                counts[task] = counts.get(task, 0) + n
        row = [sums[t] / counts[t] if t in counts else float("nan") for t in self.tasks]
        self.acc_matrix[rp.task_index] = row
        return MetricRecord({f"acc/{t}": a for t, a in zip(self.tasks, row, strict=True)
                             if t in counts})


def _as_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
