"""Continual-learning metrics over an accuracy matrix, and answer-level scores.

``acc[t][i]`` is the score (percent, 0..100) on task ``i`` after training through task ``t``,
for ``T`` tasks (0-based here). Entries above the diagonal (``i > t``: tasks not trained yet)
are optional; they are NaN (or ``None``, as JSON ``null`` loads) when not measured, and only
FWT reads them. With ``L = T - 1`` the last row:

    Last       = (1/T)     Σ_i          a[L][i]
    AVG        = (1/T)     Σ_t (1/(t+1)) Σ_{i≤t} a[t][i]
    BWT        = (1/(T-1)) Σ_{i<L}      (a[L][i] - a[i][i])
    Forgetting = (1/(T-1)) Σ_{i<L}      (max_{i≤t<L} a[t][i] - a[L][i])
    FWT        = (1/(T-1)) Σ_{i≥1}      (a[i-1][i] - z[i])

where ``z[i]`` is the zero-shot (untrained base) score on task ``i``. These are the definitions
of ``docs/design.md`` §3, written there with the last row as a[T]; the formulas above
are the same in 0-based indices. With ``T = 1``, BWT and forgetting are 0.0 (nothing to forget)
and FWT is NaN (no task is seen before it is trained). FWT is NaN when no zero-shot scores are
given or when any entry it needs (``a[i-1][i]`` or ``z[i]``) is missing: a mean over a subset of
tasks would not be comparable across runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# Re-exported: answer scoring lives in mole (the edge evaluates with it too).
from mole.scoring import exact_match, token_f1  # noqa: F401

Matrix = npt.NDArray[np.float64]
AccLike = Sequence[Sequence[float | None]] | npt.NDArray[np.floating]
ScoresLike = Sequence[float | None] | npt.NDArray[np.floating]

__all__ = [
    "as_matrix",
    "as_scores",
    "avg",
    "bwt",
    "exact_match",
    "forgetting",
    "fwt",
    "last",
    "modality_arrivals",
    "summarize",
    "token_f1",
]


def _to_float(value: object, where: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number or None, got {value!r}") from None


def _check_range(value: float, where: str) -> None:
    if math.isfinite(value) and not 0.0 <= value <= 100.0:
        raise ValueError(f"{where} = {value!r} is outside [0, 100]; accuracies are in percent")


def as_matrix(acc: AccLike) -> Matrix:
    """Validate ``acc`` and return it as a (T, T) float array (NaN for missing entries).

    Raises ValueError when the matrix is empty or not square, when an entry on or below the
    diagonal is missing or not finite, or when any finite entry lies outside [0, 100].
    """
    rows = list(acc)
    n = len(rows)
    if n == 0:
        raise ValueError("accuracy matrix is empty; expected T rows of T scores (T >= 1)")
    out = np.full((n, n), math.nan, dtype=np.float64)
    for t, row in enumerate(rows):
        cells = list(row)
        if len(cells) != n:
            raise ValueError(
                f"accuracy matrix must be square ({n}x{n}): row {t} has {len(cells)} entries; "
                "pad tasks not evaluated yet (above the diagonal) with NaN or None"
            )
        for i, cell in enumerate(cells):
            where = f"acc[{t}][{i}]"
            value = _to_float(cell, where)
            if i <= t and not math.isfinite(value):
                raise ValueError(
                    f"{where} = {value!r}: entries on or below the diagonal (row {t}, "
                    f"column {i}) must be finite scores; only i > t may be missing"
                )
            _check_range(value, where)
            out[t, i] = value
    return out


def as_scores(zero_shot: ScoresLike, n: int) -> Matrix:
    """Validate per-task zero-shot scores (``n`` of them, percent); None becomes NaN."""
    scores = list(zero_shot)
    if len(scores) != n:
        raise ValueError(f"zero_shot has {len(scores)} scores, expected one per task ({n})")
    out = np.array([_to_float(v, f"zero_shot[{i}]") for i, v in enumerate(scores)])
    for i, value in enumerate(out):
        _check_range(float(value), f"zero_shot[{i}]")
    return out


def last(acc: AccLike) -> float:
    """Mean score over all tasks after the last task: (1/T) Σ_i a[T-1][i]."""
    a = as_matrix(acc)
    return float(a[-1].mean())


def avg(acc: AccLike) -> float:
    """Mean over stages t of the mean score on the tasks seen so far (i ≤ t)."""
    a = as_matrix(acc)
    return float(np.mean([a[t, : t + 1].mean() for t in range(a.shape[0])]))


def bwt(acc: AccLike) -> float:
    """Backward transfer: mean over i < T-1 of a[T-1][i] - a[i][i] (negative = forgetting)."""
    a = as_matrix(acc)
    n = a.shape[0]
    if n == 1:
        return 0.0
    return float(np.mean(a[-1, : n - 1] - np.diag(a)[: n - 1]))


def forgetting(acc: AccLike) -> float:
    """Mean over i < T-1 of the drop from the best score after learning i to the final one."""
    a = as_matrix(acc)
    n = a.shape[0]
    if n == 1:
        return 0.0
    # best[i] = max over rows i..T-2 of a[t][i]: the rows after task i was learned, before the last
    best = [a[i : n - 1, i].max() for i in range(n - 1)]
    return float(np.mean(np.array(best) - a[-1, : n - 1]))


def fwt(acc: AccLike, zero_shot: ScoresLike | None) -> float:
    """Forward transfer: mean over i ≥ 1 of a[i-1][i] - z[i]; NaN when an entry is missing."""
    a = as_matrix(acc)
    n = a.shape[0]
    if zero_shot is None:
        return math.nan
    z = as_scores(zero_shot, n)
    if n == 1:
        return math.nan
    before = np.array([a[i - 1, i] for i in range(1, n)])  # (T-1,) scores just before training i
    diffs = before - z[1:]
    if not np.all(np.isfinite(diffs)):
        return math.nan
    return float(diffs.mean())


def summarize(acc: AccLike, zero_shot: ScoresLike | None = None) -> dict[str, float]:
    """All matrix metrics, full precision: avg, last, bwt, forgetting, fwt (NaN if unknown)."""
    a = as_matrix(acc)
    return {
        "avg": avg(a),
        "last": last(a),
        "bwt": bwt(a),
        "forgetting": forgetting(a),
        "fwt": fwt(a, zero_shot),
    }


def modality_arrivals(tasks: Sequence[str], acc: AccLike,
                      modalities: dict[str, Sequence[str]]) -> list[dict]:
    """What learning a new modality's tasks cost the tasks learned before it arrived.

    For each modality that first appears at task index ``s > 0`` (e.g. audio after the
    vision/text tasks): every earlier task ``i`` without that modality, and its drop
    ``a[s-1][i] − a[L][i]`` from just before the modality arrived to the end of the stream
    (positive = lost points). ``modalities[task]`` lists the task's modalities ("text" is
    ignored: every task has it).
    """
    a = as_matrix(acc)
    if len(tasks) != a.shape[0]:
        raise ValueError(f"{len(tasks)} task names for a {a.shape[0]}×{a.shape[0]} matrix")
    seen: set[str] = set()
    out: list[dict] = []
    for s, task in enumerate(tasks):
        new = sorted(set(modalities[task]) - seen - {"text"})
        seen |= set(modalities[task])
        for mod in new if s > 0 else []:
            before = [i for i in range(s) if mod not in modalities[tasks[i]]]
            drops = {tasks[i]: float(a[s - 1][i] - a[-1][i]) for i in before}
            out.append({"modality": mod, "first_task": task, "before_step": s - 1,
                        "drops": drops, "max_drop": max(drops.values()) if drops else 0.0})
    return out
