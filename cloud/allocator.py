"""D-MoLE's expert allocation for one task, as a pure function of the zero-cost proxy's scores.

Math (D-MoLE's layer-wise budget and inter-modal curriculum, docs/design.md §2 step 2,
generalised to k modalities). Over the candidate modules M, task t's
budget is B = round(κ·|M|) new experts. Modality k's share of the gradient mass is
π_k = S_k / Σ_j S_j with S_k = Σ_{m ∈ k} s_t(m) (all scores zero → π_k = 1/k). Each modality
gets n_k = max(⌊floor·B⌋, round(B·π_k)) experts, capped at its number of candidates c_k, and
then the *remainder rule* makes Σ n_k = B exactly. A modality with zero gradient mass (S_k = 0
while others have mass) is absent from the task's data — a text-only task sends nothing through
the vision or audio tower — so it gets no floor: experts there would never receive a gradient.

* while Σ n_k > B: take one from the modality with the largest surplus n_k − B·π_k among those
  still above their floor;
* while Σ n_k < B: give one to the modality with the largest deficit B·π_k − n_k among those
  below their cap c_k (this also redistributes what a capped modality could not take);
* ties (surpluses or deficits equal within 1e-9) go to the modality whose name sorts first.

Modality k then takes its n_k modules with the highest scores; equal scores are ordered by the
module's name in natural order (``layers.2`` before ``layers.10``), never by dict or hash order,
so permuting the input mappings never changes the answer. Floors never exceed B: ``floor·k ≤ 1``
is required and floors round down (so a tiny B can give a floor of 0). ``round`` is round half
up throughout (not Python's banker's rounding), and ⌊·⌋/round add 1e-9 against float noise
(0.29·100 = 28.999…). For k = 2 with no cap or floor binding this is exactly D-MoLE's
n_v = max(⌊0.25·B⌋, round(B·π_v)), n_l = B − n_v, except that language gets the same floor.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from protocol.plan import TaskAllocation

_EPS = 1e-9


class AllocationError(ValueError):
    """Bad input to the allocator; the message names the value and what is allowed."""


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + _EPS)


def module_sort_key(name: str) -> tuple[tuple[Any, ...], str]:
    """Natural order of module names: digit runs compare as numbers (``layers.2`` < ``layers.10``)."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(names)[:n])
    return f"[{shown}{', …' if len(names) > n else ''}] ({len(names)} in all)"


# ---------------------------------------------------------------------------------------------
# validation


def _check_task(task: Any) -> str:
    if not isinstance(task, str) or not task:
        raise AllocationError(f"`task` must be a non-empty string, got {task!r}")
    return task


def _check_modality_of(modality_of: Mapping[str, str]) -> dict[str, str]:
    if not modality_of:
        raise AllocationError("no candidate modules: `modality_of` is empty; build it with "
                              "mole.modality.modality_map(model) on the unwrapped model")
    for m, mod in modality_of.items():
        if not isinstance(m, str) or not m or not isinstance(mod, str) or not mod:
            raise AllocationError(f"`modality_of` must map module names to modality names, "
                                  f"got {m!r}: {mod!r}")
    return dict(modality_of)


def _check_fractions(kappa: float, floor: float, k: int) -> None:
    if not _is_number(kappa) or not math.isfinite(kappa) or not 0 < kappa <= 1:
        raise AllocationError(f"`kappa` (budget fraction) must be in (0, 1], got {kappa!r}")
    if not _is_number(floor) or not math.isfinite(floor) or floor < 0:
        raise AllocationError(f"`floor` (per-modality floor) must be a number >= 0, got {floor!r}")
    if floor * k > 1 + 1e-12:
        raise AllocationError(f"`floor` × number of modalities must be <= 1, got {floor!r} × {k} = "
                              f"{floor * k:g}; lower the floor")


