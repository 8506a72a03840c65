"""D-MoLE's router: one autoencoder per task; a sample goes to the task that reconstructs it best.

Features (all experts off, so they do not drift as experts are added) are a list of per-modality
blocks, each L2-normalised, scaled by its weight (default 1: D-MoLE's plain concatenation),
concatenated and L2-normalised again:

    z = norm([ w_v·norm(max_P vision(image)) | norm(h_LM(<sep> | text)) | w_a·norm(max_Q audio(clip)) ])

(D = Σ d_k). The vision block is the max-pool over the P projected patch features (zeros for a
sample without an image), the audio block the same over the Q projected audio frames. The text
block is the LM's last hidden state at the final <sep> of the instruction text *alone* (image
and audio placeholders dropped), as D-MoLE computes instruction features with the language
model on the instruction. Measured on the default stream (mixed test set, 1,800 samples): with
the image in the LM's context the <sep> state is dominated by the picture and tasks that share
one image distribution (count vs caption) get confused — 91.1% routing accuracy; text alone
removes those confusions (93.6% with in-sample thresholds, 97.3% with out-of-fold ones, below).
Mean- or max-pooled instruction states routed worse (84–92%), as an earlier trial of D-MoLE's router found.

Thresholds: τ_k is a quantile (default 0.95) of task k's training reconstruction errors, each
measured **out of fold** (``folds`` = 5: five autoencoders fitted on 4/5 of the training
features score the held-out 1/5; the routing AE is then fitted on all of them). In-sample errors
(``folds`` = 1, D-MoLE's literal reading) are those of samples the AE has memorised: on unseen
samples of the same task the errors are larger, and the measured share of a task's own test
samples above τ_k was 2–14% (arith 14%) at q = 0.95 — every one of them routed to the base
model. Out-of-fold errors are the errors of unseen samples, so τ_k keeps about q of the task's
new samples; measured 0–5% own-task rejection.

Routing, per sample (FedMoLE; D-MoLE votes once per batch):  e_k(z) = mean((AE_k(z) − z)²),
k* = argmin {e_k(z) : e_k(z) < τ_k}, none → None (the base model answers).
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mole.batching import Batch, SampleEncoder
from mole.experts import ExpertModel
from mole.model import MoleModel
from protocol.manifest import Sample

log = logging.getLogger(__name__)
FeatureBlock = Callable[[MoleModel, Batch], torch.Tensor]  # prompt batch → (B, d_k), un-normalised


def vision_block(model: MoleModel, batch: Batch) -> torch.Tensor:
    """(B, d): max over the projected patch features of a row's images (a row with several
    images pools them all); zeros where a row has no image."""
    n_tok = (batch.input_ids == model.image_token_id).sum(dim=1).tolist()  # (B,) placeholders
    out = torch.zeros(batch.input_ids.shape[0], model.hidden_size, device=batch.input_ids.device)
    if batch.pixel_values is not None and batch.pixel_values.shape[0]:
        per_image = model.image_features(batch.pixel_values, batch.extras)  # [(P_i, d)]
        k = 0  # images are in row order; a row's placeholders = the P_i of its images
        for row, want in enumerate(n_tok):
            got: list[torch.Tensor] = []
            while want > 0:
                got.append(per_image[k])
                want -= per_image[k].shape[0]
                k += 1
            if got:
                out[row] = torch.cat(got).amax(dim=0).float()
    return out


def text_only(model: MoleModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, T) → the same prompts without <image>/<audio> placeholders (B, T')."""
    placeholders = list(model.adapter.image_marker_ids)
    if model.audio_token_id is not None:
        placeholders.append(model.audio_token_id)
    keep = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(placeholders,
                                                                        device=input_ids.device))
    lengths = keep.sum(dim=1)  # (B,)
    t = int(lengths.max())
    ids = torch.full((input_ids.shape[0], t), model.pad_token_id, dtype=input_ids.dtype,
                     device=input_ids.device)
    mask = torch.zeros_like(ids)
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        ids[i, t - n:] = input_ids[i][keep[i]]
        mask[i, t - n:] = 1
    return ids, mask


