"""Bench: the federated router fit against the centralized one, on the same clients' features.

The federated D-MoLE router is an autoencoder per task, fitted by FedAvg over the task's holders
and thresholded at a quantile of the pooled held-out errors (cloud/routers.py); the centralized
one fits each task's AE on all of the task's samples and takes τ from out-of-fold errors
(mole/router.py). Both route on frozen-base features, so they can be compared without training a
single expert: this bench builds the scenario's client folders (as ``fedmole simulate`` does,
cached base), computes every client's router features once, and then fits the routers of every
task of the stream in seconds, for every variant asked:

- ``fed RxE@q``: R fitting rounds of E local epochs from the common global AE (the probe round
  and the first R − 1 training rounds of a run, ``federation.router-rounds`` /
  ``router-local-epochs``), with the edge's own fitting code (``edge.local._fit``: its hold-out
  split; the probe round's seed, + k in round k where a run adds the global round) and the cloud's
  own averaging (``RouterAccumulator``); τ at quantile q of the pooled held-out errors under the
  final AE (``dmole.router-quantile``).
- ``central@q``: ``TaskRouter.add_task`` on the task's pooled training features, as ``fedmole
  train --method dmole`` fits it (``dmole.router-threshold-folds``).

Every client's test samples of every task are then routed among all tasks' entries (the stream's
last row): accuracy, the share sent to the base model (no τ admits them), the share sent to a
wrong expert, per task. The target: the configured federated fit routes within 2 points of the
centralized fit at the same quantile.

Writes JSON: {"config": {...}, "clients", "test_samples", "variants": [{"name", "kind",
"rounds", "epochs", "quantile", "accuracy", "to_base", "misrouted", "per_task", "seconds"}],
"configured", "central_at_configured"}.

    .venv/bin/python bench/router_fit.py --out runs/bench/router_fit.json \\
        [--set KEY=VALUE ...] [--fits 1x300,4x25,12x10] [--quantiles 0.95,0.99]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import finish  # noqa: E402
from cloud.routers import RouterAccumulator  # noqa: E402
from edge.local import Client, _fit, _router  # noqa: E402
from edge.runtime import load_local_data  # noqa: E402
from mole.global_model import EdgeModel  # noqa: E402
from mole.router import (  # noqa: E402
    TaskRouter,
    ae_from_state,
    error_histogram,
    reconstruction_error,
    routing_accuracy,
)
from protocol.config import RunConfig, load_config, parse_overrides  # noqa: E402
from simulation.federated import prepare  # noqa: E402

GAP_BOUND = 2.0  # points of routing accuracy the federated fit may lose to the centralized one


def clients_of(cfg: RunConfig, folder: Path) -> list[Client]:
    """The scenario's clients (data folders built under ``folder``) on one shared edge model."""
    cfg, partition, _ = prepare(cfg, folder, progress=False)
    em = EdgeModel(cfg, Path(cfg.model.base_path))
    tasks = list(cfg.data.tasks)
    return [Client(cfg, load_local_data(p, tasks, cfg.data.on_error), p / "_state", em)
            for p in sorted((folder / "clients").iterdir()) if p.is_dir()]


def federated_entries(clients: Sequence[Client], tasks: Sequence[str], rounds: int, epochs: int,
                      quantile: float) -> TaskRouter:
    """Every task's router entry as a federated run fits it: R rounds × E local epochs."""
    cfg = clients[0].cfg
    fed = dataclasses.replace(cfg.federation, router_local_epochs=epochs)
    vcfg = dataclasses.replace(cfg, federation=fed)
    states: dict[str, dict[str, np.ndarray]] = {}
    taus: dict[str, float] = {}
    for i, task in enumerate(tasks):
        holders = [dataclasses.replace(c, cfg=vcfg) for c in clients if c.data.train.get(task)]
        if not holders:
            raise SystemExit(f"no client holds training data of task {task!r}")
        dim = int(holders[0].split(task)[0].shape[1])  # (N, D) features
        seed = cfg.federation.seed * 1000 + i  # the probe round's router seed (cloud/strategy.py)
        state: dict[str, np.ndarray] | None = None
        for k in range(rounds):
            acc = RouterAccumulator(task, dim, cfg.dmole.router_hidden)
            for c in holders:
                part = _fit(c, task, state, seed + k)
                acc.add(c.id, part.n_samples, part.state, None)
            state = acc.finalize(quantile).state
        assert state is not None
        acc = RouterAccumulator(task, dim, cfg.dmole.router_hidden)
        ae = ae_from_state(state)
        for c in holders:  # every training round's histograms: held-out errors, global AE
            held = c.split(task)[1]
            acc.add(c.id, int(held.shape[0]), None, error_histogram(reconstruction_error(ae, held)))
        tau = acc.finalize(quantile).threshold
        assert tau is not None
        states[task], taus[task] = state, tau
    return _router(dataclasses.replace(cfg, dmole=dataclasses.replace(
        cfg.dmole, router_quantile=quantile)), states, taus, list(tasks))


def central_entries(clients: Sequence[Client], tasks: Sequence[str], quantile: float) -> TaskRouter:
    """Every task's entry as the centralized runner fits it, on the pooled training features."""
    cfg = clients[0].cfg
    r = TaskRouter(hidden=cfg.dmole.router_hidden, quantile=quantile,
                   folds=cfg.dmole.router_threshold_folds)
    for task in tasks:
        r.add_task(task, torch.cat([c.em.features(c.data, "train", task) for c in clients
                                    if c.data.train.get(task)]))
    return r


