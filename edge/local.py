"""One client's work in each round (docs/design.md §2), as plain functions of (client, instruction, arrays).

The ClientApp (:mod:`edge.client_app`) only decodes the message and calls these; they use the
same pieces as the centralized runner — ``mole.proxy.proxy_scores``, ``mole.steps.train_steps``,
``mole.router`` fitting, ``mole.inference.routed_answers`` — so there is one training loop.

* **probe** — proxy scores of every candidate module on a few local batches of task t; the
  co-activation votes of the client's task-t samples under the global routers of older tasks;
  and a first local fit of task t's autoencoder from the shared seeded init.
* **train** — the held-out samples' error histogram under the global AE (for τ), optionally
  more local AE epochs, then ``federation.local-epochs`` of optimiser steps (at most
  ``local-steps``) on task t's expert (partners active, frozen) over local task-t data mixed with
  the persisted replay buffer; the learning rate (``federation.client-lr``) follows the task's
  schedule across rounds (round k covers steps (k−1)·S … k·S−1 of one warmup + cosine over R·S
  steps), so R rounds of S steps see the same schedule as S·R centralized steps. With
  ``federation.client-optimizer = keep`` AdamW's moments carry over from the client's previous
  round of the task (kept under its state folder) instead of restarting at zero every round.
* **evaluate** — route each local test sample of the tasks seen so far and the next one with
  the global routers, answer with its experts, report exact-match accuracy and test count per
  task (later tasks are not measured: no metric reads them).

A client that holds no data of task t replies with a skip record (not an error).
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from edge.replay import mix_batch_sizes
from edge.replay_store import ReplayStore
from edge.runtime import EdgeModel, LocalData, sample_modalities
from mole.inference import routed_answers, sample_routes
from mole.proxy import proxy_samples, proxy_scores
from mole.router import (
    TaskRouter,
    ae_from_state,
    ae_state,
    error_histogram,
    fit_autoencoder,
    init_autoencoder,
    reconstruction_error,
)
from mole.scoring import score_answers
from mole.steps import cosine_schedule, train_steps
from protocol.compression import compress
from protocol.config import RunConfig
from protocol.instructions import SHARED, Instruction, is_shared
from protocol.llava_format import references_of
from protocol.updates import (
    ClientUpdate,
    EvalReply,
    ProbeReply,
    RouterPart,
    add_router_part,
    encode_eval,
    encode_probe,
    encode_skip,
    encode_update,
)

log = logging.getLogger(__name__)
REPLAY_METHODS = ("dmole-replay", "fedavg-replay-lora")
OPTIMIZER_DIR = "optimizer"  # under the client's state folder: AdamW's moments per expert
# Fault injection (node config `attack`, deployment tests only): a node that sends NaN experts,
# or experts whose B is scaled ×100 — what a broken or malicious edge looks like to the cloud;
# or one that withholds its data (skips every probe and training round, still evaluates): the
# yardstick of the other attacks, what the cloud can keep when it drops a node's updates.
ATTACKS = ("", "nan", "scale100", "mixed", "withhold")


@dataclass
class Client:
    cfg: RunConfig
    data: LocalData
    state_dir: Path  # the client's persistent state (replay buffer)
    em: EdgeModel
    attack: str = ""  # fault injection, see ATTACKS

    @property
    def id(self) -> str:
        return self.data.client_id

    def rng(self, global_round: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.federation.seed, zlib.crc32(self.id.encode()),
                                      global_round, purpose])

    def split(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Task's train features → (fit (N_f, D), held-out (N_h, D)); a fixed split per client."""
        z = self.em.features(self.data, "train", task)
        perm = np.random.default_rng([self.cfg.federation.seed, zlib.crc32(f"{self.id}/{task}".encode())]
                                     ).permutation(z.shape[0])
        n = z.shape[0]
        n_hold = min(max(1, round(self.cfg.federation.router_holdout * n)), n - 1)
        if n_hold < 1:  # a single sample: fit on it and measure it in-sample
            return z, z
        return z[torch.as_tensor(perm[n_hold:])], z[torch.as_tensor(perm[:n_hold])]


def _router(cfg: RunConfig, routers: dict[str, dict[str, np.ndarray]], thresholds: dict[str, float],
            order: list[str]) -> TaskRouter:
    r = TaskRouter(hidden=cfg.dmole.router_hidden, quantile=cfg.dmole.router_quantile, folds=1)
    for task in order:
        if task in routers and task in thresholds:
            r.put(task, ae_from_state(routers[task]), thresholds[task], cfg.dmole.router_quantile)
    return r


