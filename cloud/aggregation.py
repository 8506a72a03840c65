"""Per-modality aggregation of one task's LoRA expert updates: pure numpy, streaming
(docs/design.md §2 step 4; the low-rank path: docs/aggregation.md).

Math. An expert on module m (a d_out×d_in linear) adds ΔW = s·B·A with A (r, d_in), B (d_out, r)
and s = alpha/r; s is the same for every client, so it is factored out and all below is on B·A.
For module m of modality k, over the clients c that hold k and sent m, with weights
w_c = n_samples, the target is the exact weighted mean of the clients' updates,
ΔW̄_m = Σ_c w_c B_c A_c / Σ_c w_c. The global expert must again be a rank-r LoRA (a PEFT adapter),
so rule "svd" re-factors ΔW̄ by a truncated SVD: ΔW̄ = U S Vᵀ → B' = U_r S_r, A' = V_rᵀ (see svd_factors).
This is exact whenever rank(ΔW̄) ≤ r: one client, identical clients, clients sharing A (or
sharing B). Otherwise it is NOT ΔW̄ but its best rank-r approximation in Frobenius norm
(Eckart–Young): a mean of N rank-r updates can have rank min(N·r, d_out, d_in). The relative
error ‖ΔW̄ − B'A'‖_F / ‖ΔW̄‖_F is measured and reported per module (0 where exact, up to the
float32 cast). Averaging A and B separately (rule "fedavg-ab", plain FedAvg on the LoRA
parameters, registered for comparison only) is not averaging ΔW: with Ā, B̄ the weighted means,
B̄·Ā = ΔW̄ − Σ_c w_c (B_c − B̄)(A_c − Ā) / Σ_c w_c, and that cross term vanishes only when the
clients agree on A or on B. Both rules report their error against the same exact ΔW̄.

Per modality: a client's tensors for modules of a modality it does not hold are ignored (they were
never trained on such data, so they neither contribute nor dilute the weights) and are recorded.

Low-rank streaming (docs/aggregation.md). Σ_c w_c B_c A_c = [w_1 B_1 … w_N B_N]·[A_1; …; A_N], so
``DeltaAccumulator.add`` appends the client's (w·B, A) to two stacks (d_out, k) and (k, d_in)
(:class:`LowRankSum`) instead of adding a dense d_out×d_in matrix. When a stack's buffer is full
(and k has doubled since the last time) it is re-compressed to its exact numerical rank: QR of
both stacks, SVD of the small core R_B R_Aᵀ, singular values ≤ σ_max·max(d_out, d_in, k)·eps
dropped (numpy's matrix_rank tolerance; the dropped part is ≤ that in spectral norm). So memory is
O((d_in + d_out)·k), k ≤ min(Σ ranks, d), and the final rank-r factors come from the same QR +
core SVD: B' = Q_B U_r S_r / Σw, A' = V_rᵀ Q_Aᵀ — the truncated SVD of ΔW̄ without ever forming it
(O(d·k²) time, not O(d³)), and the reported error is computed from the small factors and row
blocks (``DeltaAccumulator._lowrank_factors``). A module whose stacks would hold at least as many
floats as the dense sum (k·(d_in + d_out) ≥ d_in·d_out; decided at the start when two rank-r
updates already reach it, else when k grows there) keeps the dense float64 Σ w·B·A instead,
exactly as before. Dense is also kept where low rank is impossible: the median / trimmed-mean
centres need every client's dense ΔW_c (an order statistic per coordinate is not a low-rank
operation), and a module whose norm clipping mixes in the dense reference W_ref densifies at
finalize. Central DP accumulates the clipped changes low-rank (their norms come from r×r Gram
matrices, ‖BA‖² = tr((BᵀB)(AAᵀ)), and row blocks where W_ref is involved), but its Gaussian noise
is a dense d_out×d_in matrix by nature, so a DP module's centre is dense at finalize. Every update
is validated in full before any state changes (:func:`validate_update`); no per-client tensor is
kept on the mean path (the stacks hold the clients' factors until a re-compression folds them,
which is what exactness costs). Norm clipping (the strategy measures each client's change ‖B_c A_c
− W_ref‖ against the round's median, :func:`deviation_norm`) folds a shrunk change.

Per modality, the centre can instead be robust (coordinate-wise median, trimmed mean) or
differentially private (clip + Gaussian noise): see :mod:`cloud.robust`. The SVD re-factoring
then applies to that centre instead of the weighted mean.

Server step (FedOpt with an SGD server optimiser, Reddi et al. 2021). The clients' changes from
the round's start W_ref partly cancel in the mean (different shards pull different ways, and even
agreeing clients average to about one client's progress, not their sum), so ``server_lr`` η > 1
moves the expert further along the consensus: ΔW_new = W_ref + η·(ΔW̄ − W_ref), formed dense (the
strategy's W_ref is dense already) and re-factored by the same truncated SVD. η = 1 is the plain
centre and keeps the low-rank path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from cloud.robust import ModalityRule, clip_to, coordinate_median, trimmed_mean
from protocol.plan import ExpertPlan
from protocol.updates import ClientUpdate

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]
_KINDS = ("lora_A", "lora_B")
MAX_FACTOR = 1e4  # |entry| above this is no trained LoRA factor (rejected as invalid)


class UpdateError(ValueError):
    """A client update was rejected; the message names the client, the key and what is wrong."""


# ---------------------------------------------------------------------------------------------
# contracts


@dataclass(frozen=True)
class ModuleSpec:
    """The expert expected on one module: lora_A is (rank, d_in), lora_B is (d_out, rank)."""

    modality: str
    rank: int
    d_in: int
    d_out: int

    def shape_of(self, kind: str) -> tuple[int, int]:
        return (self.rank, self.d_in) if kind == "lora_A" else (self.d_out, self.rank)


@dataclass(frozen=True)
class AggregationSpec:
    """Task ``task``'s experts: module → :class:`ModuleSpec`, and the LoRA scale s = alpha/r.

    ``modalities`` are the names a client may claim to hold (default: those of ``modules``);
    :meth:`from_plan` uses every modality of the plan's map, so a client holding audio is fine
    in a task with no audio expert, while a misspelt name ("image" for "vision") is rejected.
    """

    task: str
    modules: Mapping[str, ModuleSpec]
    scale: float = 1.0
    modalities: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"`task` must be a non-empty string, got {self.task!r}")
        if not self.modules:
            raise ValueError(f"task {self.task!r}: the spec has no modules")
        for m, s in self.modules.items():
            dims = (s.rank, s.d_in, s.d_out)
            if not isinstance(m, str) or not m or any(not _is_int(v) or v < 1 for v in dims):
                raise ValueError(f"module {m!r}: rank, d_in, d_out must be integers >= 1, got {dims}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or self.scale <= 0:
            raise ValueError(f"`scale` (alpha/r) must be a number > 0, got {self.scale!r}")
        used = frozenset(s.modality for s in self.modules.values())
        known = frozenset(self.modalities) or used
        if not used <= known:
            raise ValueError(f"modules use modalities {sorted(used - known)} missing from "
                             f"`modalities` {sorted(known)}")
        object.__setattr__(self, "modules", dict(self.modules))
        object.__setattr__(self, "modalities", known)

    @classmethod
    def from_plan(cls, plan: ExpertPlan, task: str, dims: Mapping[str, tuple[int, int]]
                  ) -> AggregationSpec:
        """Task ``task``'s experts in ``plan``; ``dims`` maps each module to its (d_in, d_out)."""
        experts = [e for e in plan.experts if e.task == task]
        if not experts:
            raise ValueError(f"task {task!r} has no experts in the plan; tasks: {list(plan.tasks)}")
        scales = {e.alpha / e.rank for e in experts}
        if len(scales) != 1:
            raise ValueError(f"task {task!r}: experts have different alpha/rank {sorted(scales)}; "
                             f"the scale must be one constant to factor it out")
        missing = [e.module for e in experts if e.module not in dims]
        if missing:
            raise ValueError(f"`dims` lacks (d_in, d_out) for modules {missing}")
        modules = {e.module: ModuleSpec(e.modality, e.rank, *dims[e.module]) for e in experts}
        return cls(task, modules, scales.pop(), frozenset(plan.modality_of.values()))


