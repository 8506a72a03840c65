"""Federated fit of one task's router entry: FedAvg of its autoencoder, τ from pooled histograms.

Weights. Round r: every client c holding task t starts from the same global AE weights θ_r (round
0: :func:`mole.router.init_autoencoder`, the same seed everywhere), trains a few local epochs
on its n_c features, and sends θ_c; the cloud sets θ_{r+1} = Σ_c n_c θ_c / Σ_c n_c. This is
plain FedAvg, and it is meaningful only because of the common start: a hidden unit's weights
mean the same thing on every client since a few epochs move each θ_c only a little away from
θ_r, so the mean stays near each of them (on similar data it is close to what one centralised
fit would reach). Averaging independently initialised AEs would be meaningless: an AE is the
same function under any permutation of its hidden units, so unit j of client 1 and unit j of
client 2 need not correspond, and their mean is noise.

Threshold. τ_t is the q-quantile of the task's (held-out) reconstruction errors over *all*
clients. A mean of per-client quantiles is not that quantile (clients differ in size and in
their error distributions), and sending raw errors leaks per-sample information. Instead each
client sends the counts of its errors over fixed bins shared by every party
(:data:`mole.router.ERROR_BIN_EDGES`, 512 log-spaced bins); counts of disjoint sets add, so the
sum of the clients' histograms *is* the histogram of the pooled errors and
:func:`mole.router.histogram_quantile` of it is the pooled quantile up to one bin's width
(a relative 10^(9/512) − 1 ≈ 4%). Weighting is implicit: a client with more errors adds more
counts.

Streaming: ``RouterAccumulator.add`` validates a reply in full, then folds it into float64
Σ n·θ, Σ n and the summed counts; no per-client array is kept, memory is flat in the number of
clients. The module is numpy-only at its core; it imports the shared bins and checks from
``mole.router`` so that edge and cloud can never disagree about them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mole.router import (
    N_ERROR_BINS,
    ae_shapes,
    check_ae_state,
    check_error_histogram,
    histogram_quantile,
)

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


class RouterUpdateError(ValueError):
    """A client's router reply was rejected; the message names the client and what is wrong."""


@dataclass(frozen=True)
class RouterResult:
    """One task's aggregated router entry after one round.

    ``state``: the sample-weighted mean AE state (float32; keys as ``TaskAutoencoder.state_dict``),
    None if no client sent weights. ``threshold``: τ from the summed histograms, None if no client
    sent one. ``n_samples`` sums every accepted client's ``n_samples``; ``n_errors`` is the number
    of errors the summed histogram counts (what τ was pooled from).
    """

    task: str
    state: dict[str, F32] | None
    threshold: float | None
    n_clients: int
    n_samples: int
    n_errors: int = 0


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class RouterAccumulator:
    """Streaming aggregation of one task's router replies (AE weights and/or error histograms)."""

    def __init__(self, task: str, dim: int, hidden: int):
        if not isinstance(task, str) or not task:
            raise ValueError(f"`task` must be a non-empty string, got {task!r}")
        for name, v in (("dim", dim), ("hidden", hidden)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"router `{name}` must be an integer >= 1, got {v!r}")
        self.task, self.dim, self.hidden = task, int(dim), int(hidden)
        self._clients: set[str] = set()
        self._n_samples = 0
        # Σ n_c·θ_c per key (float64: thousands of float32 terms would lose digits) and Σ n_c over
        # the clients that sent weights (a histogram-only reply does not dilute the mean).
        self._sums: dict[str, F64] = {k: np.zeros(s) for k, s in ae_shapes(self.dim, self.hidden).items()}
        self._state_weight = 0
        self._counts = np.zeros(N_ERROR_BINS, dtype=np.int64)  # (512,) summed histograms

    @property
    def n_clients(self) -> int:
        return len(self._clients)

    def add(self, client_id: str, n_samples: int, state: Mapping[str, np.ndarray] | None,
            histogram: np.ndarray | None) -> None:
        """Validate one reply in full, then fold it in; on any flaw raise and change nothing."""
        who = f"task {self.task!r}, client {client_id!r}"
        if not isinstance(client_id, str) or not client_id:
            raise RouterUpdateError(f"{who}: client id must be a non-empty string")
        if client_id in self._clients:
            raise RouterUpdateError(f"{who}: this client already replied in this round")
        if not _is_int(n_samples) or n_samples <= 0:
            raise RouterUpdateError(f"{who}: n_samples must be an integer > 0, got {n_samples!r}")
        if state is None and histogram is None:
            raise RouterUpdateError(f"{who}: the reply has neither AE weights nor an error histogram")
        try:
            arrays = None if state is None else check_ae_state(state, self.dim, self.hidden)
        except ValueError as e:
            raise RouterUpdateError(f"{who}: {e}") from e
        try:
            counts = None if histogram is None else check_error_histogram(histogram)
        except ValueError as e:
            raise RouterUpdateError(f"{who}: {e}") from e
        # everything checked: from here on nothing can fail half-way
        n = int(n_samples)
        if arrays is not None:
            for k, v in arrays.items():
                self._sums[k] += n * v.astype(np.float64)
            self._state_weight += n
        if counts is not None:
            self._counts += counts
        self._clients.add(client_id)
        self._n_samples += n

    def finalize(self, quantile: float) -> RouterResult:
        """Weighted-mean AE state and τ = ``quantile`` of the pooled errors; the sums are kept."""
        if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 < quantile <= 1:
            raise ValueError(f"router quantile must be in (0, 1], got {quantile!r}")
        state = None
        if self._state_weight:
            state = {k: (s / self._state_weight).astype(np.float32) for k, s in self._sums.items()}
        n_errors = int(self._counts.sum())
        tau = histogram_quantile(self._counts, float(quantile)) if n_errors else None
        return RouterResult(task=self.task, state=state, threshold=tau, n_clients=self.n_clients,
                            n_samples=self._n_samples, n_errors=n_errors)
