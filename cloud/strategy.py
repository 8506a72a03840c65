"""FedMoLE's Flower strategy: the D-MoLE task loop on Flower's own round loop (docs/design.md §2).

It subclasses Flower's ``FedAvg`` and keeps its node sampling, message construction and round
loop (``Strategy.start``); only what a round *means* changes, by :mod:`cloud.schedule`:

* probe round of task t — clients reply with proxy scores, co-activation votes and a first local
  fit of task t's autoencoder (:class:`protocol.updates.ProbeReply` + router part); the cloud
  takes the scores' sample-weighted mean, runs the D-MoLE allocator (cloud.allocator), extends
  the plan, picks the partner (the older task with ≥ ``dmole.coactivate-share`` of all votes),
  and FedAvg's the autoencoders. New experts start from one shared seeded init (A small, B = 0).
* training rounds — clients reply with task t's LoRA factors (:class:`protocol.updates.ClientUpdate`)
  and their router part; factors are aggregated **per modality** by
  :class:`cloud.aggregation.DeltaAccumulator` (exact weighted-mean ΔW = B·A, then an SVD re-factor
  to rank r; averaging A and B separately is not averaging ΔW — see that module), routers by
  :class:`cloud.routers.RouterAccumulator` (FedAvg of AE weights from a common init; τ from the
  pooled held-out error histogram). A malformed or invalid reply is counted under ``rejected``
  (reason → count) and the round goes on with the others.
* a task's last training round also evaluates every client on its local test data of every task
  with the global experts and routers; count-weighted accuracies form row t of the matrix.

The FedAvg baselines (``fedavg-seq-lora``, ``fedavg-replay-lora``) run through the same code with
one shared adapter on every candidate module, no probe round and no router.

The strategy does no network work: ``start`` runs Flower's loop on :class:`cloud.downlink.Downlink`,
the grid wrapper that sends each node only the global state it lacks and re-sends a round short
of its quorum (``retry_policy`` says to whom); ``aggregate_train`` receives every reply and
returns the global experts and routers as the round's ``ArrayRecord`` (``Result.arrays`` at the
end). Sampling uses Flower's ``sample_nodes`` with the round's minimums as local values.

Dropout (``federation.dropout``) is simulated here: each sampled node's training message is
withheld with that probability (seeded per round), so the round proceeds with the others, as
with a client that never answers. Evaluation messages are never withheld (the matrix is a
measurement). After every round the whole :class:`protocol.state.GlobalState` can be checkpointed
(``on_round_end``); ``GlobalState.round`` offsets Flower's round numbers on resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from cloud import comm
from cloud.aggregation import (
    AggregationSpec,
    DeltaAccumulator,
    UpdateError,
    clip_scales,
    deviation_norm,
    validate_update,
)
from cloud.allocator import (
    AllocationError,
    all_modules_allocation,
    allocate,
    choose_partner,
    weighted_mean_scores,
)
from cloud.downlink import Downlink
from cloud.robust import parse_rules, trim_count
from cloud.routers import RouterAccumulator, RouterUpdateError
from cloud.schedule import PROBE, RoundPlan, round_plan, total_rounds
from protocol.config import RunConfig
from protocol.instructions import SHARED, Instruction, as_sent, is_shared, pack_state
from protocol.plan import ExpertPlan
from protocol.state import GlobalState, save_checkpoint
from protocol.updates import (
    ClientUpdate,
    MessageError,
    decode_eval,
    decode_probe,
    decode_router_part,
    decode_update,
    skip_reason,
)

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


class _Among:
    """A view of Flower's Grid whose node list is narrowed to ``nodes`` (for sampling)."""

    def __init__(self, grid: Grid, nodes: set[int]):
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return sorted(self._nodes & set(self._grid.get_node_ids()))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class StopRun(Exception):
    """Raised after a checkpoint to end the run early (fault injection: a killed server)."""


