"""Scoring generated answers: exact match and token F1 (used by every evaluator, edge included)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(pred: str, ref: str) -> bool:
    """Case- and whitespace-insensitive equality."""
    return normalize(pred) == normalize(ref)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-words F1 in [0, 1]; two empty strings score 1."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score_answers(preds: Sequence[str], refs: Sequence[str], metrics: Sequence[str] = ("exact",)
                  ) -> dict[str, float]:
    """Mean of each metric over the samples, in percent. Known metrics: exact, f1."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        raise ValueError("no samples to score")
    fns = {"exact": lambda p, r: float(exact_match(p, r)), "f1": token_f1}
    unknown = [m for m in metrics if m not in fns]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(fns)}")
    return {m: 100.0 * sum(fns[m](p, r) for p, r in zip(preds, refs, strict=True)) / len(refs)
            for m in metrics}