def _check_score_value(v: Any, what: str) -> float:
    if not _is_number(v) or not math.isfinite(v) or v < 0:
        raise AllocationError(f"{what} must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_scores(scores: Mapping[str, float], modality_of: Mapping[str, str]) -> dict[str, float]:
    missing = [m for m in modality_of if m not in scores]
    if missing:
        raise AllocationError(f"scores are missing for candidate modules {_few(missing)}; the proxy "
                              f"must score every module of `modality_of`")
    unknown = sorted((m for m in scores if m not in modality_of), key=module_sort_key)
    if unknown:
        raise AllocationError(f"scores given for unknown modules {_few(unknown)}; known candidates "
                              f"are the keys of `modality_of`")
    return {m: _check_score_value(scores[m], f"score of {m!r}") for m in modality_of}


# ---------------------------------------------------------------------------------------------
# the math


def budget_of(n_candidates: int, kappa: float) -> int:
    """B = round(κ·|M|), at least 1."""
    if not _is_int(n_candidates) or n_candidates < 1:
        raise AllocationError(f"`n_candidates` must be an integer >= 1, got {n_candidates!r}")
    _check_fractions(kappa, 0.0, 1)
    return max(1, _round_half_up(kappa * n_candidates))


def gradient_shares(scores: Mapping[str, float], modality_of: Mapping[str, str]) -> dict[str, float]:
    """π_k = S_k / Σ S over the modalities of ``modality_of`` (sorted by name); all zero → 1/k.

    Sums use ``math.fsum`` (exactly rounded), so the order of the mappings never changes π.
    """
    mods = sorted(set(modality_of.values()))
    total = math.fsum(scores[m] for m in modality_of)
    if total == 0:
        return {mod: 1.0 / len(mods) for mod in mods}
    return {mod: math.fsum(scores[m] for m in modality_of if modality_of[m] == mod) / total
            for mod in mods}


def split_budget(budget: int, shares: Mapping[str, float], caps: Mapping[str, int],
                 floor: float) -> dict[str, int]:
    """n_k for every modality: Σ n_k = ``budget``, n_k ≥ min(⌊floor·B⌋, c_k), n_k ≤ c_k = caps[k].

    See the module docstring for the remainder rule. Keys come back sorted by name.
    """
    mods = sorted(shares)
    if sorted(caps) != mods:
        raise AllocationError(f"`caps` must have the modalities of `shares` {mods}, got {sorted(caps)}")
    _check_fractions(1.0, floor, len(mods))
    if not _is_int(budget) or not 0 <= budget <= sum(caps.values()):
        raise AllocationError(f"`budget` must be an integer in [0, {sum(caps.values())}] (the number "
                              f"of candidates), got {budget!r}")
    target = {k: budget * shares[k] for k in mods}  # B·π_k
    # No floor for a modality the task does not use (share 0 while another has mass).
    absent = {k for k in mods if shares[k] == 0} if any(shares[k] > 0 for k in mods) else set()
    floors = {k: 0 if k in absent else min(caps[k], math.floor(floor * budget + _EPS)) for k in mods}
    n = {k: max(floors[k], min(caps[k], _round_half_up(target[k]))) for k in mods}
    while sum(n.values()) > budget:  # some n_k > floor_k exists: Σ floors ≤ floor·k·B ≤ B
        k = min((k for k in mods if n[k] > floors[k]), key=lambda k: (-round(n[k] - target[k], 9), k))
        n[k] -= 1
    while sum(n.values()) < budget:  # some n_k < cap_k exists: B ≤ Σ caps
        k = min((k for k in mods if n[k] < caps[k]), key=lambda k: (-round(target[k] - n[k], 9), k))
        n[k] += 1
    return n


def _top(modality_of: Mapping[str, str], scores: Mapping[str, float], mod: str, n: int) -> list[str]:
    """The ``n`` best-scored candidates of modality ``mod``; equal scores in natural name order."""
    cands = [m for m in modality_of if modality_of[m] == mod]
    return sorted(cands, key=lambda m: (-scores[m], module_sort_key(m)))[:n]


def allocate(task: str, scores: Mapping[str, float], modality_of: Mapping[str, str],
             kappa: float = 0.5, floor: float = 0.25, uniform: bool = False) -> TaskAllocation:
    """D-MoLE's allocation of task ``task``'s experts from its (aggregated) proxy scores.

    ``uniform=True`` is the "no curriculum" ablation: B is split equally over the modalities the
    task uses (π_k > 0; same floors, caps and remainder rule), ignoring the gradient shares;
    ``shares`` in the result still reports the measured π_k.
    """
    t0 = time.perf_counter()
    task = _check_task(task)
    mmap = _check_modality_of(modality_of)
    mods = sorted(set(mmap.values()))
    _check_fractions(kappa, floor, len(mods))
    s = _check_scores(scores, mmap)
    budget = budget_of(len(mmap), kappa)
    shares = gradient_shares(s, mmap)
    present = [k for k in mods if shares[k] > 0]
    split = {k: (1.0 / len(present) if k in present else 0.0) for k in mods} if uniform else shares
    caps = {k: sum(1 for m in mmap if mmap[m] == k) for k in mods}
    n = split_budget(budget, split, caps, floor)
    chosen = [m for k in mods for m in _top(mmap, s, k, n[k])]
    return TaskAllocation(task=task, budget=budget, per_modality=n, shares=shares,
                          modules=tuple(sorted(chosen, key=module_sort_key)),
                          seconds=time.perf_counter() - t0)


def all_modules_allocation(task: str, modality_of: Mapping[str, str],
                           scores: Mapping[str, float] | None = None) -> TaskAllocation:
    """The "no allocator" ablation: an expert on every candidate module (B = |M|).

    ``shares`` reports the gradient shares when ``scores`` are given, else each modality's
    fraction of the candidates. Match the parameter count with :func:`equal_param_rank`.
    """
    t0 = time.perf_counter()
    task = _check_task(task)
    mmap = _check_modality_of(modality_of)
    mods = sorted(set(mmap.values()))
    counts = {k: sum(1 for m in mmap if mmap[m] == k) for k in mods}
    if scores is not None:
        shares = gradient_shares(_check_scores(scores, mmap), mmap)
    else:
        shares = {k: counts[k] / len(mmap) for k in mods}
    return TaskAllocation(task=task, budget=len(mmap), per_modality=counts, shares=shares,
                          modules=tuple(sorted(mmap, key=module_sort_key)),
                          seconds=time.perf_counter() - t0)


def equal_param_rank(rank: int, n_budgeted: int, n_all: int) -> int:
    """Rank for experts on all ``n_all`` modules with the parameters of ``n_budgeted`` rank-``rank`` ones.

    A LoRA of rank r on a d_out×d_in linear has r·(d_in + d_out) parameters (r·2d when square),
    so with equal module dims the total is r·n·2d and max(1, round(r·n_budgeted/n_all)) matches it
    exactly up to rounding. With unequal dims (e.g. a narrower vision tower, GQA k/v projections)
    it is an approximation: compare the real parameter counts when reporting.
    """
    for name, v in (("rank", rank), ("n_budgeted", n_budgeted), ("n_all", n_all)):
        if not _is_int(v) or v < 1:
            raise AllocationError(f"`{name}` must be an integer >= 1, got {v!r}")
    if n_budgeted > n_all:
        raise AllocationError(f"`n_budgeted` must be <= `n_all`={n_all}, got {n_budgeted!r}")
    return max(1, _round_half_up(rank * n_budgeted / n_all))


def weighted_mean_scores(client_scores: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Federated proxy: the sample-weighted mean Σ_c n_c·s_c(m) / Σ_c n_c of the clients' scores.

    Every client must score the same modules (client 0's keys; result in its order), with a
    sample count > 0 and finite scores >= 0 (they are gradient norms); errors name the client index.
    """
    if not client_scores:
        raise AllocationError("no client scores to aggregate; sample at least one client for the proxy")
    rows: list[tuple[Mapping[str, float], int]] = []
    for i, row in enumerate(client_scores):
        if not isinstance(row, tuple | list) or len(row) != 2 or not isinstance(row[0], Mapping):
            raise AllocationError(f"client {i}: expected a (scores, sample_count) pair, got {row!r}")
        sc, n = row
        if not _is_int(n) or n <= 0:
            raise AllocationError(f"client {i}: sample count must be an integer > 0, got {n!r}")
        rows.append((sc, int(n)))
    keys = list(rows[0][0])
    if not keys:
        raise AllocationError("client 0: sent no scores; every client must score every candidate module")
    for i, (sc, _) in enumerate(rows):
        missing = [m for m in keys if m not in sc]
        extra = [m for m in sc if m not in rows[0][0]]
        if missing or extra:
            raise AllocationError(f"client {i}: score keys differ from client 0's: "
                                  f"missing {_few(missing)}, extra {_few(extra)}")
        for m in keys:
            _check_score_value(sc[m], f"client {i}: score of {m!r}")
    total = sum(n for _, n in rows)
    return {m: math.fsum(float(sc[m]) * n for sc, n in rows) / total for m in keys}


def choose_partner(votes: Mapping[str, int], n_samples: int, share: float,
                   order: Sequence[str] = ()) -> str | None:
    """D-MoLE's co-activation rule, for the centralized learner and the cloud alike: the older
    task that most of the new task's ``n_samples`` training samples route to, if it holds at
    least ``share`` of them (0: never). Ties go to the earlier task in ``order``."""
    if share <= 0 or n_samples <= 0:
        return None
    rank = {t: i for i, t in enumerate(order)}
    best = min(((t, v) for t, v in votes.items() if v > 0),
               key=lambda tv: (-tv[1], rank.get(tv[0], len(rank)), tv[0]), default=None)
    return best[0] if best is not None and best[1] >= share * n_samples else None