class FedMoleStrategy(FedAvg):
    def __init__(self, cfg: RunConfig, modality_of: Mapping[str, str],
                 dims: Mapping[str, tuple[int, int]], rule: str = "svd",
                 state: GlobalState | None = None, router_dim: int | None = None,
                 full_model_bytes: int = 0, checkpoint_dir: Path | None = None):
        fed = cfg.federation
        super().__init__(fraction_train=fed.fraction, fraction_evaluate=1.0,
                         min_train_nodes=fed.min_clients, min_evaluate_nodes=fed.min_clients,
                         min_available_nodes=fed.min_clients)
        self.cfg = cfg
        self.tasks = list(cfg.data.tasks)
        self.dims = dict(dims)
        if fed.server_lr != 1.0 and rule != "svd":
            raise ValueError(f"federation.server-lr={fed.server_lr} needs the 'svd' aggregation "
                             f"rule (got {rule!r}); set federation.server-lr = 1")
        self.rule = rule
        self.method = fed.method
        self.probe = not is_shared(self.method)
        self.router_on = self.probe and cfg.dmole.router == "autoencoder"
        self.router_dim = router_dim
        self.checkpoint_dir = checkpoint_dir
        if state is None:
            state = GlobalState(ExpertPlan.empty(modality_of), self.method,
                                comm=comm.new_comm(full_model_bytes))
            if not self.probe:  # the baselines: one adapter on every module from the start
                alloc = all_modules_allocation(SHARED, state.plan.modality_of)
                state.plan = state.plan.with_task(alloc, cfg.lora.rank, cfg.lora.alpha)
                state.experts[SHARED] = as_sent(initial_factors(state.plan, SHARED, self.dims,
                                                                fed.seed), fed.downlink_compression)
        if state.method != self.method:
            raise ValueError(f"the checkpoint is of method {state.method!r}, this run is "
                             f"{self.method!r}; resume with the same method")
        self.state = state
        self.offset = state.round
        try:
            self.centers = parse_rules(fed.aggregation, sorted(set(modality_of.values())),
                                       trim=fed.trim_fraction, dp_clip=fed.dp_clip,
                                       dp_noise=fed.dp_noise, dp_modalities=fed.dp_modalities)
        except ValueError as e:
            raise ValueError(f"federation.aggregation / dp-*: {e}") from e
        # The training round in flight and its messages (for the quorum's retries).
        self._pending: RoundPlan | None = None
        self._sent: list[Message] = []
        self.stop_after_round = 0
        # Called after a task's evaluation round is checkpointed: (state, task index, task) →
        # the published bundle's id (cloud.publish via the ServerApp); None = don't publish.
        self.publisher: Callable[[GlobalState, int, str], str] | None = None
        # (task, client) → the sample count it declared in the task's probe round (capped).
        self.declared: dict[tuple[str, str], int] = {}
        # task → Flower node ids that answered its probe with data / its probe or a training
        # round with "no data of the task" (this process's run only: node ids are the link's)
        self.holders: dict[str, set[int]] = {}
        # (task, node) → the sample count that node declared in the task's probe (capped): the
        # draw probabilities of federation.client-sampling = "size".
        self.node_samples: dict[tuple[str, int], int] = {}
        # node → its number of draws in the training round in flight (client-sampling "size":
        # the weight of its update, as the draws are made ∝ samples); empty = weights by samples.
        self._draws: dict[int, int] = {}
        self.idle: dict[str, set[int]] = {}
        self._idle_last: set[int] = set()
        # node → group → digest of the global state it holds (cloud.downlink; in memory)
        self.ledger: dict[int, dict[str, str]] = {}
        self.downlink: Downlink | None = None
        self.result: Result | None = None  # the last Strategy.start's (cloud.server_app)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args, **kwargs):  # type: ignore[override]
        """Flower's round loop, on a grid that sends each node only what it lacks
        (``federation.downlink``) and counts the bytes as they leave."""
        if not isinstance(grid, Downlink):
            self.downlink = Downlink(grid, self._count_down,
                                     delta=self.cfg.federation.downlink == "delta", ledger=self.ledger,
                                     retry=self.retry_policy)
            grid = cast(Grid, self.downlink)
        return super().start(grid, initial_arrays, *args, **kwargs)

    def global_arrays(self) -> ArrayRecord:
        """The global state as Flower carries it between rounds (``Strategy.start``'s arrays and
        its ``Result.arrays``): every expert and router, float32 as the cloud holds them."""
        return pack_state(self.state.experts, self.state.routers)

    def _exchange_s(self) -> float:
        """Seconds the round's last exchange took, as the cloud saw it (cloud.downlink)."""
        return round(self.downlink.last_exchange_s, 3) if self.downlink is not None else 0.0

    def _count_down(self, content: RecordDict) -> None:
        comm.add(self.state.comm, "down", comm.payload_bytes(content, self.plan.modality_of))
        self.state.comm["messages_down"] = self.state.comm.get("messages_down", 0) + 1

    def _held(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global state as the clients decode it (protocol.instructions.as_sent)."""
        return as_sent(tensors, self.cfg.federation.downlink_compression)

    def _pack(self, experts: Mapping[str, Mapping[str, np.ndarray]],
              routers: Mapping[str, Mapping[str, np.ndarray]]) -> ArrayRecord:
        return pack_state(experts, routers, self.cfg.federation.downlink_compression)

    # -- convenience ---------------------------------------------------------------------------
    @property
    def plan(self) -> ExpertPlan:
        return self.state.plan

    @property
    def rejected(self):
        return self.state.rejected

    @property
    def total_rounds(self) -> int:
        return total_rounds(len(self.tasks), self.cfg.federation.rounds_per_task, self.probe)

    def _round(self, server_round: int) -> RoundPlan:  # Flower's round → the global schedule
        return round_plan(server_round + self.offset, self.tasks, self.cfg.federation.rounds_per_task,
                          self.probe)

    def _instruction(self, rp: RoundPlan, phase: str, **kw) -> ConfigRecord:
        return Instruction(phase=phase, task=rp.task, task_index=rp.task_index,
                           global_round=rp.server_round, method=self.method, plan=self.plan,
                           train_round=rp.train_round, rounds=self.cfg.federation.rounds_per_task,
                           router_seed=self.cfg.federation.seed * 1000 + rp.task_index, **kw
                           ).to_record()

    @staticmethod
    def _send(msgs: Iterable[Message]) -> list[Message]:
        # The bytes are counted as they leave (cloud.downlink), after the delta is taken.
        return list(msgs)

    def _received_from(self, replies: Iterable[Message], rp: RoundPlan
                       ) -> list[tuple[int, RecordDict]]:
        """(sending node, content) of every reply that carries one (errors are counted)."""
        out = []
        for m in replies:
            if m.has_error():
                self._reject("client-error", m.metadata.src_node_id)
                log.warning("round %d: client error %s", rp.server_round, m.error)
                continue
            comm.add(self.state.comm, "up", comm.payload_bytes(m.content, self.plan.modality_of))
            if skip_reason(m.content) is not None:
                continue
            out.append((m.metadata.src_node_id, m.content))
        return out

    # -- quorum and deadline -------------------------------------------------------------------
    def _await_nodes(self, grid: Grid, need: int, rp: RoundPlan) -> int:
        """Wait up to federation.round-timeout for ``need`` connected nodes; how many there are.
        (Flower's own sampling would wait for ever.)"""
        deadline = time.monotonic() + self.cfg.federation.round_timeout
        n = len(list(grid.get_node_ids()))
        while n < need and time.monotonic() < deadline:
            time.sleep(1.0)
            n = len(list(grid.get_node_ids()))
        if n < need:
            log.warning("round %d: %d of the %d nodes needed are connected after %.0f s "
                        "(federation.round-timeout); going on with those", rp.server_round, n,
                        need, self.cfg.federation.round_timeout)
        return n

    def _sample(self, grid: Grid, rp: RoundPlan, server_round: int, arrays: ArrayRecord,
                config: ConfigRecord, kind: str, fraction: float, min_nodes: int,
                pool: Grid | None = None, among: int | None = None,
                sizes: Mapping[int, int] | None = None) -> list[Message]:
        """Flower's sampling (``sample_nodes`` over ``pool``, FedAvg's sample size: ``fraction``
        of the pool, at least ``min_nodes``) and its messages, with the node minimums lowered to
        what is connected once the deadline has passed (or to ``among``, the size of a narrowed
        pool) — as local values: the strategy's fields stay as configured. No node at all → no
        message (the round is skipped).

        ``sizes`` (node → samples, every node of ``pool``): instead of Flower's uniform draw
        without replacement, that many draws *with* replacement ∝ samples; each drawn node gets
        one message and its number of draws becomes the weight of its update (``_draws``) —
        FedAvg's unbiased sampling scheme (Li et al., ICLR 2020, scheme I): E[Σ draws·Δ_c] / k =
        Σ_c n_c·Δ_c / Σ_c n_c, the full participation mean, while a large client, whose update is
        the least noisy, is the one most often asked."""
        n = self._await_nodes(grid, self.min_available_nodes, rp)
        if n == 0 or fraction == 0.0:
            return []
        n = min(n, among) if among is not None else n
        pool = grid if pool is None else pool
        size = max(int(len(list(pool.get_node_ids())) * fraction), min(min_nodes, n))
        self._draws = {}
        if sizes is not None:
            ids = sorted(int(i) for i in pool.get_node_ids())
            w = np.array([sizes[i] for i in ids], dtype=np.float64)
            rng = np.random.default_rng([self.cfg.federation.seed, server_round, 13])
            drawn = rng.choice(len(ids), size=min(size, n), replace=True, p=w / w.sum())
            for j in drawn:
                self._draws[ids[int(j)]] = self._draws.get(ids[int(j)], 0) + 1
            node_ids = sorted(self._draws)
        else:
            node_ids, _ = sample_nodes(pool, min(self.min_available_nodes, n), size)
        config["server-round"] = server_round  # as FedAvg does
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, kind))

    def _usable(self, rp: RoundPlan, content: RecordDict) -> bool:
        """Whether a reply can count towards the round's quorum (it decodes and is this round's)."""
        try:
            if rp.phase == PROBE:
                return decode_probe(content).task == rp.task
            update = decode_update(content)
            return update.task == rp.task and update.round == rp.server_round
        except MessageError:
            return False

    def _reject(self, kind: str, node: int | None) -> None:
        """Count one rejected or repaired reply under ``kind``, in total and for its node."""
        self.rejected[kind] += 1
        if node is not None:
            per = self.state.rejected_by_node.setdefault(str(node), {})
            per[kind] = per.get(kind, 0) + 1

    def retry_policy(self, replies: list[Message], attempt: int) -> list[Message]:
        """What to send again after ``attempt - 1`` retries of the training round in flight,
        given every reply so far: the nodes without a usable reply, while fewer than
        federation.quorum are usable (federation.round-retries times; empty = done). The grid
        wrapper (cloud.downlink) calls it and does the sending, so ``aggregate_train`` receives
        every reply and does no network work. Whether the round then counts is decided on the
        fully validated replies (``_aggregate``)."""
        fed, rp = self.cfg.federation, self._pending
        if rp is None or attempt > fed.round_retries:
            return []
        heard = [m for m in replies if not m.has_error()]
        # Nodes that answered "nothing to do" (no data of the task) were heard: not re-sent.
        idle = {m.metadata.src_node_id for m in heard if skip_reason(m.content) is not None}
        ok = {m.metadata.src_node_id for m in heard
              if skip_reason(m.content) is None and self._usable(rp, m.content)}
        if len(ok) >= fed.quorum:
            return []
        again = [m for m in self._sent if m.metadata.dst_node_id not in ok | idle]
        if not again:
            return []
        log.warning("round %d: %d usable replies, quorum %d; re-sending to %d nodes "
                    "(retry %d of %d)", rp.server_round, len(ok), fed.quorum, len(again),
                    attempt, fed.round_retries)
        fresh = [Message(content=m.content, message_type=m.metadata.message_type,
                         dst_node_id=m.metadata.dst_node_id, group_id=m.metadata.group_id)
                 for m in again]
        fresh = self._drop(fresh, rp, attempt)
        self.state.rejected["retried"] += len(fresh)
        return fresh

    def _collect(self, rp: RoundPlan, replies: Iterable[Message]) -> list[tuple[int, RecordDict]]:
        """(node, content) of the round's replies (retries included); the nodes that said they
        hold no data of the task are remembered for its later rounds."""
        replies = list(replies)
        self._idle_last = {m.metadata.src_node_id for m in replies
                           if not m.has_error() and skip_reason(m.content) is not None}
        return self._received_from(replies, rp)

    # -- training rounds -----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rp = self._round(server_round)
        s = self.state
        if rp.phase == PROBE:
            # A router without τ (no training round of its task reached a holder) cannot route.
            older = {t: s.routers[t] for t in s.plan.tasks if t in s.routers and t in s.thresholds}
            config = self._instruction(rp, PROBE, thresholds={t: s.thresholds[t] for t in older})
            arrays = self._pack({}, older)
        else:
            name = SHARED if not self.probe else rp.task
            partners = s.partners.get(name, [])
            router_fit = self.router_on and rp.train_round < min(self.cfg.federation.router_rounds,
                                                                 self.cfg.federation.rounds_per_task)
            config = self._instruction(rp, "train", partners={name: tuple(partners)},
                                       router_fit=router_fit)
            routers = {rp.task: s.routers[rp.task]} if self.router_on and rp.task in s.routers else {}
            arrays = self._pack({t: s.experts[t] for t in [name, *partners]}, routers)
        # The probe goes to every available client: it is cheap (a few batches and a small
        # autoencoder fit) and the allocation needs the clients that hold task t, which a
        # 10% sample of many clients can miss entirely.
        fraction = 1.0 if rp.phase == PROBE else self.fraction_train
        # A sampled training round goes to the task's holders (the nodes that answered its
        # probe with data): a node without the task's data can only reply "no data". Unknown
        # holders (a resumed run, a probe nobody answered) → all nodes, as Flower samples. An
        # unsampled round skips only the nodes that said they hold none of the task's data
        # (a node that joined since the probe still gets it).
        pool: Grid = grid
        nodes = set(grid.get_node_ids())
        holders = self.holders.get(rp.task, set()) & nodes
        if rp.phase != PROBE and fraction < 1.0 and holders:
            pool = cast(Grid, _Among(grid, holders))  # duck-typed: Flower reads get_node_ids
        elif rp.phase != PROBE and (rest := nodes - self.idle.get(rp.task, set())) and rest != nodes:
            holders = rest
            pool = cast(Grid, _Among(grid, holders))
        sizes = None
        if (rp.phase != PROBE and fraction < 1.0 and holders and pool is not grid
                and self.cfg.federation.client_sampling == "size"):
            sizes = {h: self.node_samples.get((rp.task, h), 0) for h in holders}
            if not all(sizes.values()):  # a resumed cloud does not know them: uniform
                sizes = None
        msgs = self._sample(grid, rp, server_round, arrays, config, MessageType.TRAIN, fraction,
                            self.min_train_nodes, pool,
                            among=len(holders) if pool is not grid else None, sizes=sizes)
        self._pending, self._sent = rp, msgs
        return self._send(self._drop(msgs, rp))

    def _drop(self, msgs: list[Message], rp: RoundPlan, attempt: int = 0) -> list[Message]:
        p = self.cfg.federation.dropout
        if p <= 0:
            return msgs
        rng = np.random.default_rng([self.cfg.federation.seed, rp.server_round, 7, attempt])
        keep = [m for m in msgs if rng.random() >= p]
        self.state.rejected["dropped"] += len(msgs) - len(keep)
        return keep

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rp = self._round(server_round)
        contents = self._collect(rp, replies)
        self._pending, self._sent = None, []
        if rp.phase == PROBE:  # a task needs a plan: below quorum it still allocates (see there)
            self.idle[rp.task] = self._idle_last - self.holders.get(rp.task, set())
            metrics = self._allocate(rp.task, contents)
        else:
            # A training round's "no data" replies teach the same (a resumed cloud, which knows
            # no node's holdings, sends its first training round to all nodes, then no more).
            self.idle.setdefault(rp.task, set()).update(self._idle_last)
            metrics = self._aggregate(rp, contents)
        self.state.rounds.append({"round": rp.server_round, "task": rp.task, "phase": rp.phase,
                                  "time": round(time.time(), 2), "exchange_s": self._exchange_s(),
                                  "bytes_up": self.state.comm["bytes_up"],
                                  "bytes_down": self.state.comm["bytes_down"], **metrics})
        return self.global_arrays(), MetricRecord({k: v for k, v in metrics.items()
                                   if isinstance(v, int | float) and not isinstance(v, bool)})

    def _allocate(self, task: str, contents: list[tuple[int, RecordDict]]) -> dict:
        rows: list = []
        votes: dict[str, int] = {}
        n_total = 0
        routers = self._router_acc(task)
        for node, c in contents:
            try:
                p = decode_probe(c)
                if p.task != task:
                    self._reject("stale-task", node)
                    continue
                candidates = set(self.plan.modality_of)
                if set(p.scores) != candidates or not all(
                        np.isfinite(v) and abs(v) < 1e30 for v in p.scores.values()):
                    # One client's scores must not be able to stop the task's allocation.
                    self._reject("invalid", node)
                    log.warning("probe reply of %r rejected: scores must cover exactly the %d "
                                "candidate modules with finite values below 1e30", p.client_id,
                                len(candidates))
                    continue
                part = decode_router_part(c)
                if routers is not None and part is not None:
                    routers.add(p.client_id, part.n_samples, part.state, part.histogram)
            except (MessageError, RouterUpdateError) as e:
                self._reject("malformed", node)
                log.warning("probe reply rejected: %s", e)
                continue
            n = self._cap(p.client_id, task, p.n_samples, node)
            self.declared[(task, p.client_id)] = n
            self.holders.setdefault(task, set()).add(node)
            self.node_samples[(task, node)] = n
            rows.append((p.scores, n))
            n_total += n
            for t, v in p.votes.items():
                if t in self.plan.tasks:
                    votes[t] = votes.get(t, 0) + v
            self.state.comm["client_rounds"] += 1
        if not rows:  # nobody answered with data: allocate blind rather than stop the run
            log.warning("no valid probe reply for task %r: allocating from equal scores", task)
            self.rejected["probe-fallback"] += 1
            rows = [(dict.fromkeys(self.plan.modality_of, 1.0), 1)]
        try:
            scores = weighted_mean_scores(rows)
            d = self.cfg.dmole
            alloc = allocate(task, scores, self.plan.modality_of, kappa=d.budget_fraction,
                             floor=d.modality_floor, uniform=d.allocation == "uniform")
        except AllocationError as e:
            raise RuntimeError(f"allocation of task {task!r} failed: {e}") from e
        s = self.state
        s.plan = s.plan.with_task(alloc, self.cfg.lora.rank, self.cfg.lora.alpha)
        s.experts[task] = self._held(initial_factors(s.plan, task, self.dims,
                                                     self.cfg.federation.seed))
        partner = choose_partner(votes, n_total, self.cfg.dmole.coactivate_share, s.plan.tasks)
        s.partners[task] = [partner] if partner else []
        if routers is not None and routers.n_clients:
            fitted = routers.finalize(self.cfg.dmole.router_quantile).state
            if fitted is not None:
                s.routers[task] = self._held(fitted)
        return {"probe-clients": len(rows), "experts": len(alloc.modules),
                **{f"experts/{k}": v for k, v in alloc.per_modality.items()},
                "partner": ",".join(s.partners[task]) or "-"}

    def _router_acc(self, task: str) -> RouterAccumulator | None:
        if not self.router_on or self.router_dim is None:
            return None
        return RouterAccumulator(task, self.router_dim, self.cfg.dmole.router_hidden)

    def _cap(self, client_id: str, task: str, n: int, node: int | None = None) -> int:
        """A claimed sample count, capped at what the client declared in the task's probe round
        (else at federation.max-client-samples); a cap is counted under ``rejected``."""
        cap = min(self.declared.get((task, client_id), self.cfg.federation.max_client_samples),
                  self.cfg.federation.max_client_samples)
        if n > cap:
            self._reject("samples-capped", node)
            log.warning("client %r claims %d samples of %r; capped at %d", client_id, n, task, cap)
            return cap
        return n

    def _aggregate(self, rp: RoundPlan, contents: list[tuple[int, RecordDict]]) -> dict:
        name = SHARED if not self.probe else rp.task
        spec = AggregationSpec.from_plan(self.plan, name, self.dims)
        # The expert before this round, as ΔW per module (B·A, no scale): what a change is from.
        old = self.state.experts.get(name, {})
        reference = {m: old[f"{m}.lora_B"].astype(np.float64) @ old[f"{m}.lora_A"]
                     for m in spec.modules if f"{m}.lora_A" in old}
        acc = DeltaAccumulator(spec, self.rule, round=rp.server_round, centers=self.centers,
                               reference=reference, server_lr=self.cfg.federation.server_lr,
                               rng=np.random.default_rng([self.cfg.federation.seed, rp.server_round, 11]))
        routers = self._router_acc(rp.task)
        losses = []
        # Pass 1: decode and validate every reply; pass 2 folds them, norm outliers shrunk.
        valid: list[tuple[int, RecordDict, ClientUpdate]] = []
        seen: set[str] = set()
        for node, c in contents:
            try:
                update = decode_update(c)
                if not self.probe:  # the shared adapter travels under its own name
                    if update.task != rp.task:
                        raise UpdateError(f"client {update.client_id!r}: task {update.task!r}, "
                                          f"this round trains {rp.task!r}")
                    update = type(update)(update.client_id, SHARED, update.round, update.n_samples,
                                          update.modalities, update.tensors)
                validate_update(update, spec, round=rp.server_round, seen=seen)
            except (MessageError, UpdateError) as e:
                kind = "malformed" if isinstance(e, MessageError) else (
                    "duplicate" if "already added" in str(e) else "invalid")
                self._reject(kind, node)
                log.warning("update rejected: %s", e)
                continue
            seen.add(update.client_id)
            n = self._cap(update.client_id, rp.task, update.n_samples, node)
            if self._draws:  # drawn ∝ samples: the weight is the number of draws (see _sample)
                n = self._draws.get(node, 1)
            if n != update.n_samples:
                update = type(update)(update.client_id, update.task, update.round, n,
                                      update.modalities, update.tensors)
            valid.append((node, c, update))
        quorum = self.cfg.federation.quorum
        if len(valid) < quorum:
            self.rejected["round-skipped"] += 1
            log.warning("round %d (train of %r): %d valid replies, below federation.quorum=%d "
                        "after %d retries; skipped, the experts stay as they were",
                        rp.server_round, rp.task, len(valid), quorum,
                        self.cfg.federation.round_retries)
            return {"clients": 0, "skipped": 1}
        shrink = clip_scales({u.client_id: deviation_norm(u, reference) for _, _, u in valid},
                             self.cfg.federation.clip_factor)
        for node, c, update in valid:
            if shrink[update.client_id] < 1:
                self._reject("norm-clipped", node)
                log.warning("client %r changed the %r expert %.1f× more than allowed; shrunk",
                            update.client_id, name, 1 / shrink[update.client_id])
            acc.add(update, shrink[update.client_id], reference)
            if routers is not None:
                try:  # a bad router part loses the router part, not the expert update
                    part = decode_router_part(c)
                    if part is not None:
                        routers.add(update.client_id, part.n_samples, part.state, part.histogram)
                except (MessageError, RouterUpdateError) as e:
                    self._reject("router-invalid", node)
                    log.warning("router part rejected: %s", e)
            self.state.comm["client_rounds"] += 1
            loss = c["meta"].get("last-loss")
            if isinstance(loss, float):
                losses.append(loss)
        result = acc.finalize()
        if not result.clients:
            log.warning("round %d: no valid update for %s; its experts stay as they were",
                        rp.server_round, rp.task)
        self.state.experts[name] = {**self.state.experts[name], **self._held(result.tensors())}
        metrics: dict = {"clients": len(result.clients),
                         "max-truncation-error": max((r.error for r in result.modules.values()),
                                                     default=0.0)}
        if losses:
            metrics["client-loss"] = float(np.mean(losses))
        for k, center in result.centers.items():
            if center == "trimmed-mean" and result.clients_by_modality.get(k) and trim_count(
                    len(result.clients_by_modality[k]), self.centers[k].trim) == 0:
                log.warning("round %d: %d %s clients are too few to trim %.0f%% per end; the "
                            "trimmed mean is a plain mean this round", rp.server_round,
                            len(result.clients_by_modality[k]), k, 100 * self.centers[k].trim)
        if result.dp:
            # one Gaussian release per modality (the accounting in cloud.robust.gaussian_epsilon)
            metrics["dp"] = {k: {"clients": int(v["clients"]), "clipped": int(v["clipped"]),
                                 "sigma": float(v["sigma"]), "z": self.centers[k].dp_noise}
                             for k, v in result.dp.items()}
        if routers is not None and routers.n_clients:
            r = routers.finalize(self.cfg.dmole.router_quantile)
            if r.state is not None:
                self.state.routers[rp.task] = self._held(r.state)
            if r.threshold is not None:
                self.state.thresholds[rp.task] = r.threshold
                metrics["router-threshold"] = r.threshold
        return metrics

    # -- evaluation ----------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Only a task's last training round evaluates: every expert and router seen so far."""
        rp = self._round(server_round)
        self._pending = None  # no quorum retries for the evaluation
        if not rp.evaluate:
            return []
        s = self.state
        seen = self.tasks[: rp.task_index + 1]
        names = [SHARED] if not self.probe else seen
        routers = {t: s.routers[t] for t in seen if t in s.routers and t in s.thresholds}
        config = self._instruction(rp, "evaluate", seen=tuple(seen),
                                   partners={t: tuple(s.partners.get(t, [])) for t in names},
                                   thresholds={t: s.thresholds[t] for t in routers})
        arrays = self._pack({t: s.experts[t] for t in names}, routers)
        return self._send(self._sample(grid, rp, server_round, arrays, config, MessageType.EVALUATE,
                                       self.fraction_evaluate, self.min_evaluate_nodes))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        rp = self._round(server_round)
        if not rp.evaluate:
            return None
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        routed_ok = routed_n = 0
        detail: dict[tuple[str, str], float] = {}
        detail_n: dict[tuple[str, str], int] = {}
        for node, c in self._received_from(replies, rp):
            try:
                e = decode_eval(c)
            except MessageError as err:
                self._reject("malformed", node)
                log.warning("evaluation reply rejected: %s", err)
                continue
            if e.global_round != rp.server_round or not set(e.scores) <= set(self.tasks):
                self._reject("stale-or-unknown", node)
                continue
            for task, (acc, n) in e.scores.items():
                sums[task] = sums.get(task, 0.0) + acc * n
                counts[task] = counts.get(task, 0) + n
                for m, v in e.details.get(task, {}).items():  # every metric, same weights
                    key = (task, m)
                    detail[key] = detail.get(key, 0.0) + v * n
                    detail_n[key] = detail_n.get(key, 0) + n
            routed_ok += sum(e.routed.values())
            routed_n += sum(n for t, (_, n) in e.scores.items() if t in e.routed)
        row = [sums[t] / counts[t] if t in counts else float("nan") for t in self.tasks]
        self.state.acc_matrix[rp.task_index] = row
        scores: dict[str, dict[str, float]] = {}
        for (task, m), v in detail.items():
            scores.setdefault(task, {})[m] = v / detail_n[(task, m)]
        self.state.task_scores[rp.task_index] = scores
        if routed_n:
            self.state.router_acc[rp.task_index] = 100.0 * routed_ok / routed_n
        if self.state.rounds and self.state.rounds[-1]["round"] == rp.server_round:
            self.state.rounds[-1]["acc_seen"] = float(np.nanmean(row[: rp.task_index + 1]))
            self.state.rounds[-1]["evaluate_exchange_s"] = self._exchange_s()
        return MetricRecord({f"acc/{t}": a for t, a in zip(self.tasks, row, strict=True)
                             if t in counts})

    # -- checkpoint ----------------------------------------------------------------------------
    def on_round_end(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``Strategy.start``'s ``evaluate_fn`` hook (called after each round): checkpoint."""
        if server_round == 0:
            return None
        self.state.round = server_round + self.offset
        if self.checkpoint_dir is not None:
            save_checkpoint(self.state, self.checkpoint_dir)
        rp = self._round(server_round)
        if rp.evaluate and self.publisher is not None and not is_shared(self.method):
            # A failed export must not cost the run: the next task publishes a newer one.
            try:
                log.info("published bundle %s", self.publisher(self.state, rp.task_index, rp.task))
            except Exception:
                log.exception("publishing the bundle of task %r failed; the run goes on", rp.task)
        if self.stop_after_round and self.state.round >= self.stop_after_round:
            raise StopRun(f"stopped after global round {self.state.round} (app.stop-after-round); "
                          "continue with --resume")
        return None
