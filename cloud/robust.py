"""Robust and differentially private centres of a round's expert changes, per modality.

The default centre (``mean``) is the sample-weighted mean of the clients' ΔW_c = B_c·A_c, folded
streaming by :class:`cloud.aggregation.DeltaAccumulator`. A modality can instead use:

* ``median`` — the coordinate-wise median of the ΔW_c (Yin et al. 2018). Unweighted: a sample
  count is a claim, and a robust rule must not let a claim buy weight. With honest majority every
  coordinate lies between two honest values, so one client scaling its update ×100 moves nothing.
* ``trimmed-mean`` — per coordinate, the k = ⌊trim·N⌋ largest and k smallest of the N values are
  dropped and the rest averaged (unweighted); k = 0 (too few clients for that share) is a plain
  unweighted mean, and the strategy logs it.
* central DP (``dp-clip`` C > 0, ``dp-noise`` z) — DP-FedAvg (McMahan et al. 2018) on the change
  against the global expert before the round, D_c = ΔW_c − W_ref: each client's change over all
  of the modality's modules is clipped to L2 norm C, the clipped changes are averaged unweighted
  over the n contributors, and Gaussian noise N(0, (z·C/n)²) is added to every coordinate of the
  mean. The rank-r re-factoring (SVD) afterwards is post-processing. Accounting
  (:func:`gaussian_epsilon`): Rényi DP of the Gaussian mechanism with sensitivity C under adding
  or removing one client's update, composed over every noised (round, modality) release, with no
  credit for client sampling — an upper bound on ε. What it does not cover: the probe round's
  proxy scores, the router autoencoders and the sample counts are sent in the clear.

Median and trimmed mean keep every client's dense ΔW per module until the round ends — O(N)
memory, unlike the streaming mean; that is inherent in an order statistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
CENTERS = ("mean", "median", "trimmed-mean")
# Rényi orders over which the RDP → (ε, δ) conversion is minimised (those of TF Privacy).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])


@dataclass(frozen=True)
class ModalityRule:
    """How one modality's experts are combined in a training round."""

    center: str = "mean"
    trim: float = 0.2  # trimmed-mean: share of values dropped at each end, per coordinate
    dp_clip: float = 0.0  # central DP: L2 bound C of one client's change; 0 = off
    dp_noise: float = 0.0  # central DP: noise multiplier z (σ = z·C / n on the mean)

    def __post_init__(self) -> None:
        if self.center not in CENTERS:
            raise ValueError(f"aggregation centre {self.center!r} is unknown; use one of "
                             f"{', '.join(CENTERS)}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim fraction {self.trim!r} must be in [0, 0.5)")
        if not (math.isfinite(self.dp_clip) and self.dp_clip >= 0):
            raise ValueError(f"dp clip {self.dp_clip!r} must be a finite number >= 0 (0 = off)")
        if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            raise ValueError(f"dp noise multiplier {self.dp_noise!r} must be a finite number >= 0")
        if self.dp and self.center != "mean":
            raise ValueError(f"central DP clips and averages changes; it cannot be combined with "
                             f"the {self.center!r} centre on the same modality")

    @property
    def dp(self) -> bool:
        return self.dp_clip > 0

    @property
    def streaming(self) -> bool:
        return self.center == "mean"


def parse_rules(entries: Sequence[str], modalities: Iterable[str], *, trim: float = 0.2,
                dp_clip: float = 0.0, dp_noise: float = 0.0, dp_modalities: Sequence[str] = ()
                ) -> dict[str, ModalityRule]:
    """``federation.aggregation`` entries → modality → rule.

    An entry is a centre for every modality (``"median"``) or ``"MODALITY=CENTRE"`` for one
    (``["mean", "audio=median"]``: median for audio, mean elsewhere). DP applies to
    ``dp_modalities`` (all when empty) once ``dp_clip`` > 0."""
    mods = list(modalities)
    default = "mean"
    per: dict[str, str] = {}
    for entry in entries:
        name, sep, center = entry.partition("=")
        if not sep:
            default = entry.strip()
            continue
        name, center = name.strip(), center.strip()
        if name not in mods:
            raise ValueError(f"federation.aggregation entry {entry!r}: unknown modality {name!r}; "
                             f"known: {', '.join(mods)}")
        per[name] = center
    unknown = [m for m in dp_modalities if m not in mods]
    if unknown:
        raise ValueError(f"federation.dp-modalities {unknown}: unknown; known: {', '.join(mods)}")
    dp_on = set(dp_modalities or mods) if dp_clip > 0 else set()
    return {m: ModalityRule(per.get(m, default), trim, dp_clip if m in dp_on else 0.0,
                            dp_noise if m in dp_on else 0.0) for m in mods}


