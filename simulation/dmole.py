"""Centralized D-MoLE over the task stream (docs/design.md §2), with its ablations.

For each task t:
 (a) proxy  — accumulated-gradient norms of every candidate module's base weights on ~1% of
     task t's training batches, experts off;
 (b,c) plan — ``cloud.allocator.allocate``: budget B = round(κ·|M|) split across modalities by
     gradient mass with a floor, top modules per modality; a new expert (PEFT adapter named t)
     on exactly those modules;
 (d) router — an autoencoder on task t's base-model features; τ_t = quantile of its own errors;
 (e) train — only expert t learns; the best-matching older task (by routing t's training
     samples through the older autoencoders, ≥ ``dmole.coactivate-share`` of the votes) joins the
     forward pass frozen. D-MoLE votes per batch; our batches are task-homogeneous, so one vote
     over the task's samples is the same rule computed once. The partner is remembered and
     co-activated again whenever a sample is routed to t, so inference sees the expert set that
     training saw.
Evaluation routes every test sample on its own (mixed batches are fine): its routed task's
experts answer, or the base model when no autoencoder claims the sample.

``--replay`` adds the bounded replay buffer to training batches: the new expert then also sees
old tasks' samples (with its partner active), which teaches it not to break them when the router
sends an old sample its way — the router is the part that can still forget.

Ablations (config): ``dmole.allocation = uniform`` (no curriculum), ``all-modules`` (an expert in
every module, rank lowered to equal parameters), ``dmole.router = none`` (all experts on) or
``oracle`` (the true task: the gap to it is the router's cost).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cloud.allocator import all_modules_allocation, allocate, choose_partner, equal_param_rank
from mole.experts import ExpertModel
from mole.inference import routed_answers, sample_routes
from mole.modality import modality_map
from mole.proxy import proxy_samples, proxy_scores
from mole.router import TaskRouter, router_features, routing_accuracy
from mole.scoring import score_answers
from mole.steps import train_steps
from mole.task_loop import run_tasks
from protocol.config import RunConfig
from protocol.llava_format import references_of
from protocol.manifest import Sample
from protocol.plan import ExpertPlan
from simulation.base import base_summary
from simulation.centralized import PEFT_DIR, Stream, prepare_stream
from simulation.methods import BatchSource, make_source
from simulation.metrics import modality_arrivals
from simulation.report import write_run_outputs

log = logging.getLogger(__name__)


class DmoleLearner:
    """The per-task steps of D-MoLE on one model; the federated client reuses the same pieces."""

    def __init__(self, cfg: RunConfig, stream: Stream):
        self.cfg = cfg
        self.s = stream
        self.experts = ExpertModel(stream.model)
        self.mmap = modality_map(stream.model)
        self.plan = ExpertPlan.empty(self.mmap)
        self.router = TaskRouter(hidden=cfg.dmole.router_hidden, quantile=cfg.dmole.router_quantile,
                                 folds=cfg.dmole.router_threshold_folds)
        self.partners: dict[str, list[str]] = {}
        self.rank = cfg.lora.rank
        if cfg.dmole.allocation == "all-modules":
            budget = round(cfg.dmole.budget_fraction * len(self.mmap))
            self.rank = equal_param_rank(cfg.lora.rank, budget, len(self.mmap))
        self.feat_cache: dict[str, torch.Tensor] = {}

    def features(self, key: str, samples: Sequence[Sample]) -> torch.Tensor:
        """Base-model router features (N, D); the base is frozen, so they are cached by key."""
        if key not in self.feat_cache:
            self.feat_cache[key] = router_features(
                self.experts, self.s.enc, samples, self.cfg.train.eval_batch_size,
                weights=[self.cfg.dmole.router_vision_weight, 1.0, self.cfg.dmole.router_audio_weight])
            # (vision, text, audio) blocks
        return self.feat_cache[key]

    def plan_task(self, task: str, rng: np.random.Generator) -> dict:
        cfg, train = self.cfg, self.s.train[task]
        t0 = time.perf_counter()  # proxy time includes building its batches
        batches = [self.s.enc.train_batch(b) for b in proxy_samples(
            train, cfg.train.batch_size, cfg.dmole.proxy_fraction, cfg.dmole.proxy_min_batches,
            rng)]
        proxy = proxy_scores(self.experts, batches, list(self.mmap))
        t1 = time.perf_counter()  # allocation time excludes the proxy (reported separately)
        if cfg.dmole.allocation == "all-modules":
            alloc = all_modules_allocation(task, self.mmap, proxy.scores)
        else:
            alloc = allocate(task, proxy.scores, self.mmap, kappa=cfg.dmole.budget_fraction,
                             floor=cfg.dmole.modality_floor,
                             uniform=cfg.dmole.allocation == "uniform")
        alloc = dataclasses.replace(alloc, seconds=time.perf_counter() - t1)
        self.plan = self.plan.with_task(alloc, self.rank, self._alpha())
        lora = dataclasses.replace(cfg.lora, rank=self.rank, alpha=self._alpha())
        self.experts.add_expert(task, list(alloc.modules), lora)
        return {"proxy_s": t1 - t0, "plan_s": alloc.seconds, "proxy_batches": len(batches),
                "per_modality": dict(alloc.per_modality), "shares": dict(alloc.shares)}

    def _alpha(self) -> int:
        # Keep alpha/rank (the LoRA scale) when the ablation lowers the rank.
        return max(1, round(self.cfg.lora.alpha * self.rank / self.cfg.lora.rank))

    def fit_router(self, task: str) -> str | None:
        feats = self.features(f"train/{task}", self.s.train[task])
        votes = Counter(r for r in self.router.route(feats) if r is not None) if (
            self.router.tasks) else Counter()
        partner = choose_partner(votes, feats.shape[0], self.cfg.dmole.coactivate_share,
                                 self.s.tasks)
        self.partners[task] = [partner] if partner else []
        self.router.add_task(task, feats)
        return partner

    def train_task(self, task: str, rng: np.random.Generator, source: BatchSource, progress: bool,
                   desc: str):
        """Train expert ``task`` on batches from ``source`` (current task, or + replay)."""
        cfg, enc = self.cfg, self.s.enc
        self.experts.activate([task, *self.partners[task]], trainable=task)
        source.start_task(task, self.s.train[task])
        bs = cfg.train.batch_size

        def next_batch(_: int):
            return enc.train_batch(source.batch(rng, bs))

        stats = train_steps(self.s.model, next_batch, cfg.train.steps_per_task, cfg.train.lr,
                            cfg.train.weight_decay, cfg.train.warmup_fraction, desc=desc,
                            progress=progress)
        self.experts.activate([])
        source.end_task(task, self.s.train[task])
        return stats

    def routes(self, task: str, seen: list[str]) -> list[str | None]:
        samples = self.s.test[task]
        return sample_routes(self.cfg.dmole.router, task, seen, len(samples),
                             lambda: self.router.route(self.features(f"test/{task}", samples)))

    def evaluate(self, task: str, seen: list[str]) -> dict[str, float]:
        """Per-sample routing: group samples by routed task, answer each group with its experts."""
        samples = self.s.test[task]
        preds = routed_answers(self.experts, self.s.enc, samples, self.routes(task, seen), seen,
                               self.partners, self.cfg.train.eval_batch_size,
                               self.s.tokens(task))
        return score_answers(preds, references_of(samples), self.s.metrics[task])


def run_dmole(cfg: RunConfig, out: Path, replay: bool = False, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stream = prepare_stream(cfg, progress)
    learner = DmoleLearner(cfg, stream)
    tasks = stream.tasks
    rng = np.random.default_rng(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    # The baselines' batch sources: the current task only, or mixed with the replay buffer.
    source = make_source("replay-lora" if replay else "seq-lora", cfg)
    zero = {t: learner.evaluate(t, []) for t in tasks}  # no task seen: the base model answers

    method = "dmole" + ("-replay" if replay else "")

    def learn(t: int, task: str) -> dict:
        planned = learner.plan_task(task, rng)
        t_router = time.perf_counter()
        partner = learner.fit_router(task)
        router_s = time.perf_counter() - t_router
        stats = learner.train_task(task, rng, source, progress,
                                   f"{method} task {t + 1}/{len(tasks)} {task}")
        return {"task": task, **planned, "partner": partner,
                "router_fit_s": round(router_s, 3), "train_s": round(stats.seconds, 2),
                "last_loss": round(stats.last_loss, 4),
                "proxy_plan_over_train": round(
                    (planned["proxy_s"] + planned["plan_s"]) / stats.seconds, 4),
                "note": f", experts {planned['per_modality']}, partner {partner}"}

    def save(t: int, task: str) -> None:
        learner.experts.save_expert(task, out / "experts")
        learner.experts.save_peft(task, stream.base_path, out / PEFT_DIR / task)

    res = run_tasks(method, tasks, learn, learner.evaluate, save, stream.primary, progress)
    acc, rows = res.acc, res.rows
    per_task = [{k: v for k, v in e.items() if k != "note"} for e in res.logs]

    learner.plan.save(out / "plan.json")
    learner.router.save(out / "router")
    truth = [t for t in tasks for _ in range(len(stream.test[t]))]
    pred = [r for t in tasks for r in learner.routes(t, tasks)]
    router_acc = routing_accuracy(pred, truth) if cfg.dmole.router == "autoencoder" else None
    variant = [f"{k}={v}" for k, v, default in (
        ("allocation", cfg.dmole.allocation, "gradient"), ("router", cfg.dmole.router, "autoencoder"))
        if v != default]
    extra = {
        "label": method + (f" ({', '.join(variant)})" if variant else ""),
        "task_scores": rows[-1],
        "zero_shot_scores": zero,
        "dmole": {
            "allocation": cfg.dmole.allocation, "router": cfg.dmole.router, "replay": replay,
            "rank": learner.rank, "per_task": per_task,
            "experts_per_modality": {t: learner.plan.experts_per_modality(t) for t in tasks},
            "router_accuracy": router_acc,
            "proxy_plan_over_train": round(
                sum(p["proxy_s"] + p["plan_s"] for p in per_task)
                / sum(p["train_s"] for p in per_task), 4),
        },
        "modality_arrivals": modality_arrivals(tasks, acc, {t: stream.modalities(t) for t in tasks}),
        "trainable_params": sum(p.numel() for n, p in stream.model.named_parameters()
                                if "lora_" in n),
        "base": base_summary(stream.base_path),
        "data": stream.data_summary(),
        "notes": [
            f"{method}: {len(learner.mmap)} candidate modules, κ={cfg.dmole.budget_fraction}, "
            f"floor {cfg.dmole.modality_floor}, allocation {cfg.dmole.allocation}, "
            f"router {cfg.dmole.router}, experts of rank {learner.rank}.",
            f"Router accuracy on the mixed test set: {router_acc if router_acc is not None else 'n/a'}.",
        ],
    }
    return write_run_outputs(
        out, method=method, tasks=tasks, acc_matrix=acc,
        zero_shot=[zero[t][stream.primary(t)] for t in tasks], bytes_up=0, bytes_down=0,
        wall_s=time.perf_counter() - t_start, config=cfg.to_flat(), extra=extra,
    )
