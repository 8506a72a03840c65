"""Federated router fit: shared init, AE state round trip, error histograms, cloud aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cloud.routers import RouterAccumulator, RouterResult, RouterUpdateError
from mole.router import (
    ERROR_BIN_EDGES,
    N_ERROR_BINS,
    TaskAutoencoder,
    ae_from_state,
    ae_shapes,
    ae_state,
    error_histogram,
    fit_autoencoder,
    histogram_quantile,
    init_autoencoder,
    reconstruction_error,
    threshold,
)

D, H = 16, 8
BIN_RATIO = 10 ** (9 / 512)  # one bin's relative width


def _same(a: TaskAutoencoder, b: TaskAutoencoder) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))


# ---------------------------------------------------------------------------------------------
# shared init, fit from a given state, state round trip


def test_init_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = init_autoencoder(D, H, seed=7), init_autoencoder(D, H, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert _same(a, b)
    assert not _same(a, init_autoencoder(D, H, seed=8))
    assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == ae_shapes(D, H)
    for bad in ({"dim": 0, "hidden": H, "seed": 0}, {"dim": D, "hidden": 2.5, "seed": 0},
                {"dim": D, "hidden": H, "seed": "x"}):
        with pytest.raises(ValueError, match=next(k for k, v in bad.items() if v in (0, 2.5, "x"))):
            init_autoencoder(**bad)


def test_fit_starts_from_the_given_init():
    z = F.normalize(torch.randn(50, D, generator=torch.Generator().manual_seed(0)), dim=1)
    start = init_autoencoder(D, H, seed=5)
    frozen = fit_autoencoder(z, hidden=H, epochs=1, lr=0.0, val_fraction=0.0, seed=0,
                             init=ae_state(start))
    assert _same(frozen, start)  # lr 0: still exactly the given weights, not the seed-0 init
    # the seeded init of fit_autoencoder is init_autoencoder's: init=... with the same seed is a no-op
    plain = fit_autoencoder(z, hidden=H, epochs=3, val_fraction=0.0, seed=5)
    given = fit_autoencoder(z, hidden=H, epochs=3, val_fraction=0.0, seed=5,
                            init=start.state_dict())
    assert _same(plain, given)
    bad = ae_state(start)
    bad["decoder.0.bias"] = np.zeros(D + 1, dtype=np.float32)
    with pytest.raises(ValueError, match=r"decoder\.0\.bias.*\(17,\).*\(16,\)"):
        fit_autoencoder(z, hidden=H, epochs=1, init=bad)
    with pytest.raises(ValueError, match=r"encoder\.0\.weight.*\(8, 16\).*\(4, 16\)"):
        fit_autoencoder(z, hidden=4, epochs=1, init=ae_state(start))


def test_state_round_trip_is_exact():
    ae = fit_autoencoder(F.normalize(torch.randn(40, D), dim=1), hidden=H, epochs=2, seed=1)
    state = ae_state(ae)
    assert list(state) == ["encoder.0.weight", "encoder.0.bias", "decoder.0.weight", "decoder.0.bias"]
    assert all(v.dtype == np.float32 for v in state.values())
    again = ae_from_state(state)  # sizes inferred from encoder.0.weight
    assert _same(ae, again)
    assert _same(ae, ae_from_state(ae.state_dict(), dim=D, hidden=H))
    state["encoder.0.bias"][0] = 99.0  # a copy: the module is not touched
    assert float(ae.encoder[0].bias[0].detach()) != 99.0


def _malformed() -> list[tuple[str, dict, str]]:
    good = ae_state(init_autoencoder(D, H, seed=0))
    cases = []

    def case(name: str, key: str, value, match: str) -> None:
        s = dict(good)
        if value is None:
            del s[key]
        else:
            s[key] = value
        cases.append((name, s, match))

    case("missing", "decoder.0.bias", None, r"missing \['decoder\.0\.bias'\]")
    case("extra", "decoder.1.weight", np.zeros(3, np.float32), r"unexpected \['decoder\.1\.weight'\]")
    case("shape", "decoder.0.weight", np.zeros((D, H + 1), np.float32), r"'decoder\.0\.weight'.*\(16, 9\)")
    case("nan", "encoder.0.bias", np.full(H, np.nan, np.float32), r"'encoder\.0\.bias'.*NaN")
    case("inf", "decoder.0.bias", np.full(D, 1e300), r"'decoder\.0\.bias'.*inf")
    case("int", "encoder.0.bias", np.zeros(H, np.int64), r"'encoder\.0\.bias'.*dtype int64")
    case("list", "encoder.0.bias", [0.0] * H, r"'encoder\.0\.bias'.*numpy array")
    case("1-D weight", "encoder.0.weight", np.zeros(D, np.float32), r"'encoder\.0\.weight'.*2-D")
    return cases


@pytest.mark.parametrize(("state", "match"), [pytest.param(s, m, id=n) for n, s, m in _malformed()])
def test_malformed_states_are_rejected_naming_the_key(state, match):
    with pytest.raises(ValueError, match=match):
        ae_from_state(state)


# ---------------------------------------------------------------------------------------------
# error histograms over the shared bins


def _lognormal(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mean=np.log(1e-3), sigma=1.0, size=n)  # (n,)


def test_histogram_quantile_is_within_one_bin_of_the_exact_quantile():
    assert ERROR_BIN_EDGES.shape == (N_ERROR_BINS + 1,) and ERROR_BIN_EDGES.dtype == np.float64
    assert ERROR_BIN_EDGES[0] == pytest.approx(1e-8) and ERROR_BIN_EDGES[-1] == pytest.approx(10.0)
    errors = torch.from_numpy(_lognormal(2000, seed=0))
    counts = error_histogram(errors)
    assert counts.dtype == np.int64 and counts.shape == (N_ERROR_BINS,) and counts.sum() == 2000
    for q in (0.5, 0.9, 0.95, 0.99):
        est, exact = histogram_quantile(counts, q), threshold(errors, q)
        assert max(est / exact, exact / est) <= BIN_RATIO, q
    top = histogram_quantile(counts, 1.0)  # the upper edge of the max's bin
    assert float(errors.max()) <= top <= float(errors.max()) * BIN_RATIO


def test_histograms_of_disjoint_clients_add_up_to_the_pooled_one():
    errors = _lognormal(2000, seed=1)
    parts = np.split(np.random.default_rng(2).permutation(errors), [150, 800])  # 3 uneven clients
    summed = sum(error_histogram(p) for p in parts)
    np.testing.assert_array_equal(summed, error_histogram(errors))
    for q in (0.5, 0.95):
        assert histogram_quantile(summed, q) == histogram_quantile(error_histogram(errors), q)


def test_out_of_range_errors_are_clipped_and_bad_errors_rejected():
    counts = error_histogram(np.array([0.0, 1e-12, 9.9, 1e6]))
    assert counts[0] == 2 and counts[-1] == 2 and counts.sum() == 4
    for bad, match in ((np.array([0.1, np.nan]), r"errors\[1\] = nan"), (np.array([-1e-3]), ">= 0"),
                       (np.zeros((2, 2)), "1-D"), (np.array([]), "non-empty"), ([0.1], "numpy")):
        with pytest.raises(ValueError, match=match):
            error_histogram(bad)


def test_bad_counts_and_quantiles_are_rejected():
    good = error_histogram(_lognormal(100, seed=3))
    for bad, match in ((good[:-1], r"shape \(512,\)"), (good.astype(np.float64), "integer dtype"),
                       (np.zeros(N_ERROR_BINS, np.int64), "empty"), (good.reshape(2, -1), "shape"),
                       (np.where(np.arange(N_ERROR_BINS) == 3, -1, good), r"counts\[3\] = -1"),
                       (list(good), "numpy array")):
        with pytest.raises(ValueError, match=match):
            histogram_quantile(bad, 0.5)
    for q in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="q must be in"):
            histogram_quantile(good, q)


# ---------------------------------------------------------------------------------------------
# the cloud's accumulator


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in ae_shapes(D, H).items()}


def _results_equal(a: RouterResult, b: RouterResult) -> bool:
    same_state = (a.state is None and b.state is None) or (
        a.state is not None and b.state is not None and a.state.keys() == b.state.keys()
        and all(np.array_equal(a.state[k], b.state[k]) for k in a.state))
    return same_state and (a.task, a.threshold, a.n_clients, a.n_samples, a.n_errors) == (
        b.task, b.threshold, b.n_clients, b.n_samples, b.n_errors)


def test_accumulator_weighted_mean_and_pooled_threshold():
    s1, s2 = _state(1), _state(2)
    e1, e2 = _lognormal(300, seed=4), _lognormal(700, seed=5)
    acc = RouterAccumulator("color", D, H)
    acc.add("c1", 1, s1, error_histogram(e1))
    acc.add("c2", 3, s2, error_histogram(e2))
    acc.add("c3", 5, None, error_histogram(e1[:10]))  # histogram only: does not dilute the mean
    res = acc.finalize(quantile=0.95)
    assert (res.task, res.n_clients, res.n_samples, res.n_errors) == ("color", 3, 9, 1010)
    for k in s1:
        want = (1 * s1[k].astype(np.float64) + 3 * s2[k].astype(np.float64)) / 4
        np.testing.assert_array_equal(res.state[k], want.astype(np.float32))
        assert res.state[k].dtype == np.float32
    pooled = np.concatenate([e1, e2, e1[:10]])
    exact = float(np.quantile(pooled, 0.95))
    assert max(res.threshold / exact, exact / res.threshold) <= BIN_RATIO
    assert _results_equal(res, acc.finalize(quantile=0.95))  # finalize keeps the sums
    only_state = RouterAccumulator("color", D, H)
    only_state.add("c1", 2, s1, None)
    r = only_state.finalize(0.9)
    assert r.threshold is None and r.n_errors == 0
    assert all(np.array_equal(r.state[k], s1[k]) for k in s1)  # one client: its own weights
    empty = RouterAccumulator("color", D, H).finalize(0.9)
    assert empty.state is None and empty.threshold is None and empty.n_clients == 0
    with pytest.raises(ValueError, match="quantile"):
        acc.finalize(0.0)
    with pytest.raises(ValueError, match="hidden"):
        RouterAccumulator("color", D, 0)


def _bad_replies() -> list[tuple[str, tuple, str]]:
    s, h = _state(3), error_histogram(_lognormal(50, seed=6))
    nan = dict(s, **{"encoder.0.weight": np.full((H, D), np.nan, np.float32)})
    wide = dict(s, **{"decoder.0.weight": np.zeros((D, H + 2), np.float32)})
    return [
        ("duplicate", ("c1", 4, s, h), "'c1'.*already"),
        ("empty id", ("", 4, s, h), "non-empty"),
        ("n zero", ("c9", 0, s, h), r"'c9'.*n_samples.*0"),
        ("n float", ("c9", 2.0, s, h), r"'c9'.*n_samples.*2\.0"),
        ("nan", ("c9", 4, nan, h), r"'c9'.*'encoder\.0\.weight'.*NaN"),
        ("shape", ("c9", 4, wide, h), r"'c9'.*'decoder\.0\.weight'.*\(16, 10\)"),
        ("hist float", ("c9", 4, s, h.astype(np.float32)), "'c9'.*integer dtype"),
        ("hist short", ("c9", 4, s, h[:10]), r"'c9'.*shape \(512,\)"),
        ("hist negative", ("c9", 4, s, -h), "'c9'.*>= 0"),
        ("hist empty", ("c9", 4, s, np.zeros_like(h)), "'c9'.*empty"),
        ("nothing", ("c9", 4, None, None), "'c9'.*neither"),
    ]


@pytest.mark.parametrize(("reply", "match"), [pytest.param(r, m, id=n) for n, r, m in _bad_replies()])
def test_a_bad_reply_is_rejected_and_changes_nothing(reply, match):
    acc = RouterAccumulator("color", D, H)
    acc.add("c1", 2, _state(1), error_histogram(_lognormal(80, seed=7)))
    before = acc.finalize(0.9)
    with pytest.raises(RouterUpdateError, match=match):
        acc.add(*reply)
    assert _results_equal(acc.finalize(0.9), before)
    acc.add("c2", 1, _state(2), None)  # still usable afterwards
    assert acc.n_clients == 2


# ---------------------------------------------------------------------------------------------
# federated fit vs the pooled data


def _cluster(centre: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(centre + 0.15 * torch.randn(n, D, generator=g), dim=1)  # (n, D)


def test_federated_router_fit_separates_tasks_and_keeps_q_of_fresh_samples():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(2, D, generator=g), dim=1)  # tasks A and B
    sizes = (60, 140, 300)  # task A over 3 uneven clients
    train = [_cluster(centres[0], n, g) for n in sizes]
    held = [_cluster(centres[0], n // 2, g) for n in sizes]  # each client's held-out samples
    global_state = ae_state(init_autoencoder(D, H, seed=0))  # round 0: the same init everywhere
    for rnd in range(3):
        acc = RouterAccumulator("A", D, H)
        for c, z in enumerate(train):
            ae = fit_autoencoder(z, hidden=H, epochs=10, lr=1e-2, val_fraction=0.0, batch_size=32,
                                 seed=100 * rnd + c, init=global_state)
            acc.add(f"client{c}", z.shape[0], ae_state(ae), None)
        global_state = acc.finalize(0.95).state
    assert global_state is not None
    ae = ae_from_state(global_state)
    # τ from the clients' held-out error histograms only: no raw error leaves a client
    acc = RouterAccumulator("A", D, H)
    for c, z in enumerate(held):
        acc.add(f"client{c}", z.shape[0], None, error_histogram(reconstruction_error(ae, z)))
    tau = acc.finalize(0.95).threshold
    assert tau is not None
    pooled = threshold(torch.cat([reconstruction_error(ae, z) for z in held]), 0.95)
    assert max(tau / pooled, pooled / tau) <= BIN_RATIO  # = the pooled quantile, up to binning
    err_a = reconstruction_error(ae, torch.cat(held))  # (250,)
    err_b = reconstruction_error(ae, _cluster(centres[1], 250, g))  # (250,)
    assert float((err_a < err_b.min()).float().mean()) >= 0.95
    fresh = reconstruction_error(ae, _cluster(centres[0], 1000, g))
    kept = float((fresh < tau).float().mean())
    assert 0.85 <= kept <= 1.0
    # as good as one fit on the pooled features with the same number of epochs (measured ≈ 0.95×)
    central = fit_autoencoder(torch.cat(train), hidden=H, epochs=30, lr=1e-2, val_fraction=0.0,
                              batch_size=32, seed=0)
    assert float(err_a.mean()) <= 1.2 * float(reconstruction_error(central, torch.cat(held)).mean())
