"""Per-task autoencoder router: thresholds, per-sample routing, persistence, and its features."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mole.batching import Encoder
from mole.experts import ExpertModel
from mole.modality import modality_map
from mole.router import (
    TaskRouter,
    feature_blocks,
    fit_autoencoder,
    reconstruction_error,
    router_features,
    routing_accuracy,
    threshold,
)
from protocol.manifest import Sample
from tests.conftest import make_samples

D = 48
TASKS = ["color", "arith", "count"]


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n samples per task around 3 fixed random unit centres (+ noise), shuffled together."""
    centres = F.normalize(torch.randn(3, D, generator=torch.Generator().manual_seed(123)), dim=1)
    g = torch.Generator().manual_seed(seed)
    z = centres.repeat_interleave(n, 0) + 0.05 * torch.randn(3 * n, D, generator=g)
    truth = [t for t in TASKS for _ in range(n)]
    perm = torch.randperm(3 * n, generator=g)
    return F.normalize(z, dim=1)[perm], [truth[i] for i in perm]


@pytest.fixture(scope="module")
def router() -> TaskRouter:
    z, truth = _clusters(150, seed=0)
    # τ at the 99th percentile: at 0.95 about 5–10% of fresh in-distribution samples are (by
    # design) flagged as novel, which is what the default trades for catching unknown inputs.
    r = TaskRouter(hidden=16, quantile=0.99, folds=1)
    for t in TASKS:
        r.add_task(t, z[[i for i, x in enumerate(truth) if x == t]], epochs=100, batch_size=512, seed=0)
    return r


def test_threshold_is_the_quantile():
    errors = torch.arange(1, 101, dtype=torch.float32)  # 1..100
    assert threshold(errors, 0.95) == pytest.approx(95.05)  # linear: 95 + 0.05·(96 − 95)
    assert threshold(errors, 1.0) == 100.0
    assert threshold(torch.tensor([0.3]), 0.5) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="quantile"):
        threshold(errors, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        threshold(torch.tensor([]), 0.9)


def test_routes_a_mixed_batch_per_sample_and_flags_the_unknown(router):
    z, truth = _clusters(50, seed=1)  # fresh samples, tasks interleaved in one batch
    assert routing_accuracy(router.route(z), truth) >= 95.0
    err = router.errors(z)
    assert err.shape == (150, 3)
    assert routing_accuracy([TASKS[int(k)] for k in err.argmin(dim=1)], truth) >= 98.0
    ood = F.normalize(torch.randn(5, D, generator=torch.Generator().manual_seed(9)), dim=1)
    assert router.route(ood) == [None] * 5
    assert all(e.quantile == 0.99 and e.threshold > 0 for e in router.tasks.values())


def test_threshold_quantile_bounds_the_training_samples_flagged():
    z, truth = _clusters(100, seed=6)
    own = z[[i for i, x in enumerate(truth) if x == "arith"]]
    r = TaskRouter(hidden=8, folds=1)
    entry = r.add_task("arith", own, quantile=0.8, epochs=30, batch_size=512)
    flagged = (r.errors(own)[:, 0] >= entry.threshold).float().mean()
    assert entry.quantile == 0.8 and 0.15 <= float(flagged) <= 0.21  # ≈ 1 − q of its own samples


def test_out_of_fold_threshold_keeps_about_q_of_unseen_samples():
    """In-sample errors are those of memorised samples: τ from them rejects more than 1 − q of
    fresh samples. Out-of-fold errors are unseen-sample errors: τ keeps about q of them."""
    d, n = 64, 200
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(8, d, generator=g)  # the task lives near an 8-dim subspace, + noise

    def draw(m: int) -> torch.Tensor:
        noise = 0.3 * torch.randn(m, d, generator=g)
        return F.normalize(torch.randn(m, 8, generator=g) @ basis + noise, dim=1)

    train, fresh = draw(n), draw(2000)
    fit = {"epochs": 300, "patience": 300, "val_fraction": 0.0, "seed": 0}  # overfits on purpose
    rejected = {}
    for folds in (1, 5):
        r = TaskRouter(hidden=64, quantile=0.9, folds=folds)
        entry = r.add_task("t", train, **fit)
        rejected[folds] = float((r.errors(fresh)[:, 0] >= entry.threshold).float().mean())
    assert rejected[1] > 0.2  # in-sample τ: far more than 1 − q = 10% of fresh samples flagged
    assert rejected[5] < rejected[1] and rejected[5] <= 0.15
    with pytest.raises(ValueError, match="folds"):
        TaskRouter(folds=0)


def test_fit_is_deterministic_and_keeps_the_best_weights():
    z, _ = _clusters(40, seed=2)
    a, b = fit_autoencoder(z, hidden=8, epochs=20, seed=3), fit_autoencoder(z, hidden=8, epochs=20, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))
    c = fit_autoencoder(z, hidden=8, epochs=5, seed=4)
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)
    untrained = fit_autoencoder(z, hidden=8, epochs=1, seed=3)
    assert reconstruction_error(a, z).mean() < reconstruction_error(untrained, z).mean()
    with pytest.raises(ValueError, match="shape"):
        fit_autoencoder(torch.zeros(5))


