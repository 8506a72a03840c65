"""D-MoLE's zero-cost proxy: accumulated-gradient scores, and a model left exactly as found."""

from __future__ import annotations

import math

import pytest
import torch

from mole.batching import Encoder
from mole.experts import ExpertModel
from mole.modality import modality_map
from mole.proxy import proxy_batch_count, proxy_scores
from tests.conftest import make_samples


def _setup(tiny_model):
    model, tok = tiny_model
    enc = Encoder.for_model(tok, model, 64)
    samples = make_samples(4, 4)
    # Two mixed batches (images and text-only in each).
    batches = [enc.train_batch(samples[0:2] + samples[4:6]), enc.train_batch(samples[2:4] + samples[6:8])]
    return model, batches, list(modality_map(model))


def _snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()}


def test_scores_every_module_and_leaves_the_model_as_found(tiny_model):
    model, batches, modules = _setup(tiny_model)
    # Unusual flags to restore: a non-candidate that requires grad, a candidate that does not.
    model.llava.lm_head.weight.requires_grad_(True)
    for p in model.parameters():
        if p is not model.llava.lm_head.weight:
            p.requires_grad_(False)
    model.train()
    before = _snapshot(model)
    res = proxy_scores(model, batches, modules)
    assert list(res.scores) == modules
    assert all(math.isfinite(s) and s >= 0 for s in res.scores.values())
    assert max(res.scores.values()) > 0
    assert (res.n_batches, res.n_samples) == (2, 8) and res.seconds > 0
    after = _snapshot(model)
    for n, (w, flag, grad) in before.items():
        assert torch.equal(after[n][0], w), n  # bit-identical weights
        assert after[n][1] == flag, n
        assert after[n][2] is None and grad is None, n  # no grads left behind
    assert model.training


def test_accumulated_score_is_the_norm_of_the_summed_gradients(tiny_model):
    model, batches, modules = _setup(tiny_model)
    name = next(m for m in modules if m.endswith("q_proj") and "language_model" in m)  # has a bias
    lin = model.get_submodule(name)
    params = [lin.weight, lin.bias]
    model.eval()
    total = torch.zeros(())
    for b in batches:
        total = total + model(**b.model_inputs(), labels=b.labels)[1]
    grads = torch.autograd.grad(total, params)
    manual = sum(float(g.double().norm()) for g in grads)
    res = proxy_scores(model, batches, [name])
    assert res.scores[name] == pytest.approx(manual, rel=1e-5)
    # Accumulation, not a sum of per-batch norms (opposing gradients cancel).
    per_batch = sum(proxy_scores(model, [b], [name]).scores[name] for b in batches)
    assert res.scores[name] <= per_batch + 1e-9


def test_works_through_lora_wrappers_with_experts_off(tiny_model, tiny_cfg):
    model, batches, modules = _setup(tiny_model)
    plain = proxy_scores(model, batches, modules).scores
    em = ExpertModel(model)
    em.add_expert("t0", modules[::2], tiny_cfg.lora)
    with torch.no_grad():  # a non-zero expert would change the scores if it were left on
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    em.activate(["t0"], trainable="t0")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    wrapped = proxy_scores(em, batches, modules).scores
    assert wrapped == pytest.approx(plain, rel=1e-5)
    assert em.active == ["t0"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with em.only([]):  # a bare MoleModel works too when the caller switched experts off
        assert proxy_scores(model, batches, modules).scores == pytest.approx(plain, rel=1e-5)


def test_bad_inputs_are_clear_errors(tiny_model):
    model, batches, modules = _setup(tiny_model)
    with pytest.raises(ValueError, match="no batches"):
        proxy_scores(model, [], modules)
    with pytest.raises(ValueError, match=r"unknown module 'nope'.*known modules include"):
        proxy_scores(model, batches, ["nope"])
    with pytest.raises(ValueError, match="listed twice"):
        proxy_scores(model, batches, [modules[0], modules[0]])
    bad = batches[1]
    assert bad.pixel_values is not None
    bad.pixel_values[0] = float("nan")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="batch 1"):
        proxy_scores(model, batches, modules)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("n_train", "batch_size", "fraction", "minimum", "want"), [
    (10_000, 8, 0.01, 2, 13),   # 1250 batches → 12.5 → 13
    (100, 8, 0.01, 2, 2),       # the minimum
    (5, 8, 0.01, 2, 1),         # never more than the data holds
    (64, 8, 0.5, 2, 4),
])
def test_batch_count(n_train, batch_size, fraction, minimum, want):
    assert proxy_batch_count(n_train, batch_size, fraction, minimum) == want


def test_batch_count_rejects_bad_values():
    with pytest.raises(ValueError, match="fraction"):
        proxy_batch_count(10, 2, 0.0)
    with pytest.raises(ValueError, match="must be > 0"):
        proxy_batch_count(0, 2)


def test_proxy_samples_are_drawn_without_replacement():
    import numpy as np

    from mole.proxy import proxy_samples
    from protocol.manifest import Sample

    samples = [Sample(id=f"s{i}", task="t", instruction="q", answer="a") for i in range(50)]
    batches = proxy_samples(samples, 8, 0.01, 3, np.random.default_rng(0))
    ids = [s.id for b in batches for s in b]
    assert len(batches) == 3 and len(ids) == 24 and len(set(ids)) == 24
    # a task smaller than the batches asked for: every sample once, the last batch short
    small = proxy_samples(samples[:10], 8, 1.0, 3, np.random.default_rng(0))
    assert [len(b) for b in small] == [8, 2]
