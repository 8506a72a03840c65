"""Answering with routed experts: one code path for the centralized runner and the edge client.

Each sample carries a route (from :class:`mole.router.TaskRouter`, the oracle, or ``"*"`` for
"every seen expert on", the no-router ablation and the shared-adapter baselines). Samples are
grouped by route so each group is one batched greedy generation with exactly its expert set
active: the routed task's expert plus its remembered co-activation partners, or the base model
(route ``None``) when no autoencoder claims the sample. Mixed-task batches are therefore fine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from mole.batching import SampleEncoder
from mole.experts import ExpertModel
from mole.steps import generate_answers
from protocol.manifest import Sample

ALL = "*"


def sample_routes(mode: str, task: str, seen: Sequence[str], n: int,
                  route: Callable[[], list[str | None]]) -> list[str | None]:
    """The route of each of ``n`` test samples of ``task`` under ``dmole.router`` = ``mode``:
    ``autoencoder`` (``route()``, the router's own answer), ``oracle`` (the true task once its
    experts exist) or ``none`` (every seen expert on)."""
    if mode == "oracle":
        return [task if task in seen else None] * n
    if mode == "none":
        return [ALL] * n
    return route()


def active_set(route: str | None, seen: Sequence[str], partners: Mapping[str, Sequence[str]]
               ) -> list[str]:
    """The experts a sample with ``route`` is answered with."""
    if route == ALL:
        return list(seen)
    if route is None:
        return []
    return [route, *partners.get(route, [])]


def routed_answers(experts: ExpertModel, enc: SampleEncoder, samples: Sequence[Sample],
                   routes: Sequence[str | None], seen: Sequence[str],
                   partners: Mapping[str, Sequence[str]], batch_size: int, max_new_tokens: int
                   ) -> list[str]:
    """Greedy answers in sample order, each from its route's expert set."""
    if len(routes) != len(samples):
        raise ValueError(f"need one route per sample, got {len(routes)} for {len(samples)}")
    preds: list[str] = [""] * len(samples)
    for route in dict.fromkeys(routes):
        idx = [i for i, r in enumerate(routes) if r == route]
        with experts.only(active_set(route, seen, partners)):
            out = generate_answers(experts.model, enc, [samples[i] for i in idx], batch_size,
                                   max_new_tokens)
        for i, p in zip(idx, out, strict=True):
            preds[i] = p
    return preds