def test_save_load_round_trip(router, tmp_path):
    router.save(tmp_path)
    meta = json.loads((tmp_path / "router.json").read_text())
    assert [t["name"] for t in meta["tasks"]] == TASKS and meta["feature_dim"] == D
    again = TaskRouter.load(tmp_path)
    z, _ = _clusters(30, seed=5)
    assert again.route(z) == router.route(z)
    assert torch.equal(again.errors(z), router.errors(z))
    assert [e.threshold for e in again.tasks.values()] == [e.threshold for e in router.tasks.values()]


def _broken(router, tmp_path, name):
    folder = tmp_path / name
    router.save(folder)
    return folder, json.loads((folder / "router.json").read_text())


def test_corrupt_or_missing_files_are_rejected(router, tmp_path):
    f, _ = _broken(router, tmp_path, "nojson")
    (f / "router.json").unlink()
    with pytest.raises(ValueError, match=r"router\.json.*missing"):
        TaskRouter.load(f)
    f, _ = _broken(router, tmp_path, "badjson")
    (f / "router.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TaskRouter.load(f)
    f, _ = _broken(router, tmp_path, "badweights")
    (f / "router.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(ValueError, match="unreadable"):
        TaskRouter.load(f)
    f, _ = _broken(router, tmp_path, "lacks")
    w = load_file(str(f / "router.safetensors"))
    del w["arith/decoder.0.bias"]
    save_file(w, str(f / "router.safetensors"))
    with pytest.raises(ValueError, match=r"lacks weights for task 'arith'.*decoder\.0\.bias"):
        TaskRouter.load(f)
    f, meta = _broken(router, tmp_path, "shape")
    meta["feature_dim"] = D + 1
    (f / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'color/encoder\.0\.weight' has shape"):
        TaskRouter.load(f)
    f, meta = _broken(router, tmp_path, "tau")
    meta["tasks"][1]["threshold"] = "high"
    (f / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"`tasks\[1\]\.threshold`"):
        TaskRouter.load(f)


def test_routing_accuracy_and_empty_router():
    assert routing_accuracy(["a", None, "b", "b"], ["a", "a", "b", None]) == 50.0
    with pytest.raises(ValueError, match="equal"):
        routing_accuracy(["a"], ["a", "b"])
    assert TaskRouter().route(torch.zeros(2, 4)) == [None, None]
    r = TaskRouter(hidden=4)
    r.add_task("a", torch.rand(10, 6), epochs=2)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        r.route(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="already has task"):
        r.add_task("a", torch.rand(10, 6), epochs=2)


def test_router_features(tiny_model, tiny_cfg):
    model, tok = tiny_model
    enc = Encoder.for_model(tok, model, 64)
    # rows 0-2 images, 3 text, 4 text (another instruction), 5-6 audio (c, e)
    samples = make_samples(3, 1) + [Sample(id="t2", task="count", instruction="how many 1 2 3",
                                           answer="3", image=None)] + make_samples(0, 0, 2)
    d = model.hidden_size
    vis, txt, aud = feature_blocks(model, enc, samples, batch_size=2)
    assert vis.shape == txt.shape == aud.shape == (7, d)
    assert torch.count_nonzero(vis[3:]) == 0 and bool((vis[:3].norm(dim=1) > 0).all())
    assert torch.count_nonzero(aud[:5]) == 0 and bool((aud[5:].norm(dim=1) > 0).all())
    z = router_features(model, enc, samples, batch_size=2)
    assert z.shape == (7, 3 * d)
    assert torch.allclose(z.norm(dim=1), torch.ones(7))
    assert torch.count_nonzero(z[3:, :d]) == 0  # no image: vision block stays zero
    assert torch.count_nonzero(z[:5, 2 * d:]) == 0  # no audio: audio block stays zero
    assert not torch.allclose(z[3], z[4])  # two instructions, two features
    assert not torch.allclose(z[0], z[1])  # red vs green image
    assert not torch.allclose(z[5, 2 * d:], z[6, 2 * d:])  # two pitches, two audio blocks
    half = router_features(model, enc, samples, batch_size=2, weights=[0.5, 1.0, 0.25])
    assert torch.allclose(half[:3, :d].norm(dim=1) / half[:3, d:2 * d].norm(dim=1), torch.full((3,), 0.5))
    assert torch.allclose(half[5:, 2 * d:].norm(dim=1) / half[5:, d:2 * d].norm(dim=1),
                          torch.full((2,), 0.25))
    with pytest.raises(ValueError, match="one weight"):
        router_features(model, enc, samples, batch_size=2, weights=[1.0])
    # Padding does not leak in: batch size does not change a sample's features.
    assert torch.allclose(router_features(model, enc, samples, batch_size=7), z, atol=1e-5)
    # Experts are switched off: an active, non-zero expert leaves the features unchanged.
    em = ExpertModel(model)
    em.add_expert("t0", list(modality_map(model)), tiny_cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    em.activate(["t0"])
    assert torch.allclose(router_features(em, enc, samples, batch_size=2), z, atol=1e-5)
    assert em.active == ["t0"]
