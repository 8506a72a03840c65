"""D-MoLE's zero-cost proxy: which modules does a new task need? (run before training it)

On the pretrained base (no experts), the LM loss of a few of the task's batches is
back-propagated into the base weights of the candidate modules, *accumulating* across batches:

    s_t(m) = Σ_{p ∈ params(m)} ‖ Σ_b ∇_p L(b) ‖₂        (weight, plus bias if any)

A module whose weights the task pulls hard (and consistently across batches: opposing gradients
cancel in the sum) gets a high score; the allocator gives LoRA experts to the top-scoring ones.
Only the candidates' weights get gradients — nothing else is differentiated, so the cost is one
forward/backward per batch (D-MoLE: ≈1.5% of training time).

In FedMoLE each client runs this on its own few batches and uploads the score vector and sample
count; the cloud takes the sample-weighted mean (cloud side, not here).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mole.batching import Batch
from mole.experts import ExpertModel
from mole.model import MoleModel
from protocol.manifest import Sample


@dataclass(frozen=True)
class ProxyResult:
    scores: dict[str, float]  # module name → s_t(m), in the order the modules were given
    n_samples: int  # the weight of this client's vector in the cloud's mean
    n_batches: int
    seconds: float


def proxy_batch_count(n_train: int, batch_size: int, fraction: float = 0.01, minimum: int = 2) -> int:
    """How many batches the proxy sees: ``fraction`` of an epoch, at least ``minimum``, at most all."""
    if n_train <= 0 or batch_size <= 0:
        raise ValueError(f"n_train and batch_size must be > 0, got {n_train} and {batch_size}")
    if not 0 < fraction <= 1:
        raise ValueError(f"proxy fraction must be in (0, 1], got {fraction}")
    if minimum < 1:
        raise ValueError(f"proxy minimum batch count must be >= 1, got {minimum}")
    n_batches = math.ceil(n_train / batch_size)
    return min(n_batches, max(minimum, math.ceil(fraction * n_batches)))


def proxy_samples(samples: Sequence[Sample], batch_size: int, fraction: float, minimum: int,
                  rng: np.random.Generator) -> list[list[Sample]]:
    """The proxy's batches of a task: ``proxy_batch_count`` batches drawn without replacement
    (one shuffled pass, as an epoch's first batches would be) — the centralized learner and
    every federated client take the same rule, so their scores are comparable."""
    n_b = proxy_batch_count(len(samples), batch_size, fraction, minimum)
    order = rng.permutation(len(samples))
    return [[samples[int(i)] for i in order[k * batch_size:(k + 1) * batch_size]]
            for k in range(n_b) if order[k * batch_size:(k + 1) * batch_size].size]


def _wrapped_names(model: nn.Module) -> list[str]:
    """Names a caller may pass: PEFT-wrapped modules, and plain Linears not inside a wrapper."""
    out = []
    for name, mod in model.named_modules():
        if ".base_layer" in name or "lora_" in name:
            continue
        if hasattr(mod, "base_layer") or isinstance(mod, nn.Linear):
            out.append(name)
    return out


def module_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The base weight (and bias) of module ``name``; a PEFT LoRA wrapper resolves to its base."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        known = _wrapped_names(model)
        raise ValueError(
            f"unknown module {name!r}; known modules include {known[:5]} ({len(known)} in all); "
            "pass names from mole.modality.modality_map(model)"
        ) from None
    base = getattr(mod, "base_layer", mod)  # PEFT LoraLayer → the original nn.Linear
    params = [p for _, p in base.named_parameters(recurse=False)]
    if not params:
        raise ValueError(f"module {name!r} ({type(base).__name__}) has no weight of its own")
    return params


@contextmanager
def _only_grads_on(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily: only ``params`` require grad, no stale grads; afterwards everything as found."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_grads = [(p, p.grad) for p in params]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        model.eval()  # no dropout: the proxy is a deterministic function of weights and data
        yield
    finally:
        for p, grad in saved_grads:
            p.grad = grad
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def proxy_scores(model: MoleModel | ExpertModel, batches: Iterable[Batch],
                 modules: Sequence[str]) -> ProxyResult:
    """Score every module in ``modules`` by the accumulated-gradient norm of its base weights.

    Given an ``ExpertModel`` the experts are switched off for the duration (``only([])``); given a
    bare ``MoleModel`` the caller guarantees no expert is active (the proxy is defined on the
    base). Batches need labels. The model is left exactly as found: weights untouched, flags,
    grads and train/eval mode restored.
    """
    em = model if isinstance(model, ExpertModel) else None
    net = model.model if isinstance(model, ExpertModel) else model
    if not modules:
        raise ValueError("no candidate modules to score")
    dupes = sorted(m for m, c in Counter(modules).items() if c > 1)
    if dupes:
        raise ValueError(f"candidate modules listed twice: {dupes}")
    params = {m: module_parameters(net, m) for m in modules}
    flat = [p for ps in params.values() for p in ps]
    t0 = time.perf_counter()
    n_samples = n_batches = 0
    ctx = em.only([]) if em is not None else nullcontext()
    with ctx, _only_grads_on(net, flat), torch.enable_grad():
        for i, batch in enumerate(batches):
            if batch.labels is None:
                raise ValueError(f"proxy batch {i} has no labels; use Encoder.train_batch")
            b = batch.to(net.device)
            _, loss = net(**b.model_inputs(), labels=b.labels)
            assert loss is not None
            if not torch.isfinite(loss):
                raise FloatingPointError(f"proxy loss is {loss.item()} on batch {i}; "
                                         "check that batch's data and the base checkpoint")
            loss.backward()  # grads accumulate: no zero_grad between batches
            n_batches += 1
            n_samples += int(b.input_ids.shape[0])
        if n_batches == 0:
            raise ValueError("the proxy got no batches; give it at least one labelled batch")
        scores = {
            m: float(sum(torch.linalg.vector_norm(p.grad.double()) for p in ps if p.grad is not None))
            for m, ps in params.items()
        }
    return ProxyResult(scores, n_samples, n_batches, time.perf_counter() - t0)