def route_scores(router: TaskRouter, tests: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Routes of every test sample among all entries: accuracy, to-base and misrouted shares (%)."""
    tasks = list(tests)
    z = torch.cat([tests[t] for t in tasks])
    truth = [t for t in tasks for _ in range(tests[t].shape[0])]
    pred = router.route(z)
    n = len(pred)
    return {"accuracy": round(routing_accuracy(pred, truth), 2),
            "to_base": round(100.0 * sum(p is None for p in pred) / n, 2),
            "misrouted": round(100.0 * sum(p is not None and p != t for p, t in zip(pred, truth,
                                                                                  strict=True)) / n, 2),
            "per_task": {t: round(100.0 * float(np.mean([p == t for p, tt in zip(pred, truth, strict=True)
                                                          if tt == t])), 1) for t in tasks}}


def parse_fits(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            r, e = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--fits item {item!r}: write ROUNDSxEPOCHS, e.g. 4x25") from None
        if r < 1 or e < 1:
            raise SystemExit(f"--fits item {item!r}: rounds and epochs must be >= 1")
        out.append((r, e))
    return out


def measure(cfg: RunConfig, fits: Sequence[tuple[int, int]], quantiles: Sequence[float],
            folder: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    clients = clients_of(cfg, folder)
    tasks = list(cfg.data.tasks)
    t0 = time.perf_counter()
    tests: dict[str, torch.Tensor] = {}
    for task in tasks:
        parts = [c.em.features(c.data, "test", task) for c in clients if c.data.test.get(task)]
        if parts:
            tests[task] = torch.cat(parts)
    for c in clients:  # warm the train-feature cache (timed apart from the fits)
        for task in tasks:
            if c.data.train.get(task):
                c.em.features(c.data, "train", task)
    feature_s = time.perf_counter() - t0
    fed = cfg.federation
    own = (fed.router_rounds, fed.router_local_epochs)
    fits = list(dict.fromkeys([own, *fits]))
    qs = list(dict.fromkeys([cfg.dmole.router_quantile, *quantiles]))
    variants = []
    for q in qs:
        t1 = time.perf_counter()
        row = route_scores(central_entries(clients, tasks, q), tests)
        variants.append({"name": f"central@{q}", "kind": "central", "rounds": None, "epochs": None,
                         "quantile": q, **row, "seconds": round(time.perf_counter() - t1, 1)})
        print(f"{variants[-1]['name']}: {row['accuracy']} (to base {row['to_base']}, "
              f"misrouted {row['misrouted']})", flush=True)
        for r, e in fits:
            t1 = time.perf_counter()
            row = route_scores(federated_entries(clients, tasks, r, e, q), tests)
            variants.append({"name": f"fed {r}x{e}@{q}", "kind": "federated", "rounds": r,
                             "epochs": e, "quantile": q, **row,
                             "seconds": round(time.perf_counter() - t1, 1)})
            print(f"{variants[-1]['name']}: {row['accuracy']} (to base {row['to_base']}, "
                  f"misrouted {row['misrouted']})", flush=True)
    name = f"fed {own[0]}x{own[1]}@{cfg.dmole.router_quantile}"
    return {"config": {"router-rounds": own[0], "router-local-epochs": own[1],
                       "router-quantile": cfg.dmole.router_quantile,
                       "router-holdout": fed.router_holdout,
                       "router-threshold-folds": cfg.dmole.router_threshold_folds,
                       "pretrain-seed": cfg.pretrain.seed, "seed": fed.seed,
                       "clients": fed.clients, "dirichlet-alpha": fed.dirichlet_alpha},
            "clients": len(clients), "test_samples": {t: int(v.shape[0]) for t, v in tests.items()},
            "feature_s": round(feature_s, 1), "variants": variants, "configured": name,
            "central_at_configured": f"central@{cfg.dmole.router_quantile}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--fits", default="1x300,4x25,12x10",
                    help="federated fits to compare, ROUNDSxEPOCHS (the configured one is added)")
    ap.add_argument("--quantiles", default="",
                    help="comma-separated router quantiles besides the configured one")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the client data (default: a temporary one)")
    args = ap.parse_args()
    cfg = load_config(args.config, parse_overrides(args.set))
    try:
        quantiles = [float(q) for q in args.quantiles.split(",") if q.strip()]
    except ValueError:
        raise SystemExit(f"--quantiles {args.quantiles!r}: comma-separated numbers in (0, 1)") from None
    if any(not 0 < q < 1 for q in quantiles):
        raise SystemExit(f"--quantiles {args.quantiles!r}: every quantile must be in (0, 1)")
    with tempfile.TemporaryDirectory(prefix="router-fit-") as tmp:
        res = measure(cfg, parse_fits(args.fits), quantiles, args.work or Path(tmp))
    by = {v["name"]: v for v in res["variants"]}
    gap = round(by[res["central_at_configured"]]["accuracy"] - by[res["configured"]]["accuracy"], 2)
    res["gap_to_central"] = gap
    finish(res, args.out, {"gap_to_central": (gap, "<=", GAP_BOUND)})


if __name__ == "__main__":
    main()