def instruction_block(model: MoleModel, batch: Batch) -> torch.Tensor:
    """(B, d): the LM's last hidden state at the final <sep> of the instruction text alone."""
    ids, mask = text_only(model, batch.input_ids, batch.attention_mask)  # (B, T')
    return model.hidden_states(ids, mask)[:, -1].float()  # (B, d)


def audio_block(model: MoleModel, batch: Batch) -> torch.Tensor:
    """(B, d): max over each clip's Q projected audio features; zeros where a row has no audio."""
    out = torch.zeros(batch.input_ids.shape[0], model.hidden_size, device=batch.input_ids.device)
    if model.audio_token_id is None or batch.input_features is None:
        return out
    has_audio = (batch.input_ids == model.audio_token_id).any(dim=1)  # (B,)
    n = batch.input_features.shape[0]
    if n:
        feats = model.audio_features(batch.input_features)  # (N_a·Q, d)
        out[has_audio] = feats.view(n, -1, feats.shape[-1]).amax(dim=1).float()  # (N_a, d)
    return out


DEFAULT_BLOCKS: tuple[FeatureBlock, ...] = (vision_block, instruction_block, audio_block)


@torch.no_grad()
def feature_blocks(model: MoleModel | ExpertModel, enc: SampleEncoder, samples: Sequence[Sample],
                   batch_size: int, blocks: Sequence[FeatureBlock] = DEFAULT_BLOCKS
                   ) -> list[torch.Tensor]:
    """Raw blocks, each (N, d_k) on the CPU, computed with all experts off.

    An ``ExpertModel`` is switched to the base for the duration; a bare ``MoleModel`` must have
    no active expert (the caller's guarantee).
    """
    if not samples:
        raise ValueError("no samples to compute router features for")
    net = model.model if isinstance(model, ExpertModel) else model
    was_training = net.training
    net.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in blocks]
    try:
        with model.only([]) if isinstance(model, ExpertModel) else nullcontext():
            for i in range(0, len(samples), batch_size):
                b = enc.prompt_batch(samples[i: i + batch_size]).to(net.device)
                if hasattr(enc, "sep_id"):  # the project's layout: prompts end in <sep>
                    assert bool((b.input_ids[:, -1] == enc.sep_id).all()), "prompts must end in <sep>"
                for part, block in zip(parts, blocks, strict=True):
                    part.append(block(net, b).cpu())
    finally:
        net.train(was_training)
    return [torch.cat(p) for p in parts]


def combine_blocks(blocks: Sequence[torch.Tensor], weights: Sequence[float] | None = None
                   ) -> torch.Tensor:
    """[(N, d_k)] → (N, Σ d_k): each block L2-normalised (a zero block stays zero) and scaled by
    its weight (default 1: D-MoLE's plain concatenation), then the whole L2-normalised."""
    w = [1.0] * len(blocks) if weights is None else list(weights)
    if len(w) != len(blocks) or any(x < 0 for x in w):
        raise ValueError(f"need one weight >= 0 per feature block ({len(blocks)}), got {w}")
    scaled = [x * F.normalize(b.float(), dim=1) for x, b in zip(w, blocks, strict=True)]  # (N, d_k)
    return F.normalize(torch.cat(scaled, dim=1), dim=1)


def router_features(model: MoleModel | ExpertModel, enc: SampleEncoder, samples: Sequence[Sample],
                    batch_size: int, blocks: Sequence[FeatureBlock] = DEFAULT_BLOCKS,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """(N, D) routing features, sample order kept; layout follows ``blocks`` (vision | text | audio)."""
    return combine_blocks(feature_blocks(model, enc, samples, batch_size, blocks), weights)


class TaskAutoencoder(nn.Module):
    """D-MoLE's AE (Linear→ReLU→Linear→Sigmoid) with the Sigmoid's (0, 1) stretched to (−1, 1).

    Features are L2-normalised, so coordinates are signed: a plain Sigmoid cannot reconstruct the
    negative half and leaves an error floor that is the same for every task and drowns the
    signal. ``2σ(·) − 1`` keeps D-MoLE's bounded output and covers exactly the range of a unit
    vector's coordinates, so e_k(z) = mean((AE(z) − z)²) compares like with like.
    """

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(hidden, dim), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) → (N, D)
        return 2.0 * self.decoder(self.encoder(z)) - 1.0