def _fit(c: Client, task: str, init: dict[str, np.ndarray] | None, seed: int) -> RouterPart:
    fit_z, _ = c.split(task)
    if init is None:
        init = ae_state(init_autoencoder(fit_z.shape[1], c.cfg.dmole.router_hidden, seed))
    ae = fit_autoencoder(fit_z, hidden=c.cfg.dmole.router_hidden, epochs=c.cfg.federation.router_local_epochs,
                         val_fraction=0.0, seed=seed, init={k: torch.as_tensor(v) for k, v in init.items()})
    return RouterPart(int(fit_z.shape[0]), ae_state(ae), None)


def probe(c: Client, ins: Instruction, routers: dict[str, dict[str, np.ndarray]]) -> RecordDict:
    task, cfg = ins.task, c.cfg
    train = c.data.train.get(task)
    if not train:
        return encode_skip(c.id, task, "no-data")
    if c.attack == "withhold":
        return encode_skip(c.id, task, "withheld")
    rng = c.rng(ins.global_round, 0)
    batches = [c.em.enc.train_batch(b) for b in proxy_samples(
        train, cfg.train.batch_size, cfg.dmole.proxy_fraction, cfg.dmole.proxy_min_batches, rng)]
    scores = proxy_scores(c.em.experts, batches, list(c.em.mmap)).scores
    votes: dict[str, int] = {}
    if ins.thresholds and cfg.dmole.coactivate_share > 0:
        older = [t for t in ins.plan.tasks if t != task]
        feats = c.em.features(c.data, "train", task)
        for r in _router(cfg, routers, dict(ins.thresholds), older).route(feats):
            if r is not None:
                votes[r] = votes.get(r, 0) + 1
    content = encode_probe(ProbeReply(c.id, task, len(train), scores, votes))
    if cfg.dmole.router == "autoencoder":
        add_router_part(content, _fit(c, task, None, ins.router_seed), cfg.federation.compression)
    return content


def _replay(c: Client, ins: Instruction) -> ReplayStore | None:
    if ins.method not in REPLAY_METHODS:
        return None
    store = ReplayStore(c.state_dir / "replay", c.cfg.replay.buffer_size,
                        c.cfg.replay.buffer_bytes or None, c.cfg.train.seed + zlib.crc32(c.id.encode()))
    # Idempotent: every earlier task the client trained on is in the buffer before task t trains
    # (a retried or resumed round adds nothing twice).
    stream = list(c.cfg.data.tasks)
    for t in stream[: stream.index(ins.task)]:
        if t in c.data.train and t not in store.seen():
            store.add(t, c.data.train[t])
    return store


def train(c: Client, ins: Instruction, experts: dict[str, dict[str, np.ndarray]],
          routers: dict[str, dict[str, np.ndarray]]) -> RecordDict:
    task, cfg, fed = ins.task, c.cfg, c.cfg.federation
    train_set = c.data.train.get(task)
    if not train_set:
        return encode_skip(c.id, task, "no-data")
    if c.attack == "withhold":
        return encode_skip(c.id, task, "withheld")
    name = SHARED if is_shared(ins.method) else task
    part = None
    if name == task and task in routers and cfg.dmole.router == "autoencoder":
        _, held = c.split(task)
        hist = error_histogram(reconstruction_error(ae_from_state(routers[task]), held))
        part = RouterPart(int(held.shape[0]), None, hist)
        if ins.router_fit:
            fitted = _fit(c, task, routers[task], ins.router_seed + ins.global_round)
            part = RouterPart(fitted.n_samples, fitted.state, hist)

    em = c.em
    em.sync_plan(ins.plan)
    for t, tensors in experts.items():
        em.set_factors(t, tensors)
    partners = list(ins.partners.get(name, ()))
    em.experts.activate([name, *partners], trainable=name)
    store = _replay(c, ins)
    rng = c.rng(ins.global_round, 1)
    torch.manual_seed(int(rng.integers(2**31)))
    bs = cfg.train.batch_size
    used: list = []

    def next_batch(_: int):
        n_cur, n_old = mix_batch_sizes(bs, cfg.replay.mix_ratio, len(store) if store else 0)
        batch = [train_set[int(i)] for i in rng.integers(0, len(train_set), n_cur)]
        if n_old and store is not None:
            batch += store.sample(n_old, rng)
        used.extend(batch)
        return em.enc.train_batch(batch)

    steps = fed.steps_for(len(train_set), bs)
    total = steps * max(1, ins.rounds)
    task_sched = cosine_schedule(int(cfg.train.warmup_fraction * total), total)
    offset = (max(1, ins.train_round) - 1) * steps
    keep = fed.client_optimizer == "keep"
    opt_path = c.state_dir / OPTIMIZER_DIR / f"{zlib.crc32(name.encode()):08x}.pt"
    prior = (_load_optimizer(opt_path, name, [p for p in em.model.parameters() if p.requires_grad])
             if keep and ins.train_round > 1 else None)
    stats = train_steps(em.model, next_batch, steps, fed.client_lr, cfg.train.weight_decay,
                        desc=f"{c.id} {task}", progress=False,
                        schedule=lambda s: task_sched(offset + s),
                        optimizer_state=prior, keep_state=keep)
    if stats.optimizer_state is not None:
        _save_optimizer(opt_path, name, stats.optimizer_state)
    em.experts.activate([])
    factors = _attacked(em.get_factors(name, ins.plan), c.attack, ins.global_round)
    update = ClientUpdate(c.id, task, ins.global_round, len(train_set), sample_modalities(used),
                          compress(factors, fed.compression))
    content = encode_update(update)
    meta = content["meta"]
    assert isinstance(meta, ConfigRecord)
    meta["last-loss"] = float(stats.last_loss)
    if part is not None:
        add_router_part(content, part, fed.compression)
    return content


