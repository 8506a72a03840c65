"""Robust and DP centres (cloud/robust.py) and their use in the streaming accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloud.aggregation import AggregationSpec, DeltaAccumulator, ModuleSpec
from cloud.robust import (
    CENTERS,
    ModalityRule,
    composed_epsilon,
    coordinate_median,
    dp_report,
    gaussian_epsilon,
    parse_rules,
    trim_count,
    trimmed_mean,
)
from protocol.config import AGGREGATION_CENTERS, ConfigError, parse_config
from protocol.updates import ClientUpdate

L0, V0 = "lang.0", "vis.0"
SPEC = AggregationSpec("t", {L0: ModuleSpec("language", 2, 6, 5), V0: ModuleSpec("vision", 2, 4, 3)},
                       2.0)


def _update(cid: str, rng: np.random.Generator, n: int = 10, scale: float = 1.0) -> ClientUpdate:
    tensors = {}
    for m, s in SPEC.modules.items():
        tensors[f"{m}.lora_A"] = rng.standard_normal((s.rank, s.d_in)).astype(np.float32)
        tensors[f"{m}.lora_B"] = (scale * rng.standard_normal((s.d_out, s.rank))).astype(np.float32)
    return ClientUpdate(cid, "t", 1, n, frozenset({"language", "vision"}), tensors)


def _delta(u: ClientUpdate, m: str) -> np.ndarray:
    return u.tensors[f"{m}.lora_B"].astype(np.float64) @ u.tensors[f"{m}.lora_A"].astype(np.float64)


def test_centre_names_agree_with_the_config():
    assert CENTERS == AGGREGATION_CENTERS


def test_median_ignores_one_client_scaled_a_hundred_fold():
    rng = np.random.default_rng(0)
    honest = [_update(f"h{i}", rng) for i in range(4)]
    evil = _update("evil", rng, n=10_000, scale=100.0)  # a claimed weight cannot buy the median
    acc = DeltaAccumulator(SPEC, centers={"language": ModalityRule("median")}, round=1)
    for u in [*honest, evil]:
        acc.add(u)
    r = acc.finalize()
    got = r.modules[L0].lora_B.astype(np.float64) @ r.modules[L0].lora_A
    stack = np.stack([_delta(u, L0) for u in [*honest, evil]])
    # the rank-2 re-factoring of the coordinate-wise median, measured against that median
    assert r.modules[L0].error == pytest.approx(
        np.linalg.norm(np.median(stack, 0) - got) / np.linalg.norm(np.median(stack, 0)), abs=1e-5)
    honest_max = np.abs(np.stack([_delta(u, L0) for u in honest])).max()
    assert np.abs(np.median(stack, 0)).max() <= honest_max  # every coordinate within honest values
    assert r.centers == {"language": "median", "vision": "mean"}
    # the vision modality kept the weighted mean, which the ×100 client dominates
    mean_v = sum(u.n_samples * _delta(u, V0) for u in [*honest, evil]) / sum(
        u.n_samples for u in [*honest, evil])
    assert np.allclose(acc.mean_delta(V0), mean_v)


def test_trimmed_mean_drops_k_values_at_each_end_per_coordinate():
    x = np.array([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    assert np.allclose(trimmed_mean(x, 0.2), [3.0, 1.0])
    assert np.allclose(trimmed_mean(x, 0.0), x.mean(0))
    assert np.allclose(coordinate_median(x), [3.0, 1.0])
    assert [trim_count(n, f) for n, f in ((3, 0.2), (5, 0.2), (3, 0.34), (2, 0.49), (10, 0.25))] == \
        [0, 1, 1, 0, 2]
    with pytest.raises(ValueError, match="no client"):
        trimmed_mean(np.zeros((0, 2)), 0.2)


def test_dp_without_noise_is_the_unweighted_mean_of_clipped_changes():
    rng = np.random.default_rng(1)
    ups = [_update(f"c{i}", rng, n=1 + 50 * i) for i in range(3)]
    ref = {L0: rng.standard_normal((5, 6)), V0: rng.standard_normal((3, 4))}
    big = DeltaAccumulator(SPEC, centers={"language": ModalityRule(dp_clip=1e9)}, reference=ref)
    for u in ups:
        big.add(u)
    got = big._center(L0, SPEC.modules[L0], big.finalize().dp)
    assert np.allclose(got, np.mean([_delta(u, L0) for u in ups], 0))  # unweighted
    # a small clip bounds every client's change, so the mean moves at most C from the reference
    c = 0.5
    small = DeltaAccumulator(SPEC, centers={"language": ModalityRule(dp_clip=c)}, reference=ref)
    for u in ups:
        small.add(u)
    r = small.finalize()
    assert r.dp["language"] == {"clients": 3, "clipped": 3, "sigma": 0.0}
    moved = small._center(L0, SPEC.modules[L0], r.dp) - ref[L0]
    assert np.linalg.norm(moved) <= c + 1e-9
    assert r.centers["language"] == "dp-mean" and "vision" not in r.dp


def test_dp_noise_has_the_promised_std():
    spec = AggregationSpec("t", {L0: ModuleSpec("language", 2, 200, 300)})
    rng = np.random.default_rng(2)
    clip, z = 0.1, 2.0
    acc = DeltaAccumulator(spec, centers={"language": ModalityRule(dp_clip=clip, dp_noise=z)},
                           rng=np.random.default_rng(3))
    for i in range(4):
        acc.add(ClientUpdate(f"c{i}", "t", 1, 5, frozenset({"language"}),
                             {f"{L0}.lora_A": np.zeros((2, 200), np.float32),
                              f"{L0}.lora_B": rng.standard_normal((300, 2)).astype(np.float32)}))
    r = acc.finalize()
    sigma = z * clip / 4
    assert r.dp["language"]["sigma"] == pytest.approx(sigma)
    noise = acc._center(L0, spec.modules[L0], r.dp)  # the changes are 0 (A = 0): pure noise
    assert noise.std() == pytest.approx(sigma, rel=0.02) and abs(noise.mean()) < 5 * sigma / 245
    with pytest.raises(ValueError, match="seeded `rng`"):
        DeltaAccumulator(spec, centers={"language": ModalityRule(dp_clip=clip, dp_noise=z)})


def test_epsilon_matches_the_closed_form_rdp_optimum():
    z, delta = 1.5, 1e-5
    for releases in (1, 10, 100):
        log_d = math.log(1 / delta)
        # continuous minimum over α of R·α/(2z²) + log(1/δ)/(α − 1)
        best = releases / (2 * z * z) + math.sqrt(2 * releases * log_d) / z
        eps = gaussian_epsilon(z, releases, delta)
        assert best <= eps <= 1.02 * best
    assert gaussian_epsilon(2.0, 10, delta) < gaussian_epsilon(1.0, 10, delta)
    assert gaussian_epsilon(1.0, 0, delta) == 0.0 and gaussian_epsilon(0.0, 1, delta) == math.inf
    assert composed_epsilon([1.0, 1.0], delta) == pytest.approx(gaussian_epsilon(1.0, 2, delta))
    rounds = [{"dp": {"language": {"z": 1.0, "clients": 3, "clipped": 1, "sigma": 0.1}}},
              {"round": 2},
              {"dp": {"language": {"z": 1.0, "clients": 3, "clipped": 0, "sigma": 0.1},
                      "vision": {"z": 1.0, "clients": 2, "clipped": 2, "sigma": 0.2}}}]
    rep = dp_report(rounds, delta)
    assert rep["releases"] == 3 and rep["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 3, delta))
    assert rep["per_modality"]["language"]["clipped_updates"] == 1
    assert dp_report([{"round": 1}], delta) is None


def test_rules_per_modality_and_their_errors():
    mods = ["audio", "language", "vision"]
    r = parse_rules(["mean", "audio=median"], mods, dp_clip=1.0, dp_noise=0.5,
                    dp_modalities=["language"])
    assert r["audio"].center == "median" and r["vision"].center == "mean"
    assert r["language"].dp and not r["vision"].dp
    assert all(x.center == "trimmed-mean" for x in parse_rules(["trimmed-mean"], mods).values())
    with pytest.raises(ValueError, match="unknown modality 'image'"):
        parse_rules(["image=median"], mods)
    with pytest.raises(ValueError, match="cannot be combined with the 'median'"):
        parse_rules(["median"], mods, dp_clip=1.0)
    with pytest.raises(ValueError, match="dp-modalities"):
        parse_rules([], mods, dp_clip=1.0, dp_modalities=["smell"])
    with pytest.raises(ValueError, match="rule 'fedavg-ab' cannot"):
        DeltaAccumulator(SPEC, "fedavg-ab", centers={"vision": ModalityRule("median")})
    for key, value, says in (("federation.aggregation", "avg", "CENTRE one of mean"),
                             ("federation.trim-fraction", "0.5", "in [0, 0.5)"),
                             ("federation.dp-clip", "-1", ">= 0"),
                             ("federation.quorum", "99", "in [1, federation.clients=8]")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            parse_config({key: value})
        assert says in str(e.value)