def coordinate_median(stack: F64) -> F64:
    """(N, …) → (…): the median over axis 0 (the clients), coordinate by coordinate."""
    if stack.shape[0] == 0:
        raise ValueError("the median of no client updates is undefined")
    return np.median(stack, axis=0)


def trim_count(n: int, trim: float) -> int:
    """Values dropped at each end for ``n`` clients: ⌊trim·n⌋, keeping at least one."""
    return min(int(math.floor(trim * n + 1e-9)), (n - 1) // 2)


def trimmed_mean(stack: F64, trim: float) -> F64:
    """(N, …) → (…): per coordinate, the mean of the values left after dropping the
    :func:`trim_count` largest and smallest."""
    n = stack.shape[0]
    if n == 0:
        raise ValueError("the trimmed mean of no client updates is undefined")
    k = trim_count(n, trim)
    if k == 0:
        return stack.mean(axis=0)
    ordered = np.sort(stack, axis=0)  # (N, …) sorted per coordinate
    return ordered[k: n - k].mean(axis=0)


def clip_to(changes: Mapping[str, F64], clip: float) -> tuple[dict[str, F64], float]:
    """Scale a client's changes (module → (d_out, d_in)) so their joint L2 norm is ≤ ``clip``;
    returns the scaled changes and the factor applied (1.0 = untouched)."""
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in changes.values()))
    factor = 1.0 if norm <= clip else clip / norm
    return {m: d * factor for m, d in changes.items()}, factor


def gaussian_rdp(noise_multiplier: float, order: float) -> float:
    """RDP ε(α) of one Gaussian mechanism with σ = z·sensitivity: α / (2 z²)."""
    return order / (2.0 * noise_multiplier ** 2)


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float,
                     orders: Sequence[float] = RDP_ORDERS) -> float:
    """(ε, δ)-DP of ``releases`` composed Gaussian mechanisms with multiplier z, via RDP:
    ε = min_α [releases·α/(2z²) + log(1/δ)/(α − 1)] (Mironov 2017, Prop. 3). 0 releases → 0;
    z = 0 (no noise) → inf."""
    return composed_epsilon([noise_multiplier] * max(releases, 0), delta, orders)


def composed_epsilon(multipliers: Sequence[float], delta: float,
                     orders: Sequence[float] = RDP_ORDERS) -> float:
    """(ε, δ) of a sequence of Gaussian releases with multipliers z_i (RDP adds up over them)."""
    if not multipliers:
        return 0.0
    if min(multipliers) <= 0:
        return math.inf
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta!r} must be in (0, 1)")
    inv = sum(1.0 / (2.0 * z * z) for z in multipliers)
    return min(a * inv + math.log(1 / delta) / (a - 1) for a in orders)


def dp_report(rounds: Sequence[Mapping], delta: float) -> dict | None:
    """The run's central-DP summary from the per-round log (``rounds[i]["dp"]``: modality →
    {"z", "sigma", "clients", "clipped"}); None when no round was noised or clipped under DP."""
    releases: dict[str, list[float]] = {}
    clipped: dict[str, int] = {}
    for r in rounds:
        for k, v in (r.get("dp") or {}).items():
            releases.setdefault(k, []).append(float(v["z"]))
            clipped[k] = clipped.get(k, 0) + int(v["clipped"])
    if not releases:
        return None
    every = [z for zs in releases.values() for z in zs]
    return {"delta": delta, "epsilon": composed_epsilon(every, delta),
            "releases": len(every),
            "per_modality": {k: {"releases": len(zs), "clipped_updates": clipped[k],
                                 "epsilon_alone": composed_epsilon(zs, delta)}
                             for k, zs in sorted(releases.items())},
            "scope": "LoRA expert updates of the training rounds (add/remove one client's update, "
                     "no sampling amplification); probe scores, routers and counts are not covered"}