def _save_optimizer(path: Path, name: str, state: dict) -> None:
    """AdamW's per-parameter state of expert ``name`` after this round (replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"expert": name, "state": state["state"]}, tmp)
    os.replace(tmp, path)


def _load_optimizer(path: Path, name: str, params: list[torch.nn.Parameter]) -> dict | None:
    """The kept state of expert ``name`` if it fits ``params`` (same count and shapes, in
    order); None (a fresh optimizer, logged) when absent, unreadable or of other shapes — a lost
    or damaged file costs the moments, never the round."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved["state"]
        fits = (saved["expert"] == name and sorted(state) == list(range(len(params)))
                and all(state[i]["exp_avg"].shape == p.shape
                        and state[i]["exp_avg_sq"].shape == p.shape
                        for i, p in enumerate(params)))
    except Exception as e:  # noqa: BLE001 — any damage means "start fresh", named in the log
        log.warning("optimizer state %s unreadable (%s: %s); this round starts AdamW afresh",
                    path, type(e).__name__, e)
        return None
    if not fits:
        log.warning("optimizer state %s does not fit expert %r's parameters; this round starts "
                    "AdamW afresh", path, name)
        return None
    return {"state": state}  # Optimizer.load_state_dict moves the moments to the params' device


def _attacked(factors: dict[str, np.ndarray], attack: str, global_round: int = 0
              ) -> dict[str, np.ndarray]:
    if attack == "mixed":  # NaN experts in even rounds, ×100-scaled ones in odd rounds
        attack = "nan" if global_round % 2 == 0 else "scale100"
    if attack == "nan":
        return {k: np.full_like(v, np.nan) for k, v in factors.items()}
    if attack == "scale100":
        return {k: v * 100.0 if k.endswith("lora_B") else v for k, v in factors.items()}
    return factors


def evaluate(c: Client, ins: Instruction, experts: dict[str, dict[str, np.ndarray]],
             routers: dict[str, dict[str, np.ndarray]]) -> RecordDict:
    cfg, em = c.cfg, c.em
    em.sync_plan(ins.plan)
    for t, tensors in experts.items():
        em.set_factors(t, tensors)
    shared = is_shared(ins.method)
    seen = [SHARED] if shared else list(ins.seen)
    router = None if shared or cfg.dmole.router != "autoencoder" else _router(
        cfg, routers, dict(ins.thresholds), list(ins.seen))
    scores: dict[str, tuple[float, int]] = {}
    routed: dict[str, int] = {}
    details: dict[str, dict[str, float]] = {}
    # Seen tasks, and the next one (forward transfer): what AVG/Last/BWT/FWT read.
    stream = list(cfg.data.tasks)
    wanted = set(stream[: len(ins.seen) + 1])
    for task, samples in c.data.test.items():
        if not samples or task not in wanted:
            continue
        if router is not None:
            routes = router.route(em.features(c.data, "test", task))
            if task in ins.seen:
                routed[task] = sum(r == task for r in routes)
        else:  # the shared adapter (every "seen" expert on), oracle or no router
            routes = sample_routes("none" if shared else cfg.dmole.router, task, seen,
                                   len(samples), lambda: [])
        preds = routed_answers(em.experts, em.enc, samples, routes, seen, ins.partners,
                               cfg.train.eval_batch_size,
                               c.data.tokens(task, cfg.train.max_new_tokens))
        # Every metric of the task; the primary one is the accuracy matrix's.
        got = score_answers(preds, references_of(samples), c.data.metrics(task))
        scores[task] = (got[c.data.primary(task)], len(samples))
        details[task] = got
    return encode_eval(EvalReply(c.id, ins.global_round, scores, routed, details))