@dataclass(frozen=True, eq=False)
class CheckedUpdate:
    """What :func:`validate_update` accepted: the (A, B) pairs that contribute, and what is ignored."""

    client_id: str
    weight: int
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]  # module → (A (r, d_in), B (d_out, r))
    ignored: tuple[str, ...]  # modules sent for a modality the client does not hold


# ---------------------------------------------------------------------------------------------
# validation


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _few(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    return ", ".join(repr(x) for x in names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def validate_update(update: ClientUpdate, spec: AggregationSpec, *, round: int | None = None,
                    seen: Collection[str] = ()) -> CheckedUpdate:
    """Check one update against ``spec`` without changing anything; raise :class:`UpdateError`.

    ``round`` is the round being aggregated (None: any), ``seen`` the client ids already added
    in it. Tensors of modalities the client does not hold are validated too (a malformed reply is
    rejected whole) but come back in ``ignored``, not in ``pairs``.
    """
    if not isinstance(update, ClientUpdate):
        raise UpdateError(f"expected a ClientUpdate, got {type(update).__name__}")
    cid = update.client_id
    if not isinstance(cid, str) or not cid:
        raise UpdateError(f"client {cid!r}: `client_id` must be a non-empty string")
    who = f"client {cid!r}"
    if update.task != spec.task:
        raise UpdateError(f"{who}: task {update.task!r} does not match the aggregated task {spec.task!r}")
    if not _is_int(update.round) or update.round < 0:
        raise UpdateError(f"{who}: `round` must be an integer >= 0, got {update.round!r}")
    if round is not None and update.round != round:
        raise UpdateError(f"{who}: round {update.round} but this accumulator aggregates round {round}")
    if cid in seen:
        raise UpdateError(f"{who}: already added in round {update.round}; one update per client per round")
    if not _is_int(update.n_samples) or update.n_samples <= 0:
        raise UpdateError(f"{who}: `n_samples` must be an integer > 0, got {update.n_samples!r}")
    mods = update.modalities
    if not isinstance(mods, set | frozenset) or any(not isinstance(k, str) for k in mods):
        raise UpdateError(f"{who}: `modalities` must be a frozenset of names, got {mods!r}")
    unknown_mods = sorted(set(mods) - spec.modalities)
    if unknown_mods:
        raise UpdateError(f"{who}: unknown modalities {unknown_mods}; known: {sorted(spec.modalities)}")
    if not isinstance(update.tensors, Mapping):
        raise UpdateError(f"{who}: `tensors` must be a mapping key → array, got "
                          f"{type(update.tensors).__name__}")

    found: dict[str, dict[str, np.ndarray]] = {}
    for key, x in update.tensors.items():
        module, _, kind = key.rpartition(".") if isinstance(key, str) else ("", "", "")
        if kind not in _KINDS or module not in spec.modules:
            raise UpdateError(f"{who}: unknown key {key!r}; expected '<module>.lora_A' or "
                              f"'<module>.lora_B' for a module of task {spec.task!r} such as "
                              f"{_few(spec.modules)}")
        ms = spec.modules[module]
        if not isinstance(x, np.ndarray):
            raise UpdateError(f"{who}: {key!r} must be a numpy array, got {type(x).__name__}")
        if not np.issubdtype(x.dtype, np.floating):
            raise UpdateError(f"{who}: {key!r} has dtype {x.dtype}; expected a float dtype")
        if x.shape != ms.shape_of(kind):
            what = "(rank, d_in)" if kind == "lora_A" else "(d_out, rank)"
            raise UpdateError(f"{who}: {key!r} has shape {x.shape}; expected {what} = "
                              f"{ms.shape_of(kind)}")
        if not np.isfinite(x).all():
            raise UpdateError(f"{who}: {key!r} has {int(x.size - np.isfinite(x).sum())} "
                              f"non-finite values (NaN or inf)")
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > MAX_FACTOR:
            # Trained LoRA factors are O(1); 1e19 would overflow B'·S to inf in float32.
            raise UpdateError(f"{who}: {key!r} has a value of magnitude {peak:.3g}, over the "
                              f"plausible {MAX_FACTOR:g} for a LoRA factor")
        found.setdefault(module, {})[kind] = x
    for module, pair in found.items():
        if len(pair) != 2:
            (have,) = pair
            other = "lora_B" if have == "lora_A" else "lora_A"
            raise UpdateError(f"{who}: {module + '.' + have!r} was sent without "
                              f"{module + '.' + other!r}")

    pairs = {m: (p["lora_A"], p["lora_B"]) for m, p in found.items() if spec.modules[m].modality in mods}
    ignored = tuple(m for m in spec.modules if m in found and m not in pairs)  # spec's own strings
    return CheckedUpdate(cid, int(update.n_samples), pairs, ignored)


def deviation_norm(update: ClientUpdate, reference: Mapping[str, F64]) -> float:
    """‖B·A − W_ref‖_F over all of ``update``'s modules (W_ref = 0 where absent): how far the
    client moved the expert this round. Call after validation. B·A is never formed whole
    (:func:`change_sq_norm`)."""
    total = 0.0
    for key, a in update.tensors.items():
        module, _, kind = key.rpartition(".")
        if kind != "lora_A":
            continue
        b = update.tensors[f"{module}.lora_B"]
        total += change_sq_norm(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                reference.get(module))
    return float(np.sqrt(total))


DENSE_BELOW = 1 << 16  # a module of at most this many weights keeps the dense sum
ROW_BLOCK = 256  # rows of B·A − W_ref formed at a time where a dense reference is involved


def change_sq_norm(a: F64, b: F64, ref: F64 | None = None) -> float:
    """‖B·A − W_ref‖²_F for A (r, d_in), B (d_out, r), W_ref (d_out, d_in) or None (= 0).

    Without a reference: tr((BᵀB)(AAᵀ)), two r×r Gram matrices, O((d_in + d_out)·r²). With one,
    the difference is formed ROW_BLOCK rows at a time (the exact entries, no cancellation between
    ‖BA‖² and ‖W_ref‖²), so the extra memory is O(ROW_BLOCK·d_in), not O(d_out·d_in)."""
    if ref is None:
        return max(float(np.sum((b.T @ b) * (a @ a.T))), 0.0)
    total = 0.0
    for i in range(0, b.shape[0], ROW_BLOCK):
        d = b[i:i + ROW_BLOCK] @ a - ref[i:i + ROW_BLOCK]
        total += float(np.sum(d * d))
    return total


def clip_scales(norms: Mapping[str, float], factor: float, min_clients: int = 3
                ) -> dict[str, float]:
    """Per client, the shrink that brings its change to at most ``factor`` × the median change
    of the round (1.0 = untouched). Needs ``min_clients`` to trust a median; ``factor`` 0 = off."""
    if factor <= 0 or len(norms) < min_clients:
        return dict.fromkeys(norms, 1.0)
    limit = factor * float(np.median(list(norms.values())))
    return {c: (limit / n if n > limit > 0 else 1.0) for c, n in norms.items()}


# ---------------------------------------------------------------------------------------------
# the rules (a registry: docs/design.md §5.5)


class LoraAggregator(Protocol):
    """How the folded sums of one module become the global expert's (A', B').

    The accumulator always keeps the exact Σ w·B·A; a rule may keep more running sums (O(1) in
    the number of clients) in ``state`` and returns float64 factors A' (r, d_in), B' (d_out, r).
    """

    name: str

    def new_state(self, spec: ModuleSpec) -> dict[str, F64]: ...

    def fold(self, state: dict[str, F64], w: int, a: F64, b: F64) -> None: ...

    def factors(self, state: dict[str, F64], mean_delta: F64, weight: int, spec: ModuleSpec
                ) -> tuple[F64, F64]: ...


def svd_factors(delta: F64, rank: int) -> tuple[F64, F64]:
    """Best rank-``rank`` factors of ``delta`` (d_out, d_in): A' = V_rᵀ (orthonormal rows),
    B' = U_r S_r.

    Why not the balanced √S split: training resumes from these factors next round, and LoRA's
    gradients are ∂B ∝ A·x and ∂A ∝ Bᵀ·g. A direction with a small singular value would get
    both factors ≈ 0 under √S — a saddle neither factor can leave, so the expert's usable rank
    would shrink to what round 1 learned. With unit-norm rows of A every direction stays
    trainable (B's column starts where it is, like LoRA's own B = 0 init). Measured on color
    (3 rounds × 100 steps): 82.5% exact match vs 71.0% with the √S split (one seed each).
    Zero-padded to exactly ``rank`` when rank > min(d_out, d_in) (PEFT needs shape (r, ·)).
    """
    u, s, vt = np.linalg.svd(delta, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    k = min(rank, s.size)
    a = np.zeros((rank, delta.shape[1]))
    b = np.zeros((delta.shape[0], rank))
    a[:k] = vt[:k]
    b[:, :k] = u[:, :k] * s[:k]
    return a, b


class SvdAggregator:
    """Exact weighted mean of ΔW, re-factored to rank r by truncated SVD (the default)."""

    name = "svd"

    def new_state(self, spec: ModuleSpec) -> dict[str, F64]:
        return {}

    def fold(self, state: dict[str, F64], w: int, a: F64, b: F64) -> None:
        pass  # the accumulator's Σ w·B·A is all this rule needs

    def factors(self, state: dict[str, F64], mean_delta: F64, weight: int, spec: ModuleSpec
                ) -> tuple[F64, F64]:
        return svd_factors(mean_delta, spec.rank)


class FedAvgABAggregator:
    """Naive FedAvg of lora_A and lora_B separately: B̄·Ā ≠ mean(B·A); for comparison only."""

    name = "fedavg-ab"

    def new_state(self, spec: ModuleSpec) -> dict[str, F64]:
        return {"A": np.zeros((spec.rank, spec.d_in)), "B": np.zeros((spec.d_out, spec.rank))}

    def fold(self, state: dict[str, F64], w: int, a: F64, b: F64) -> None:
        state["A"] += w * a
        state["B"] += w * b

    def factors(self, state: dict[str, F64], mean_delta: F64, weight: int, spec: ModuleSpec
                ) -> tuple[F64, F64]:
        return state["A"] / weight, state["B"] / weight


AGGREGATORS: dict[str, LoraAggregator] = {"svd": SvdAggregator(), "fedavg-ab": FedAvgABAggregator()}


def register_aggregator(rule: LoraAggregator, *, replace: bool = False) -> None:
    if rule.name in AGGREGATORS and not replace:
        raise ValueError(f"aggregator {rule.name!r} is already registered; pass replace=True")
    AGGREGATORS[rule.name] = rule


def get_aggregator(name: str) -> LoraAggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]


# ---------------------------------------------------------------------------------------------
# streaming accumulation


@dataclass(frozen=True, eq=False)
class ModuleResult:
    """The new global expert on one module (multiply B'A' by the spec's scale for ΔW)."""

    module: str
    modality: str
    lora_A: F32  # (r, d_in)
    lora_B: F32  # (d_out, r)
    weight: int  # Σ n_samples of the contributing clients
    n_clients: int
    error: float  # ‖ΔW̄ − B'A'‖_F / ‖ΔW̄‖_F of the returned float32 factors (0 if ΔW̄ = B'A' = 0)


@dataclass(frozen=True, eq=False)
class AggregationResult:
    """One round's aggregate. Modules without any contribution are in ``missing``, not ``modules``:
    the caller keeps their old global expert. Client ids are sorted (order-independent)."""

    task: str
    round: int | None
    rule: str
    scale: float
    modules: dict[str, ModuleResult]  # in the spec's order
    weight_by_modality: dict[str, int]  # every modality of the spec's modules (0 if none)
    clients_by_modality: dict[str, tuple[str, ...]]  # clients that contributed to ≥ 1 module of it
    missing: tuple[str, ...]
    ignored: dict[str, tuple[str, ...]]  # client → modules sent for a modality it does not hold
    clients: tuple[str, ...]  # every accepted client
    centers: dict[str, str] = field(default_factory=dict)  # modality → its centre (mean, median…)
    # modality → {"clients": n, "clipped": clients whose change was clipped to C, "sigma": noise
    # std on the mean} for every modality aggregated under central DP this round
    dp: dict[str, dict[str, float]] = field(default_factory=dict)

    def tensors(self) -> dict[str, F32]:
        """The new experts keyed like a :class:`ClientUpdate` (``"<module>.lora_A"``, …)."""
        out: dict[str, F32] = {}
        for m, r in self.modules.items():
            out[f"{m}.lora_A"], out[f"{m}.lora_B"] = r.lora_A, r.lora_B
        return out

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready values (for logs and metrics)."""
        return {
            "task": self.task, "round": self.round, "rule": self.rule, "scale": self.scale,
            "modules": {m: {"modality": r.modality, "weight": r.weight, "n_clients": r.n_clients,
                            "error": r.error} for m, r in self.modules.items()},
            "weight_by_modality": dict(self.weight_by_modality),
            "clients_by_modality": {k: list(v) for k, v in self.clients_by_modality.items()},
            "missing": list(self.missing),
            "ignored": {c: list(v) for c, v in self.ignored.items()},
            "clients": list(self.clients),
            "centers": dict(self.centers),
            "dp": {k: dict(v) for k, v in self.dp.items()},
        }


def _stack_svd(b: F64, a: F64) -> tuple[F64, F64, F64, F64, F64, F64]:
    """B·A for B (d_out, k), A (k, d_in) as Q_B·C·Q_Aᵀ with C = U·diag(S)·Vᵀ, never forming B·A.

    B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR: Q_B (d_out, p), Q_A (d_in, q) orthonormal columns,
    p = min(d_out, k), q = min(d_in, k)), so B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ and the SVD of the small
    core C = R_B R_Aᵀ (p, q) is the SVD of B·A: U_BA = Q_B U, V_BA = Q_A V. O(d·k² + k³) time,
    O(d·k) memory. Returns (Q_B, C, U, S, Vᵀ, Q_A)."""
    qb, rb = np.linalg.qr(b)  # (d_out, p), (p, k)
    qa, ra = np.linalg.qr(a.T)  # (d_in, q), (q, k)
    core = rb @ ra.T  # (p, q)
    u, s, vt = np.linalg.svd(core, full_matrices=False)
    return qb, core, u, s, vt, qa


def numerical_rank(s: F64, shape: tuple[int, ...]) -> int:
    """How many singular values ``s`` (descending) exceed σ_max·max(shape)·eps (float64): numpy's
    ``matrix_rank`` tolerance. What is dropped has spectral norm ≤ that bound."""
    if s.size == 0 or s[0] <= 0:
        return 0
    tol = float(s[0]) * max(shape) * float(np.finfo(np.float64).eps)
    return int(np.count_nonzero(s > tol))


class LowRankSum:
    """A running Σ_i B_i·A_i (d_out, d_in) kept as the stacks [B_1 … B_k] (d_out, k) and
    [A_1; …; A_k] (k, d_in) — or, where that is not smaller, as the dense float64 sum.

    ``limit`` is the widest stack still smaller than the dense matrix (k·(d_in + d_out) <
    d_in·d_out). A sum starts dense when two rank-``rank`` terms already reach it or the module
    has at most ``DENSE_BELOW`` weights (small modules: the exact old behaviour), and turns
    dense when a term would take k past it. The buffers grow
    ×1.5 (O(d·k) floats, never more than ``limit`` columns); when full, and once k is at least
    twice the rank found by the last re-compression, they are re-compressed to their exact
    numerical rank (:func:`_stack_svd`, :func:`numerical_rank`) — amortised O(d·k²) in all.
    """

    def __init__(self, d_out: int, d_in: int, rank: int, *, dense: bool = False):
        self.shape = (d_out, d_in)
        self.limit = (d_out * d_in - 1) // (d_out + d_in)
        self.base = min(self.limit, 4 * rank)
        self.k = 0
        self.compressions = 0
        self._next = self.base  # re-compress once k reaches this and the buffer is full
        self.b: F64 = np.zeros((d_out, 0))
        self.a: F64 = np.zeros((0, d_in))
        # Small modules stay dense from the start (≤ DENSE_BELOW floats: 512 KB): nothing to
        # save there, and their sums stay bit-for-bit what the dense path has always given.
        self.dense: F64 | None = (np.zeros(self.shape) if dense or 2 * rank > self.limit
                                  or d_out * d_in <= DENSE_BELOW else None)

    @property
    def low_rank(self) -> bool:
        return self.dense is None

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes if self.dense is not None else self.b.nbytes + self.a.nbytes

    def factors(self) -> tuple[F64, F64]:
        """Views of the used stacks: B (d_out, k), A (k, d_in) (low-rank sums only)."""
        return self.b[:, :self.k], self.a[:self.k]

    def add(self, b: F64, a: F64) -> None:
        """Add B·A for B (d_out, r), A (r, d_in) — already weighted by the caller."""
        if self.dense is not None:
            self.dense += b @ a  # (d_out, d_in)
            return
        r = b.shape[1]
        if self.k + r > self.b.shape[1]:
            if self.k >= self._next:
                self.compress()
            need = self.k + r
            if need > self.limit:
                self.densify()
                self.add(b, a)
                return
            if need > self.b.shape[1]:
                self._resize(min(self.limit, max(need, self.base, (3 * self.b.shape[1]) // 2)))
        self.b[:, self.k:self.k + r] = b
        self.a[self.k:self.k + r] = a
        self.k += r

    def _resize(self, cap: int) -> None:
        d_out, d_in = self.shape
        nb, na = np.zeros((d_out, cap)), np.zeros((cap, d_in))
        nb[:, :self.k], na[:self.k] = self.factors()
        self.b, self.a = nb, na

    def compress(self) -> None:
        """Replace the stacks by an exactly equal pair of numerical rank ρ ≤ k (Q_B U S, Vᵀ Q_Aᵀ)."""
        if self.dense is not None or self.k == 0:
            return
        b, a = self.factors()
        qb, _, u, s, vt, qa = _stack_svd(b, a)
        rho = numerical_rank(s, (*self.shape, self.k))
        new_b = (qb @ u[:, :rho]) * s[:rho]  # (d_out, ρ)
        new_a = vt[:rho] @ qa.T  # (ρ, d_in)
        self.b[:, :rho], self.a[:rho] = new_b, new_a
        self.b[:, rho:self.k], self.a[rho:self.k] = 0.0, 0.0
        self.k = rho
        self._next = max(self.base, 2 * rho)
        self.compressions += 1

    def densify(self) -> None:
        """Switch to the dense float64 sum (where it is the smaller representation)."""
        if self.dense is None:
            b, a = self.factors()
            self.dense = b @ a
            self.b, self.a, self.k = np.zeros((self.shape[0], 0)), np.zeros((0, self.shape[1])), 0

    def matrix(self) -> F64:
        """The sum as a new dense (d_out, d_in) array."""
        if self.dense is not None:
            return self.dense.copy()
        b, a = self.factors()
        return b @ a


class DeltaAccumulator:
    """Folds client updates of one (task, round) into running sums; see the module docstring.

    ``round=None`` takes the round of the first accepted update. State per module: Σ w·B·A as a
    :class:`LowRankSum` (stacks of the weighted factors, O((d_in + d_out)·k), re-compressed to
    their numerical rank; the dense float64 (d_out, d_in) sum where that is smaller), Σ w, a
    client count and the rule's own sums; per client only its id (and which modules it had
    ignored). Dense by necessity: modalities under a median / trimmed-mean centre keep every
    client's dense ΔW (and a dense sum); a DP module's noised centre is formed dense at finalize.
    """

    def __init__(self, spec: AggregationSpec, rule: str | LoraAggregator = "svd", *,
                 round: int | None = None, centers: Mapping[str, ModalityRule] | None = None,
                 reference: Mapping[str, F64] | None = None,
                 rng: np.random.Generator | None = None, low_rank: bool = True,
                 server_lr: float = 1.0):
        """``centers``: modality → :class:`cloud.robust.ModalityRule` (absent = weighted mean);
        ``reference``: module → the global ΔW (d_out, d_in) before the round, what a change is
        measured from (zero where absent); ``rng`` draws the DP noise (seeded by the caller);
        ``low_rank=False`` keeps every sum dense (the pre-low-rank path, for comparison);
        ``server_lr`` η: the new ΔW is W_ref + η·(centre − W_ref) (FedOpt's server step with
        SGD; 1 = the centre itself, > 1 extrapolates the round's consensus change)."""
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {server_lr!r}")
        self.server_lr = float(server_lr)
        self.spec = spec
        self.rule = get_aggregator(rule) if isinstance(rule, str) else rule
        if self.server_lr != 1.0 and self.rule.name != "svd":
            raise ValueError(f"a server step (server_lr={server_lr}) needs rule 'svd'; rule "
                             f"{self.rule.name!r} factors its own sums, not a target ΔW")
        self.round = round
        used_mods = {s.modality for s in spec.modules.values()}
        self.centers = {k: (centers or {}).get(k, ModalityRule()) for k in sorted(used_mods)}
        special = [k for k, r in self.centers.items() if r.dp or not r.streaming]
        if special and self.rule.name != "svd":
            raise ValueError(f"modalities {special} use a robust or DP centre, which rule "
                             f"{self.rule.name!r} cannot factor; use rule 'svd'")
        if any(r.dp and r.dp_noise > 0 for r in self.centers.values()) and rng is None:
            raise ValueError("central DP with noise needs a seeded `rng`")
        self.reference = dict(reference or {})
        self.rng = rng
        # median / trimmed mean: every client's ΔW per module, (d_out, d_in) each (O(N) memory)
        self._stack: dict[str, list[F64]] = {
            m: [] for m, s in spec.modules.items() if not self.centers[s.modality].streaming}
        # central DP: Σ of clipped changes per module (low rank: Σ f·B·A, and the coefficients
        # of the reference(s) subtracted), clients and clipped clients per modality
        self._dp_sum = {m: LowRankSum(s.d_out, s.d_in, s.rank, dense=not low_rank)
                        for m, s in spec.modules.items() if self.centers[s.modality].dp}
        self._dp_refs: dict[str, list[tuple[F64, float]]] = {m: [] for m in self._dp_sum}
        self._dp_clients = dict.fromkeys((k for k, r in self.centers.items() if r.dp), 0)
        self._dp_clipped = dict(self._dp_clients)
        self._seen: set[str] = set()
        self._sum = {m: LowRankSum(s.d_out, s.d_in, s.rank, dense=m in self._stack or not low_rank)
                     for m, s in spec.modules.items()}  # Σ w·B·A
        # Σ w·(1 − shrink)·W_ref of norm-clipped clients on low-rank sums (W_ref is dense)
        self._ref_terms: dict[str, list[tuple[F64, float]]] = {m: [] for m in spec.modules}
        self._state = {m: self.rule.new_state(s) for m, s in spec.modules.items()}
        self._weight = dict.fromkeys(spec.modules, 0)
        self._count = dict.fromkeys(spec.modules, 0)
        used = sorted({s.modality for s in spec.modules.values()})
        self._mod_weight = dict.fromkeys(used, 0)
        self._mod_clients: dict[str, list[str]] = {k: [] for k in used}
        self._ignored: dict[str, tuple[str, ...]] = {}

    @staticmethod
    def _add_term(terms: list[tuple[F64, float]], ref: F64, coef: float) -> None:
        if terms and terms[-1][0] is ref:
            terms[-1] = (ref, terms[-1][1] + coef)
        else:
            terms.append((ref, coef))

    def add(self, update: ClientUpdate, shrink: float = 1.0,
            reference: Mapping[str, F64] | None = None) -> None:
        """Validate ``update`` in full (UpdateError, nothing changed), then fold it in.

        ``shrink`` < 1 (norm clipping) folds W_ref + shrink·(B·A − W_ref) instead of B·A, with
        W_ref (d_out, d_in) the module's global ΔW before the round (``reference``, zero where
        absent): the client's *change* is scaled, not its expert."""
        if not 0 < shrink <= 1:
            raise ValueError(f"shrink must be in (0, 1], got {shrink}")
        checked = validate_update(update, self.spec, round=self.round, seen=self._seen)
        self.round = update.round
        self._seen.add(checked.client_id)
        if reference:
            self.reference = {**self.reference, **reference}
        refs = self.reference
        w = checked.weight
        touched: set[str] = set()
        # modality → module → the client's change: a dense (d_out, d_in) array, or for a low-rank
        # DP sum (B, A, W_ref or None, shrink) with change = shrink·(B·A − W_ref)
        dp_changes: dict[str, dict[str, Any]] = {}
        for m, (a, b) in checked.pairs.items():
            a64 = np.asarray(a, dtype=np.float64)  # (r, d_in)
            b64 = np.asarray(b, dtype=np.float64)  # (d_out, r)
            modality = self.spec.modules[m].modality
            center = self.centers[modality]
            total = self._sum[m]
            ref = refs.get(m)
            dp_dense = center.dp and not self._dp_sum[m].low_rank
            if not total.low_rank and (shrink < 1 or dp_dense or not center.streaming):
                delta = b64 @ a64  # (d_out, d_in)
                ref0 = np.zeros_like(delta) if ref is None else ref
                if shrink < 1:
                    delta = ref0 + shrink * (delta - ref0)
                    b64 = b64 * shrink  # the A/B-averaging rule sees a shrunk B (approximate)
                if center.dp:
                    dp_changes.setdefault(modality, {})[m] = delta - ref0
                if not center.streaming:
                    self._stack[m].append(delta)
                assert total.dense is not None
                total.dense += w * delta
            else:
                b_raw = b64
                if shrink < 1:
                    # W_ref + s·(BA − W_ref) = s·BA + (1 − s)·W_ref: the stack gets s·B, the dense
                    # reference only a coefficient (it is mixed in at finalize)
                    b64 = b64 * shrink
                    if ref is not None:
                        self._add_term(self._ref_terms[m], ref, w * (1.0 - shrink))
                if center.dp:
                    if dp_dense:
                        ref0 = np.zeros(self._sum[m].shape) if ref is None else ref
                        change = b64 @ a64 + (1.0 - shrink) * ref0 - ref0  # (d_out, d_in)
                        dp_changes.setdefault(modality, {})[m] = change
                    else:
                        dp_changes.setdefault(modality, {})[m] = (b_raw, a64, ref, shrink)
                total.add(w * b64, a64)
            self.rule.fold(self._state[m], w, a64, b64)
            self._weight[m] += w
            self._count[m] += 1
            touched.add(modality)
        for modality, changes in dp_changes.items():  # clipped jointly over the modality's modules
            clip = self.centers[modality].dp_clip
            if all(isinstance(d, np.ndarray) for d in changes.values()):
                clipped, factor = clip_to(changes, clip)
                for m, d in clipped.items():
                    self._dp_sum[m].densify()
                    dense = self._dp_sum[m].dense
                    assert dense is not None
                    dense += d
            else:
                sq = 0.0
                for d in changes.values():
                    if isinstance(d, np.ndarray):
                        sq += float(np.sum(d * d))
                    else:  # ‖s·(BA − W_ref)‖² without forming BA (Gram traces / row blocks)
                        b_raw, a64, ref, s = d
                        sq += s * s * change_sq_norm(a64, b_raw, ref)
                norm = float(np.sqrt(sq))
                factor = 1.0 if norm <= clip else clip / norm
                for m, d in changes.items():
                    dsum = self._dp_sum[m]
                    if isinstance(d, np.ndarray):
                        dsum.densify()
                        assert dsum.dense is not None
                        dsum.dense += d * factor
                    else:  # f·s·(BA − W_ref) = (f·s·B)·A − f·s·W_ref
                        b_raw, a64, ref, s = d
                        dsum.add((factor * s) * b_raw, a64)
                        if ref is not None:
                            self._add_term(self._dp_refs[m], ref, -factor * s)
            self._dp_clients[modality] += 1
            self._dp_clipped[modality] += int(factor < 1)
        for k in touched:
            self._mod_weight[k] += w
            self._mod_clients[k].append(checked.client_id)
        if checked.ignored:
            self._ignored[checked.client_id] = checked.ignored

    @property
    def nbytes(self) -> int:
        """Bytes of every array the accumulator holds: O((d_in + d_out)·k) per low-rank module,
        d_in·d_out floats per dense one (references passed in by the caller not counted)."""
        return (sum(t.nbytes for t in self._sum.values())
                + sum(a.nbytes for st in self._state.values() for a in st.values())
                + sum(a.nbytes for st in self._stack.values() for a in st)
                + sum(t.nbytes for t in self._dp_sum.values()))

    @property
    def stored_floats(self) -> int:
        """Float64 values held (``nbytes`` / 8)."""
        return self.nbytes // 8

    def width(self, module: str) -> int | None:
        """The stacks' current k for ``module``'s weighted sum, None where it is kept dense."""
        t = self._sum[module]
        return t.k if t.low_rank else None

    def _sum_matrix(self, module: str) -> F64:
        """Σ w·B·A (+ the norm-clipping reference terms) as a dense (d_out, d_in) array."""
        out = self._sum[module].matrix()
        for ref, coef in self._ref_terms[module]:
            out += coef * ref
        return out

    def mean_delta(self, module: str) -> F64:
        """The exact weighted mean ΔW̄ (d_out, d_in) of ``module``, without the scale s. Formed
        dense on demand for a low-rank module (O(d_out·d_in)); :meth:`finalize` never needs it."""
        if module not in self.spec.modules:
            raise KeyError(f"module {module!r} is not in the spec; e.g. {_few(self.spec.modules)}")
        if self._weight[module] == 0:
            raise ValueError(f"module {module!r} got no contribution yet")
        t = self._sum[module]
        if t.dense is not None and not self._ref_terms[module]:
            return t.dense / self._weight[module]
        return self._sum_matrix(module) / self._weight[module]

    def finalize(self) -> AggregationResult:
        """The new experts (float32 factors), weights, clients, errors; the state is unchanged."""
        modules: dict[str, ModuleResult] = {}
        dp = {k: {"clients": n, "clipped": self._dp_clipped[k],
                  "sigma": self.centers[k].dp_noise * self.centers[k].dp_clip / n}
              for k, n in self._dp_clients.items() if n}
        for m, s in self.spec.modules.items():
            if self._weight[m] == 0:
                continue
            center = self.centers[s.modality]
            if (isinstance(self.rule, SvdAggregator) and center.streaming and not center.dp
                    and self._sum[m].low_rank and not self._ref_terms[m]
                    and self.server_lr == 1.0):
                a32, b32, err = self._lowrank_factors(m, s)
            else:
                target = self._center(m, s, dp)
                a, b = self.rule.factors(self._state[m], target, self._weight[m], s)
                a32, b32 = a.astype(np.float32), b.astype(np.float32)
                diff = float(np.linalg.norm(target - b32.astype(np.float64) @ a32.astype(np.float64)))
                norm = float(np.linalg.norm(target))
                err = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
            modules[m] = ModuleResult(m, s.modality, a32, b32, self._weight[m], self._count[m], err)
        return AggregationResult(
            task=self.spec.task, round=self.round, rule=self.rule.name, scale=float(self.spec.scale),
            modules=modules,
            weight_by_modality=dict(self._mod_weight),
            clients_by_modality={k: tuple(sorted(v)) for k, v in self._mod_clients.items()},
            missing=tuple(m for m in self.spec.modules if self._weight[m] == 0),
            ignored={c: self._ignored[c] for c in sorted(self._ignored)},
            clients=tuple(sorted(self._seen)),
            centers={k: ("dp-mean" if r.dp else r.center) for k, r in self.centers.items()},
            dp=dp,
        )

    def _lowrank_factors(self, m: str, s: ModuleSpec) -> tuple[F32, F32, float]:
        """Rule "svd" on a low-rank sum: the truncated SVD of ΔW̄ = (Σ w·B·A)/Σw from the stacks
        (same factor convention as :func:`svd_factors`: A' = V_rᵀ orthonormal rows, B' = U_r S_r),
        and its error, without forming ΔW̄.

        With B̃ = R_B only (QR, mode "r") and Ãᵀ = Q_A R_A, ΔW̄ = (B̃ R_Aᵀ) Q_Aᵀ / Σw; the core
        C = R_B R_Aᵀ has the singular values of Σ w·B·A, and B' = ΔW̄ (Q_A V_r) = B̃ (R_Aᵀ V_r) / Σw
        needs no Q_B, so the only (d, k) temporary is Q_A. Error: A'ᵀ = Q_A Y + E_A with
        E_A ⊥ range Q_A splits ΔW̄ − B'A' into (ΔW̄ Q_A − B'Yᵀ) Q_Aᵀ and − B'E_Aᵀ, orthogonal, so
        ‖·‖² = ‖B̃ R_Aᵀ/Σw − B'Yᵀ‖² (formed ROW_BLOCK rows at a time) + tr((B'ᵀB')(E_AᵀE_A))."""
        a = np.zeros((s.rank, s.d_in))
        b = np.zeros((s.d_out, s.rank))
        t = self._sum[m]
        if t.k == 0:
            return a.astype(np.float32), b.astype(np.float32), 0.0
        weight = float(self._weight[m])
        sb, sa = t.factors()
        rb = np.linalg.qr(sb, mode="r")  # (p, k)
        qa, ra = np.linalg.qr(sa.T)  # (d_in, q), (q, k)
        u, sv, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
        del u
        k = min(s.rank, sv.size)
        rat = ra.T  # (k, q)
        a[:k] = vt[:k] @ qa.T  # V_rᵀ Q_Aᵀ
        b[:, :k] = sb @ (rat @ (vt[:k].T / weight))  # B̃ R_Aᵀ V_r / Σw = Q_B U_r S_r / Σw
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        b64 = b32.astype(np.float64)
        at = a32.astype(np.float64).T  # (d_in, r)
        y = qa.T @ at  # (q, r)
        ea = at - qa @ y
        sq = float(np.sum((b64.T @ b64) * (ea.T @ ea)))
        right = rat / weight  # (k, q)
        for i in range(0, s.d_out, ROW_BLOCK):
            d = sb[i:i + ROW_BLOCK] @ right - b64[i:i + ROW_BLOCK] @ y.T
            sq += float(np.sum(d * d))
        diff = float(np.sqrt(max(sq, 0.0)))
        norm = float(np.linalg.norm(sv)) / weight
        err = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        return a32, b32, err

    def _dp_total(self, m: str) -> F64:
        """Σ of the clipped changes of module ``m`` as a dense (d_out, d_in) array."""
        out = self._dp_sum[m].matrix()
        for ref, coef in self._dp_refs[m]:
            out += coef * ref
        return out

    def _center(self, m: str, s: ModuleSpec, dp: Mapping[str, Mapping[str, float]]) -> F64:
        """Module ``m``'s new ΔW (d_out, d_in) under its modality's centre (dense: the noise of
        central DP and the order statistics are dense by nature), after the server step."""
        target = self._raw_center(m, s, dp)
        if self.server_lr == 1.0:
            return target
        ref = self.reference.get(m)
        if ref is None:
            return self.server_lr * target
        return ref + self.server_lr * (target - ref)

    def _raw_center(self, m: str, s: ModuleSpec, dp: Mapping[str, Mapping[str, float]]) -> F64:
        """Module ``m``'s centre (d_out, d_in) of the clients' ΔW under its modality's rule."""
        center = self.centers[s.modality]
        if center.dp:
            ref = self.reference.get(m, np.zeros((s.d_out, s.d_in)))
            mean = ref + self._dp_total(m) / self._dp_clients[s.modality]
            sigma = dp[s.modality]["sigma"]
            if sigma > 0:
                assert self.rng is not None  # checked in __init__
                mean = mean + self.rng.normal(0.0, sigma, mean.shape)
            return mean
        if center.center == "median":
            return coordinate_median(np.stack(self._stack[m]))
        if center.center == "trimmed-mean":
            return trimmed_mean(np.stack(self._stack[m]), center.trim)
        return self.mean_delta(m)


def aggregate(spec: AggregationSpec, updates: Iterable[ClientUpdate], rule: str = "svd", *,
              round: int | None = None) -> AggregationResult:
    """Fold ``updates`` one at a time (an iterator keeps memory flat) and finalize."""
    acc = DeltaAccumulator(spec, rule, round=round)
    for u in updates:
        acc.add(u)
    return acc.finalize()