def _check_features(features: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if features.ndim != 2 or (dim is not None and features.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"router features must have shape {want}, got {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("router features contain NaN or inf")
    return features.detach().float().cpu()


def reconstruction_error(ae: TaskAutoencoder, features: torch.Tensor) -> torch.Tensor:
    """(N, D) → (N,): e(z) = mean over coordinates of (AE(z) − z)²."""
    z = _check_features(features)
    ae.eval()
    with torch.no_grad():
        return ((ae(z) - z) ** 2).mean(dim=1)


def fit_autoencoder(features: torch.Tensor, hidden: int = 128, epochs: int = 200, lr: float = 1e-3,
                    val_fraction: float = 0.1, patience: int = 20, seed: int = 0,
                    batch_size: int = 64,
                    init: Mapping[str, torch.Tensor | np.ndarray] | None = None) -> TaskAutoencoder:
    """Adam + MSE, early stopping on a held-out ``val_fraction`` (best weights restored).

    Deterministic for a seed: init, split and shuffling use their own seeded RNG (global RNG
    untouched). ``val_fraction=0`` trains all epochs and keeps the last weights.
    ``init`` (a state dict of a ``TaskAutoencoder(D, hidden)``, e.g. the cloud's global AE of a
    federated round) replaces the seeded init, so every client of a round starts from the same
    weights; ``seed`` then only drives the split and the shuffling.
    """
    z = _check_features(features)
    start = None if init is None else check_ae_state(init, z.shape[1], hidden)  # before any work
    n = z.shape[0]
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_val < 1 or epochs < 1 or patience < 1:
        raise ValueError(f"need >= {n_val + 1} features, epochs >= 1 and patience >= 1; got "
                         f"{n} features, epochs={epochs}, patience={patience}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = TaskAutoencoder(z.shape[1], hidden)
    if start is not None:
        ae.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()})
    perm = torch.randperm(n, generator=gen)
    val, train = z[perm[:n_val]], z[perm[n_val:]]
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    best, best_state, bad = float("inf"), {k: v.clone() for k, v in ae.state_dict().items()}, 0
    for _ in range(epochs):
        ae.train()
        for idx in torch.randperm(train.shape[0], generator=gen).split(batch_size):
            loss = F.mse_loss(ae(train[idx]), train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if n_val == 0:
            continue
        v = float(reconstruction_error(ae, val).mean())
        if v < best:
            best, bad = v, 0
            best_state = {k: t.clone() for k, t in ae.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if n_val:
        ae.load_state_dict(best_state)
    return ae.eval()


def init_autoencoder(dim: int, hidden: int, seed: int) -> TaskAutoencoder:
    """The seeded initial AE, bit-identical for the same (dim, hidden, seed) on every client.

    A federated fit needs one common starting point (see ``cloud/routers.py``); the global torch
    RNG is forked, so drawing it does not perturb anyone else's random stream. It is the very
    init ``fit_autoencoder(..., seed=seed)`` starts from.
    """
    for name, v in (("dim", dim), ("hidden", hidden)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"autoencoder `{name}` must be an integer >= 1, got {v!r}")
    if not _is_int(seed):
        raise ValueError(f"autoencoder `seed` must be an integer, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return TaskAutoencoder(int(dim), int(hidden))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def ae_shapes(dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """State-dict key → shape of ``TaskAutoencoder(dim, hidden)`` (nn.Linear weights are (out, in))."""
    return {"encoder.0.weight": (hidden, dim), "encoder.0.bias": (hidden,),
            "decoder.0.weight": (dim, hidden), "decoder.0.bias": (dim,)}


def check_ae_state(state: Mapping[str, np.ndarray | torch.Tensor], dim: int | None = None,
                   hidden: int | None = None) -> dict[str, np.ndarray]:
    """Validated float32 numpy copies of an AE state dict; any flaw is a ValueError naming the key.

    ``dim``/``hidden`` default to those of ``encoder.0.weight`` (shape (hidden, dim)). Checked:
    exactly the keys of :func:`ae_shapes`, numpy arrays or tensors of a float dtype, the expected
    shapes, and finite values after the float32 cast (a float64 1e300 would become inf).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"an autoencoder state must be a mapping of key → array, got {type(state).__name__}")
    if dim is None or hidden is None:
        w = state.get("encoder.0.weight")
        shape = tuple(w.shape) if isinstance(w, np.ndarray | torch.Tensor) else None
        if shape is None or len(shape) != 2:
            raise ValueError("autoencoder state key 'encoder.0.weight' must be a 2-D (hidden, dim) array "
                             f"to infer the sizes from, got {shape if shape is not None else w!r}")
        hidden = shape[0] if hidden is None else hidden
        dim = shape[1] if dim is None else dim
    want = ae_shapes(dim, hidden)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"autoencoder state keys differ from {list(want)}: missing {missing}, "
                         f"unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for key, shape in want.items():
        v = state[key]
        if isinstance(v, torch.Tensor):
            if not v.is_floating_point():
                raise ValueError(f"autoencoder state key {key!r} has dtype {v.dtype}, expected a float dtype")
            arr = v.detach().to("cpu", torch.float32).numpy()
        elif isinstance(v, np.ndarray):
            if not np.issubdtype(v.dtype, np.floating):
                raise ValueError(f"autoencoder state key {key!r} has dtype {v.dtype}, expected a float dtype")
            with np.errstate(over="ignore"):  # an overflow becomes inf, rejected just below
                arr = v.astype(np.float32)
        else:
            raise ValueError(f"autoencoder state key {key!r} must be a numpy array or a tensor, "
                             f"got {type(v).__name__}")
        if arr.shape != shape:
            raise ValueError(f"autoencoder state key {key!r} has shape {arr.shape}, expected {shape} "
                             f"(dim {dim}, hidden {hidden})")
        if not np.isfinite(arr).all():
            raise ValueError(f"autoencoder state key {key!r} contains NaN or inf (after the float32 cast)")
        out[key] = np.array(arr, dtype=np.float32, copy=True)  # never a view of the caller's memory
    return out


def ae_state(ae: TaskAutoencoder) -> dict[str, np.ndarray]:
    """The AE's state dict as float32 numpy copies (what a client sends; keys as ``state_dict``)."""
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in ae.state_dict().items()}


def ae_from_state(state: Mapping[str, np.ndarray | torch.Tensor], dim: int | None = None,
                  hidden: int | None = None) -> TaskAutoencoder:
    """Inverse of :func:`ae_state`; sizes inferred from ``encoder.0.weight`` (hidden, dim) unless given.

    Validated by :func:`check_ae_state`; building the module forks the global RNG, so loading a
    state does not consume anyone's random numbers.
    """
    arrays = check_ae_state(state, dim, hidden)
    h, d = arrays["encoder.0.weight"].shape
    with torch.random.fork_rng(devices=[]):
        ae = TaskAutoencoder(d, h)
    ae.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    return ae.eval()


# Reconstruction-error histograms over fixed, shared bins: clients send counts, never errors. The
# bins are log-spaced because errors span decades (≈1e-5 for a task's own samples, ≈1e-1 for a
# far-away task's); 512 bins over [1e-8, 10] give a constant relative width of 10^(9/512) ≈ 4.1%.
# Errors are means of squared differences of vectors in [−1, 1], so they are at most 4 < 10.
N_ERROR_BINS = 512
ERROR_BIN_EDGES: np.ndarray = 10.0 ** np.linspace(-8.0, 1.0, N_ERROR_BINS + 1)  # (513,) float64
ERROR_BIN_EDGES.setflags(write=False)  # shared by every party: must never change in place


def error_histogram(errors: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N,) reconstruction errors → (512,) int64 counts over :data:`ERROR_BIN_EDGES`.

    Bin i is [edge_i, edge_{i+1}); errors below the first edge count in bin 0, errors at or above
    the last in bin 511 (clipped, so no error is ever dropped). Counting is per element, so the
    histogram of a union of disjoint sets is exactly the sum of their histograms.
    """
    if isinstance(errors, torch.Tensor):
        arr = errors.detach().to("cpu", torch.float64).numpy()
    elif isinstance(errors, np.ndarray) and np.issubdtype(errors.dtype, np.number):
        arr = errors.astype(np.float64)
    else:
        raise ValueError(f"errors must be a numeric numpy array or a tensor, got {type(errors).__name__}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"errors must be a non-empty 1-D array, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"errors must be finite and >= 0; {int(bad.sum())} are not, "
                         f"e.g. errors[{i}] = {arr[i]}")
    idx = np.clip(np.searchsorted(ERROR_BIN_EDGES, arr, side="right") - 1, 0, N_ERROR_BINS - 1)  # (N,)
    return np.bincount(idx, minlength=N_ERROR_BINS).astype(np.int64)


def check_error_histogram(counts: np.ndarray) -> np.ndarray:
    """An int64 copy of ``counts`` if it is a histogram :func:`error_histogram` could have made."""
    if not isinstance(counts, np.ndarray):
        raise ValueError(f"an error histogram must be a numpy array, got {type(counts).__name__}")
    if counts.shape != (N_ERROR_BINS,):
        raise ValueError(f"an error histogram must have shape ({N_ERROR_BINS},) (the bins of "
                         f"ERROR_BIN_EDGES), got {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"error histogram counts must have an integer dtype, got {counts.dtype}")
    if (counts < 0).any():
        i = int(np.flatnonzero(counts < 0)[0])
        raise ValueError(f"error histogram counts must be >= 0, got counts[{i}] = {counts[i]}")
    if counts.sum() <= 0:
        raise ValueError("error histogram is empty (all counts are 0)")
    return counts.astype(np.int64)


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """The q-quantile of the errors that ``counts`` describes, exact up to one bin's width.

    Target rank r = q·Σcounts; the bin where the running count reaches r holds the quantile, and
    inside it the count is taken as uniform in log(error) (the bins are log-spaced), so the value
    is the geometric interpolation lo·(hi/lo)^f, f = the fraction of the bin's count needed to
    reach r. q = 1 gives the upper edge of the highest non-empty bin.
    """
    c = check_error_histogram(counts)
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q <= 1:
        raise ValueError(f"histogram quantile q must be in (0, 1], got {q!r}")
    cum = np.cumsum(c)  # (512,)
    target = float(q) * float(cum[-1])
    i = int(np.searchsorted(cum, target, side="left"))  # first bin with cum >= target; counts[i] > 0
    i = min(i, N_ERROR_BINS - 1)  # guards against float rounding of q·total at q = 1
    below = float(cum[i - 1]) if i else 0.0
    frac = min(max((target - below) / float(c[i]), 0.0), 1.0)
    lo, hi = np.log10(ERROR_BIN_EDGES[i]), np.log10(ERROR_BIN_EDGES[i + 1])
    return float(10.0 ** (lo + frac * (hi - lo)))


def threshold(errors: torch.Tensor, quantile: float) -> float:
    """τ = the ``quantile`` of a task's training reconstruction errors (linear interpolation)."""
    if not 0 < quantile <= 1:
        raise ValueError(f"router quantile must be in (0, 1], got {quantile}")
    if errors.ndim != 1 or errors.numel() == 0 or not bool(torch.isfinite(errors).all()):
        raise ValueError(f"errors must be a non-empty finite 1-D tensor, got shape {tuple(errors.shape)}")
    return float(torch.quantile(errors.double(), quantile))


def out_of_fold_errors(features: torch.Tensor, folds: int, hidden: int = 128, seed: int = 0,
                       **fit: Any) -> torch.Tensor:
    """(N, D) → (N,): each sample's error under an AE fitted without it (``folds``-fold split)."""
    z = _check_features(features)
    n = z.shape[0]
    if folds < 2 or n < 2 * folds:
        raise ValueError(f"out-of-fold errors need folds >= 2 and >= {2 * folds} samples, got "
                         f"folds={folds} and {n} samples; use folds=1 for in-sample errors")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    errors = torch.empty(n)
    for f in range(folds):
        held = perm[f::folds]
        rest = torch.ones(n, dtype=torch.bool)
        rest[held] = False
        ae = fit_autoencoder(z[rest], hidden=hidden, seed=seed + 1 + f, **fit)
        errors[held] = reconstruction_error(ae, z[held])
    return errors


@dataclass
class RouteEntry:
    autoencoder: TaskAutoencoder
    threshold: float  # τ_k
    quantile: float  # the quantile τ_k was taken at


ROUTER_JSON, ROUTER_WEIGHTS = "router.json", "router.safetensors"


@dataclass
class TaskRouter:
    """Ordered task → (autoencoder, τ); ties in error go to the earlier task."""

    hidden: int = 128
    quantile: float = 0.95
    # τ from out-of-fold errors over this many folds; 1 → in-sample errors of the routing AE.
    folds: int = 5
    feature_dim: int | None = None  # fixed by the first task
    tasks: dict[str, RouteEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"router hidden size must be >= 1, got {self.hidden}")
        if self.folds < 1:
            raise ValueError(f"router threshold folds must be >= 1, got {self.folds}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"router quantile must be in (0, 1], got {self.quantile}")

    def add_task(self, task: str, features: torch.Tensor, quantile: float | None = None,
                 **fit: Any) -> RouteEntry:
        """Fit task's AE on all its (N, D) training features; τ from their (out-of-fold) errors."""
        q = self.quantile if quantile is None else quantile
        if not 0 < q <= 1:  # checked before the fit, not after it
            raise ValueError(f"router quantile must be in (0, 1], got {q}")
        z = _check_features(features, self.feature_dim)
        ae = fit_autoencoder(z, hidden=self.hidden, **fit)
        # Fewer than 2 samples a fold (a task of a few records): in-sample errors, said so.
        folds = self.folds if z.shape[0] >= 2 * self.folds else 1
        if folds != self.folds:
            log.warning("task %r has %d router samples, too few for %d-fold thresholds: its "
                        "threshold comes from in-sample errors (routes more samples to it)",
                        task, z.shape[0], self.folds)
        errors = (reconstruction_error(ae, z) if folds == 1
                  else out_of_fold_errors(z, folds, self.hidden, **fit))
        return self.put(task, ae, threshold(errors, q), q)

    def put(self, task: str, ae: TaskAutoencoder, tau: float, quantile: float) -> RouteEntry:
        """Install an already-fitted AE (e.g. one the cloud aggregated from clients)."""
        if task in self.tasks:
            raise ValueError(f"router already has task {task!r}; tasks: {list(self.tasks)}")
        first: nn.Linear = ae.encoder[0]  # type: ignore[assignment]
        dim, hidden = first.in_features, first.out_features
        if (self.feature_dim is not None and dim != self.feature_dim) or hidden != self.hidden:
            raise ValueError(f"autoencoder for {task!r} is {dim}→{hidden}; the router expects "
                             f"{self.feature_dim}→{self.hidden}")
        self.feature_dim = dim
        self.tasks[task] = RouteEntry(ae.eval(), float(tau), float(quantile))
        return self.tasks[task]

    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N, n_tasks) reconstruction errors, columns in task order."""
        z = _check_features(features, self.feature_dim)
        cols = [reconstruction_error(e.autoencoder, z) for e in self.tasks.values()]
        return torch.stack(cols, dim=1) if cols else torch.zeros(z.shape[0], 0)

    def route(self, features: torch.Tensor) -> list[str | None]:
        """Per sample: the lowest-error task among those under their τ; None if no task claims it."""
        err = self.errors(features)  # (N, K)
        if err.shape[1] == 0:
            return [None] * err.shape[0]
        taus = torch.tensor([e.threshold for e in self.tasks.values()], dtype=err.dtype)
        masked = torch.where(err < taus, err, torch.full_like(err, float("inf")))
        best = masked.argmin(dim=1)  # first minimum → earlier task on ties
        names = list(self.tasks)
        return [names[int(k)] if torch.isfinite(masked[i, k]) else None for i, k in enumerate(best)]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        weights = {f"{t}/{k}": v.detach().contiguous().cpu()
                   for t, e in self.tasks.items() for k, v in e.autoencoder.state_dict().items()}
        save_file(weights, str(folder / ROUTER_WEIGHTS), metadata={"format": "fedmole-router"})
        meta = {"format": "fedmole-router", "version": 1, "feature_dim": self.feature_dim,
                "hidden": self.hidden, "quantile": self.quantile, "folds": self.folds,
                "tasks": [{"name": t, "threshold": e.threshold, "quantile": e.quantile}
                          for t, e in self.tasks.items()]}
        (folder / ROUTER_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TaskRouter:
        """Inverse of ``save``; any missing, malformed or inconsistent piece is a ValueError."""
        meta_path, w_path = folder / ROUTER_JSON, folder / ROUTER_WEIGHTS
        for p in (meta_path, w_path):
            if not p.is_file():
                raise ValueError(f"router file {str(p)!r} is missing; save the router with TaskRouter.save")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(meta_path)!r} is not valid JSON: {e}") from e
        try:
            weights = load_file(str(w_path))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise ValueError(f"router weights {str(w_path)!r} are unreadable: {e}") from e
        router = cls(hidden=_num(meta, "hidden", int, meta_path),
                     quantile=_num(meta, "quantile", float, meta_path),
                     folds=(_num(meta, "folds", int, meta_path)
                            if isinstance(meta, dict) and "folds" in meta else 1))
        dim = meta.get("feature_dim") if isinstance(meta, dict) else None
        tasks = meta.get("tasks") if isinstance(meta, dict) else None
        if not isinstance(tasks, list) or (tasks and not isinstance(dim, int)):
            raise ValueError(f"{str(meta_path)!r}: fields `tasks` (a list) and `feature_dim` (an int) "
                             "are required")
        expected: set[str] = set()
        for i, rec in enumerate(tasks):
            name = rec.get("name") if isinstance(rec, dict) else None
            if not isinstance(name, str) or not name or name in router.tasks:
                raise ValueError(f"{str(meta_path)!r}: `tasks[{i}].name` must be a new non-empty string, "
                                 f"got {name!r}")
            ae = TaskAutoencoder(int(dim), router.hidden)  # type: ignore[arg-type]
            state = {}
            for key, ref in ae.state_dict().items():
                full = f"{name}/{key}"
                if full not in weights:
                    raise ValueError(f"{str(w_path)!r} lacks weights for task {name!r} (key {full!r})")
                if weights[full].shape != ref.shape:
                    raise ValueError(f"{str(w_path)!r}: {full!r} has shape {tuple(weights[full].shape)}, "
                                     f"expected {tuple(ref.shape)} (feature_dim {dim}, "
                                     f"hidden {router.hidden})")
                state[key] = weights[full]
                expected.add(full)
            ae.load_state_dict(state)
            router.put(name, ae, _num(rec, "threshold", float, meta_path, f"tasks[{i}]."),
                       _num(rec, "quantile", float, meta_path, f"tasks[{i}]."))
        extra = sorted(set(weights) - expected)
        if extra:
            raise ValueError(f"{str(w_path)!r} has weights for no task in {ROUTER_JSON}: {extra[:5]}")
        return router


def _num(d: Any, key: str, kind: type, path: Path, prefix: str = "") -> Any:
    """A finite number field of router.json, or a ValueError naming the file and field."""
    v = d.get(key) if isinstance(d, dict) else None
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
    if not ok or (kind is int and not isinstance(v, int)):
        raise ValueError(f"{str(path)!r}: field `{prefix}{key}` must be a finite {kind.__name__}, got {v!r}")
    return kind(v)


def routing_accuracy(pred: Sequence[str | None], truth: Sequence[str | None]) -> float:
    """Percent of samples routed to their own task (None counts as a task: "base model")."""
    if len(pred) != len(truth) or not truth:
        raise ValueError(f"need equal, non-empty prediction and truth lists, "
                         f"got {len(pred)} and {len(truth)}")
    return 100.0 * sum(p == t for p, t in zip(pred, truth, strict=True)) / len(truth)
