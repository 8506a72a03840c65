"""Per-modality aggregation of LoRA expert updates: exactness, measured error, grouping, rejections,
and the low-rank streaming path against the dense one (docs/aggregation.md)."""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any

import numpy as np
import pytest

from cloud import aggregation
from cloud.aggregation import (
    AGGREGATORS,
    AggregationResult,
    AggregationSpec,
    ClientUpdate,
    DeltaAccumulator,
    LowRankSum,
    ModuleSpec,
    UpdateError,
    aggregate,
    change_sq_norm,
    deviation_norm,
    get_aggregator,
    svd_factors,
)
from cloud.robust import ModalityRule
from protocol.plan import ExpertPlan, TaskAllocation

D, R = 8, 2
VQ = "vision_tower.layers.0.self_attn.q_proj"
LQ = "language_model.layers.0.self_attn.q_proj"
LK = "language_model.layers.0.self_attn.k_proj"  # GQA: d_out < d_in
AQ = "audio_tower.layers.0.self_attn.q_proj"
AO = "audio_tower.layers.1.self_attn.out_proj"
LANG, AUDIO = (LQ, LK), (AQ, AO)



@pytest.fixture(autouse=True)
def _low_rank_at_test_sizes(monkeypatch):
    """These tests use small modules; production keeps modules of ≤ DENSE_BELOW weights dense
    (test_small_modules_keep_the_dense_sum), here the low-rank path runs at every size."""
    monkeypatch.setattr(aggregation, "DENSE_BELOW", 0)


def make_spec() -> AggregationSpec:
    return AggregationSpec("t", {
        VQ: ModuleSpec("vision", R, D, D),
        LQ: ModuleSpec("language", R, D, D),
        LK: ModuleSpec("language", R, D, D // 2),
        AQ: ModuleSpec("audio", R, D, D),
        AO: ModuleSpec("audio", R, D, D),
    }, scale=2.0)


SPEC = make_spec()


def pair(rng: np.random.Generator, module: str, a: np.ndarray | None = None):
    s = SPEC.modules[module]
    if a is None:
        a = rng.standard_normal((R, s.d_in)).astype(np.float32)
    return a, rng.standard_normal((s.d_out, R)).astype(np.float32)


def tensors(pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for m, (a, b) in pairs.items():
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = a, b
    return out


def update(cid: str, n: int, pairs, modalities=frozenset({"language", "audio"}), task="t",
           rnd=1) -> ClientUpdate:
    return ClientUpdate(cid, task, rnd, n, frozenset(modalities), tensors(pairs))


def delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return b.astype(np.float64) @ a.astype(np.float64)  # (d_out, d_in)


def product(res: AggregationResult, m: str) -> np.ndarray:
    r = res.modules[m]
    return delta(r.lora_A, r.lora_B)


def same_result(x: AggregationResult, y: AggregationResult) -> bool:
    tx, ty = x.tensors(), y.tensors()
    return (x.summary() == y.summary() and tx.keys() == ty.keys()
            and all(np.array_equal(tx[k], ty[k]) for k in tx))


# --- 1. exact where claimed -----------------------------------------------------------------


def test_clients_sharing_A_are_aggregated_exactly():
    """Same A, different B → ΔW̄ = mean(B)·A has rank ≤ r → B'A' is ΔW̄ (both rules)."""
    rng = np.random.default_rng(0)
    shared = {m: pair(rng, m)[0] for m in (*LANG, *AUDIO)}
    weights = {"c1": 2, "c2": 3, "c3": 5}
    sent = {c: {m: pair(rng, m, shared[m]) for m in shared} for c in weights}
    ups = [update(c, w, sent[c]) for c, w in weights.items()]
    for rule in ("svd", "fedavg-ab"):
        res = aggregate(SPEC, ups, rule)
        for m in shared:
            want = sum(w * delta(*sent[c][m]) for c, w in weights.items()) / 10
            assert np.abs(product(res, m) - want).max() < 1e-6 * max(1.0, np.abs(want).max())
            assert res.modules[m].error < 1e-6
            assert res.modules[m].lora_A.dtype == np.float32
            assert res.modules[m].lora_A.shape == (R, SPEC.modules[m].d_in)
            assert res.modules[m].lora_B.shape == (SPEC.modules[m].d_out, R)
        assert res.missing == (VQ,) and res.scale == 2.0


def test_single_client_gets_its_own_delta_back():
    rng = np.random.default_rng(1)
    sent = {m: pair(rng, m) for m in (*LANG, *AUDIO)}
    res = aggregate(SPEC, [update("solo", 7, sent)])
    for m, (a, b) in sent.items():
        np.testing.assert_allclose(product(res, m), delta(a, b), atol=1e-5)
        assert res.modules[m].error < 1e-6 and res.modules[m].weight == 7


def test_svd_factors_pad_to_the_rank():
    d = np.outer(np.arange(3.0), np.arange(2.0))  # (3, 2), rank 1
    a, b = svd_factors(d, 4)
    assert a.shape == (4, 2) and b.shape == (3, 4)
    np.testing.assert_allclose(b @ a, d, atol=1e-12)


# --- 2. measured approximation otherwise ------------------------------------------------------


def test_truncation_error_is_measured_and_beats_fedavg_ab():
    rng = np.random.default_rng(2)
    weights = {"c1": 1, "c2": 4, "c3": 2, "c4": 3}
    sent = {c: {m: pair(rng, m) for m in (*LANG, *AUDIO)} for c in weights}
    ups = [update(c, w, sent[c]) for c, w in weights.items()]
    svd, naive = aggregate(SPEC, ups, "svd"), aggregate(SPEC, ups, "fedavg-ab")
    for m in (*LANG, *AUDIO):
        target = sum(w * delta(*sent[c][m]) for c, w in weights.items()) / sum(weights.values())
        measured = np.linalg.norm(target - product(svd, m)) / np.linalg.norm(target)
        naive_err = np.linalg.norm(target - product(naive, m)) / np.linalg.norm(target)
        assert svd.modules[m].error == pytest.approx(measured, abs=1e-6)
        assert naive.modules[m].error == pytest.approx(naive_err, abs=1e-6)
        # Eckart–Young: the error is exactly the discarded singular values' share.
        s = np.linalg.svd(target, compute_uv=False)
        assert measured == pytest.approx(np.sqrt((s[R:] ** 2).sum() / (s ** 2).sum()), abs=1e-6)
        assert 0.05 < measured <= naive_err  # rank(ΔW̄) > r here: not exact, but the best rank r
        assert naive_err > measured + 0.05  # and fedavg-ab is clearly worse, not exact


# --- 3. modality grouping ---------------------------------------------------------------------


def test_audio_is_averaged_over_audio_clients_only():
    rng = np.random.default_rng(3)
    sent = {c: {m: pair(rng, m) for m in (*LANG, *AUDIO)} for c in ("c1", "c2", "c3")}
    acc = DeltaAccumulator(SPEC)
    acc.add(update("c1", 1, sent["c1"]))
    acc.add(update("c2", 2, sent["c2"]))
    acc.add(update("c3", 3, sent["c3"], modalities={"language"}))  # sends audio tensors anyway
    res = acc.finalize()
    d = {c: {m: delta(*sent[c][m]) for m in sent[c]} for c in sent}
    for m in AUDIO:
        np.testing.assert_allclose(acc.mean_delta(m), (1 * d["c1"][m] + 2 * d["c2"][m]) / 3, atol=1e-12)
        assert (res.modules[m].weight, res.modules[m].n_clients) == (3, 2)
    for m in LANG:
        np.testing.assert_allclose(acc.mean_delta(m),
                                   (1 * d["c1"][m] + 2 * d["c2"][m] + 3 * d["c3"][m]) / 6, atol=1e-12)
        assert (res.modules[m].weight, res.modules[m].n_clients) == (6, 3)
    assert res.weight_by_modality == {"audio": 3, "language": 6, "vision": 0}
    assert res.clients_by_modality == {"audio": ("c1", "c2"), "language": ("c1", "c2", "c3"),
                                       "vision": ()}
    assert res.ignored == {"c3": AUDIO}
    assert res.clients == ("c1", "c2", "c3")


# --- 4. weighting, and a modality nobody holds ------------------------------------------------


def test_weights_are_n_samples_and_unheld_modalities_are_missing():
    spec = AggregationSpec("t", {"language_model.layers.0.self_attn.q_proj": ModuleSpec("language", 1, 2, 2),
                                 VQ: ModuleSpec("vision", 1, 2, 2)})
    m = "language_model.layers.0.self_attn.q_proj"
    a = np.array([[1.0, 0.0]], np.float32)  # (1, 2)
    u1 = ClientUpdate("c1", "t", 1, 1, frozenset({"language"}),
                      {f"{m}.lora_A": a, f"{m}.lora_B": np.array([[1.0], [0.0]], np.float32)})
    u2 = ClientUpdate("c2", "t", 1, 3, frozenset({"language"}),
                      {f"{m}.lora_A": a, f"{m}.lora_B": np.array([[0.0], [1.0]], np.float32)})
    res = aggregate(spec, [u1, u2])
    # ΔW_1 = [[1, 0], [0, 0]], ΔW_2 = [[0, 0], [1, 0]] → (1·ΔW_1 + 3·ΔW_2) / 4
    np.testing.assert_allclose(product(res, m), [[0.25, 0.0], [0.75, 0.0]], atol=1e-7)
    assert list(res.modules) == [m] and res.missing == (VQ,)
    assert res.weight_by_modality == {"language": 4, "vision": 0}
    assert res.tensors().keys() == {f"{m}.lora_A", f"{m}.lora_B"}


# --- 5. rejections leave the accumulator untouched --------------------------------------------


def _bad_updates() -> list[tuple[str, ClientUpdate, str]]:
    rng = np.random.default_rng(5)
    good = {m: pair(rng, m) for m in (*LANG, *AUDIO)}
    t = tensors(good)

    def with_(cid: str, **changes) -> ClientUpdate:
        kw: dict[str, Any] = dict(client_id=cid, task="t", round=1, n_samples=4,
                  modalities=frozenset({"language", "audio"}), tensors=dict(t))
        kw.update(changes)
        return ClientUpdate(**kw)

    def tens(**repl) -> dict[str, np.ndarray]:  # the bad tensor goes last
        out = {k: v for k, v in t.items() if k not in repl.get("drop", ())}
        out.update({k: v for k, v in repl.items() if k != "drop"})
        return out

    a_lq, b_lq = f"{LQ}.lora_A", f"{LQ}.lora_B"
    nan = t[b_lq].copy()
    nan[0, 0] = np.nan
    inf = t[a_lq].copy()
    inf[1, 3] = np.inf
    return [
        ("unknown module", with_("u1", tensors=tens(**{"language_model.layers.9.self_attn.q_proj.lora_A":
                                                        t[a_lq]})), "layers.9"),
        ("unknown suffix", with_("u2", tensors=tens(**{f"{LQ}.lora_C": t[a_lq]})), "lora_C"),
        ("A without B", with_("u3", tensors=tens(drop=(b_lq,))), "without"),
        ("B without A", with_("u4", tensors=tens(drop=(a_lq,))), "without"),
        ("wrong shape", with_("u5", tensors=tens(**{a_lq: t[a_lq].T.copy()})), "shape"),
        ("int dtype", with_("u6", tensors=tens(**{a_lq: t[a_lq].astype(np.int32)})), "dtype"),
        ("not an array", with_("u7", tensors=tens(**{a_lq: t[a_lq].tolist()})), "numpy array"),
        ("nan", with_("u8", tensors=tens(**{b_lq: nan})), "non-finite"),
        ("inf", with_("u9", tensors=tens(**{a_lq: inf})), "non-finite"),
        ("n_samples 0", with_("u10", n_samples=0), "n_samples"),
        ("n_samples < 0", with_("u11", n_samples=-3), "n_samples"),
        ("n_samples float", with_("u12", n_samples=2.5), "n_samples"),
        ("n_samples bool", with_("u13", n_samples=True), "n_samples"),
        ("task mismatch", with_("u14", task="other"), "task"),
        ("round mismatch", with_("u15", round=2), "round"),
        ("unknown modality", with_("u16", modalities=frozenset({"image", "text"})), "image"),
        ("twice in a round", with_("c0"), "already added"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_updates())), ids=[c[0] for c in _bad_updates()])
def test_rejected_updates_change_nothing(case):
    _, bad, what = _bad_updates()[case]
    rng = np.random.default_rng(6)
    acc = DeltaAccumulator(SPEC, round=1)
    acc.add(update("c0", 2, {m: pair(rng, m) for m in (*LANG, *AUDIO)}))
    before = acc.finalize()
    with pytest.raises(UpdateError) as e:
        acc.add(bad)
    assert repr(bad.client_id) in str(e.value) and what in str(e.value)
    assert same_result(before, acc.finalize())
    acc.add(update("c1", 1, {m: pair(rng, m) for m in LANG}))  # still usable afterwards
    assert acc.finalize().clients == ("c0", "c1")


def test_key_named_in_tensor_errors():
    rng = np.random.default_rng(7)
    a, b = pair(rng, LQ)
    bad = ClientUpdate("c9", "t", 1, 1, frozenset({"language"}),
                       {f"{LQ}.lora_A": a, f"{LQ}.lora_B": b.astype(np.int64)})
    with pytest.raises(UpdateError, match=r"'c9'.*lora_B.*int64"):
        DeltaAccumulator(SPEC).add(bad)


# --- 6. order independence and no per-client state --------------------------------------------


def test_order_independent_and_memory_flat():
    rng = np.random.default_rng(8)
    ups = [update(f"c{i}", int(rng.integers(1, 100)), {m: pair(rng, m) for m in (*LANG, *AUDIO)},
                  modalities={"language", "audio"} if i % 3 else {"language"}) for i in range(50)]
    fwd, shuf = DeltaAccumulator(SPEC), DeltaAccumulator(SPEC)
    order = list(range(50))
    random.Random(0).shuffle(order)
    empty_bytes = fwd.nbytes
    for i, j in enumerate(order):
        fwd.add(ups[i])
        shuf.add(ups[j])
        if i == 1:
            bytes_at_2 = fwd.nbytes
    for m in (*LANG, *AUDIO):
        np.testing.assert_allclose(fwd.mean_delta(m), shuf.mean_delta(m), rtol=0, atol=1e-9)
    x, y = fwd.finalize().summary(), shuf.finalize().summary()
    for s in (x, y):  # errors come after the SVD: compare them loosely, the rest exactly
        for v in s["modules"].values():
            v["error"] = round(v["error"], 6)
    assert x == y
    assert empty_bytes == bytes_at_2 == fwd.nbytes


def test_no_reference_to_client_tensors_is_kept():
    rng = np.random.default_rng(9)
    a, b = pair(rng, LQ)
    ref = weakref.ref(a)
    acc = DeltaAccumulator(SPEC, "fedavg-ab")
    acc.add(ClientUpdate("c1", "t", 1, 1, frozenset({"language"}), {f"{LQ}.lora_A": a, f"{LQ}.lora_B": b}))
    del a, b
    gc.collect()
    assert ref() is None


# --- registry and spec ------------------------------------------------------------------------


def test_registry_names_the_known_rules():
    assert set(AGGREGATORS) == {"svd", "fedavg-ab"}
    assert get_aggregator("svd").name == "svd"
    with pytest.raises(ValueError, match="unknown aggregator 'median'; known: svd, fedavg-ab"):
        get_aggregator("median")
    with pytest.raises(ValueError, match="known: svd, fedavg-ab"):
        DeltaAccumulator(SPEC, "median")


def test_spec_from_plan():
    modality_of = {VQ: "vision", LQ: "language", LK: "language", AQ: "audio"}
    alloc = TaskAllocation("t", 2, {"vision": 1, "language": 1, "audio": 0},
                           {"vision": 0.5, "language": 0.5, "audio": 0.0}, (VQ, LQ), 0.0)
    plan = ExpertPlan.empty(modality_of).with_task(alloc, rank=R, alpha=16)
    spec = AggregationSpec.from_plan(plan, "t", {VQ: (D, D), LQ: (D, D), LK: (D, 4), AQ: (D, D)})
    assert spec.modules == {VQ: ModuleSpec("vision", R, D, D), LQ: ModuleSpec("language", R, D, D)}
    assert spec.scale == 8.0 and spec.modalities == {"vision", "language", "audio"}
    with pytest.raises(ValueError, match="lacks"):
        AggregationSpec.from_plan(plan, "t", {VQ: (D, D)})


# --- low-rank streaming: equal to the dense path (cloud.aggregation.LowRankSum) ---------------


# (d_out, d_in, rank, clients): square, tall, wide, rank 1, and one where the stacks reach the
# dense size mid-stream (24×20: limit 10 columns, 4 clients of rank 4 → dense fallback)
SHAPES = [(64, 64, 4, 7), (96, 40, 2, 12), (32, 80, 8, 3), (50, 50, 1, 30), (24, 20, 4, 4)]


def _dense_reference(sent: list[tuple[int, np.ndarray, np.ndarray]], rank: int):
    """Today's dense path, spelled out: ΔW̄ = Σ w·B·A / Σ w, svd_factors, measured error."""
    target = sum(w * delta(a, b) for w, a, b in sent) / sum(w for w, _, _ in sent)
    a, b = svd_factors(target, rank)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    norm = np.linalg.norm(target)
    err = np.linalg.norm(target - delta(a32, b32)) / norm if norm > 0 else 0.0
    return target, delta(a32, b32), float(err)


def _clients(rng, d_out, d_in, rank, n, kind):
    """n (weight, A, B) of one module: independent, sharing A, sharing B, or all zero B."""
    shared_a = rng.standard_normal((rank, d_in)).astype(np.float32)
    shared_b = rng.standard_normal((d_out, rank)).astype(np.float32)
    out = []
    for _ in range(n):
        a = shared_a if kind == "shared-A" else rng.standard_normal((rank, d_in)).astype(np.float32)
        b = shared_b if kind == "shared-B" else rng.standard_normal((d_out, rank)).astype(np.float32)
        if kind == "zero":
            b = np.zeros_like(b)
        out.append((int(rng.integers(1, 500)), a, b))
    return out


def _accumulate(spec: AggregationSpec, sent, order=None, **kw) -> DeltaAccumulator:
    acc = DeltaAccumulator(spec, **kw)
    (m,) = spec.modules
    for i in order if order is not None else range(len(sent)):
        w, a, b = sent[i]
        acc.add(ClientUpdate(f"c{i:03d}", "t", 1, w, frozenset({"language"}),
                             {f"{m}.lora_A": a, f"{m}.lora_B": b}))
    return acc


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300))


@pytest.mark.parametrize("kind", ["independent", "shared-A", "shared-B", "zero"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}r{s[2]}n{s[3]}" for s in SHAPES])
def test_low_rank_equals_the_dense_path(shape, kind):
    d_out, d_in, rank, n = shape
    rng = np.random.default_rng(d_out * 1000 + d_in + rank + len(kind))
    sent = _clients(rng, d_out, d_in, rank, n, kind)
    spec = AggregationSpec("t", {LQ: ModuleSpec("language", rank, d_in, d_out)})
    acc = _accumulate(spec, sent)
    res = acc.finalize().modules[LQ]
    target, want, err = _dense_reference(sent, rank)
    got = product(acc.finalize(), LQ)
    if kind == "zero":
        assert np.abs(got).max() == 0 and res.error == 0.0
        return
    assert _rel(got, want) < 1e-6
    assert res.error == pytest.approx(err, rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(acc.mean_delta(LQ), target, rtol=0, atol=1e-9 * np.abs(target).max())
    assert res.lora_A.shape == (rank, d_in) and res.lora_B.shape == (d_out, rank)
    # A' has orthonormal rows (the dense convention), B' = U S
    a64 = res.lora_A.astype(np.float64)
    k = min(rank, np.linalg.matrix_rank(target))
    np.testing.assert_allclose(a64[:k] @ a64[:k].T, np.eye(k), atol=1e-5)
    if kind in ("shared-A", "shared-B") or rank * n <= min(d_out, d_in) and kind != "independent":
        assert res.error < 1e-6  # rank(ΔW̄) ≤ r: exact up to the float32 cast


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}r{s[2]}n{s[3]}" for s in SHAPES])
def test_low_rank_result_does_not_depend_on_the_order(shape):
    d_out, d_in, rank, n = shape
    rng = np.random.default_rng(11 + d_out)
    sent = _clients(rng, d_out, d_in, rank, n, "independent")
    spec = AggregationSpec("t", {LQ: ModuleSpec("language", rank, d_in, d_out)})
    first = _accumulate(spec, sent).finalize()
    for seed in range(3):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        other = _accumulate(spec, sent, order).finalize()
        assert _rel(product(other, LQ), product(first, LQ)) < 1e-9
        assert other.modules[LQ].error == pytest.approx(first.modules[LQ].error, rel=1e-9, abs=1e-12)
        assert other.summary()["clients"] == first.summary()["clients"]


def test_dense_fallback_where_the_stacks_would_be_larger():
    d_out, d_in, rank = 24, 20, 4  # limit 10 columns: 2 clients stacked (8), the 3rd densifies
    rng = np.random.default_rng(3)
    sent = _clients(rng, d_out, d_in, rank, 4, "independent")
    spec = AggregationSpec("t", {LQ: ModuleSpec("language", rank, d_in, d_out)})
    acc = _accumulate(spec, sent[:2])
    assert acc.width(LQ) == 8 and acc.stored_floats < d_out * d_in
    acc = _accumulate(spec, sent)
    assert acc.width(LQ) is None and acc.stored_floats == d_out * d_in  # dense, as before
    # and a module where two updates already reach the dense size is dense from the start
    tiny = AggregationSpec("t", {LQ: ModuleSpec("language", 2, 8, 8)})
    assert DeltaAccumulator(tiny).width(LQ) is None


@pytest.mark.parametrize("kind", ["independent", "shared-A"])
def test_accumulator_memory_is_linear_in_the_width_not_quadratic(kind):
    d_out, d_in, rank, n = 512, 384, 4, 50
    rng = np.random.default_rng(5)
    sent = _clients(rng, d_out, d_in, rank, n, kind)
    spec = AggregationSpec("t", {LQ: ModuleSpec("language", rank, d_in, d_out)})
    acc = DeltaAccumulator(spec)
    peak = 0
    for i, (w, a, b) in enumerate(sent):
        acc.add(ClientUpdate(f"c{i}", "t", 1, w, frozenset({"language"}),
                             {f"{LQ}.lora_A": a, f"{LQ}.lora_B": b}))
        k_true = min((i + 1) * rank, rank if kind == "shared-A" else d_in)
        # stored floats ≤ 2·(d_in + d_out)·max(k_true + r, 4r): the stacks' 1.5× growth slack
        # and the columns added since the last re-compression
        assert acc.stored_floats <= 2 * (d_in + d_out) * max(2 * k_true + rank, 4 * rank)
        peak = max(peak, acc.stored_floats)
    assert acc.stored_floats < d_in * d_out  # 200 rank-4 updates (limit 219): smaller than dense
    if kind == "shared-A":  # the mean has rank 4 however many clients: memory is flat
        assert acc.width(LQ) is not None and acc.width(LQ) <= 4 * rank + rank
        assert peak <= (d_in + d_out) * 6 * rank
        assert acc.finalize().modules[LQ].error < 1e-6


def test_recompression_keeps_the_sum_exactly():
    rng = np.random.default_rng(6)
    t = LowRankSum(300, 200, 3)
    want = np.zeros((300, 200))
    basis_a = rng.standard_normal((5, 200))
    for _ in range(40):  # terms in a 5-dimensional row space: k stays ≤ 2·5 + base
        b = rng.standard_normal((300, 3))
        a = rng.standard_normal((3, 5)) @ basis_a
        t.add(b, a)
        want += b @ a
    assert t.compressions > 0 and t.k <= 2 * 5 + 12
    assert _rel(t.matrix(), want) < 1e-12
    t.compress()
    assert t.k == 5 and _rel(t.matrix(), want) < 1e-12


def test_change_norms_without_forming_the_product():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((4, 600)), rng.standard_normal((700, 4))
    ref = rng.standard_normal((700, 600))
    assert change_sq_norm(a, b) == pytest.approx(np.sum((b @ a) ** 2), rel=1e-12)
    assert change_sq_norm(a, b, ref) == pytest.approx(np.sum((b @ a - ref) ** 2), rel=1e-12)
    u = ClientUpdate("c", "t", 1, 1, frozenset({"language"}),
                     {f"{LQ}.lora_A": a.astype(np.float32), f"{LQ}.lora_B": b.astype(np.float32)})
    dense = np.linalg.norm(delta(a.astype(np.float32), b.astype(np.float32)) - ref)
    assert deviation_norm(u, {LQ: ref}) == pytest.approx(dense, rel=1e-12)


def test_low_rank_dp_and_clipping_match_the_dense_formulas():
    """Central DP (no noise) and norm clipping with a reference on low-rank sums: the same
    centre as the dense formulas of cloud.robust (clip jointly, unweighted mean of changes)."""
    d_out, d_in, rank = 60, 50, 2
    rng = np.random.default_rng(8)
    sent = _clients(rng, d_out, d_in, rank, 5, "independent")
    spec = AggregationSpec("t", {LQ: ModuleSpec("language", rank, d_in, d_out)})
    ref = rng.standard_normal((d_out, d_in))
    for use_ref in (False, True):
        refs = {LQ: ref} if use_ref else {}
        clip = 3.0
        acc = _accumulate(spec, sent, centers={"language": ModalityRule(dp_clip=clip)},
                          reference=refs)
        assert acc.width(LQ) is not None  # the DP sums stayed low rank
        r = acc.finalize()
        base = ref if use_ref else np.zeros((d_out, d_in))
        changes = [delta(a, b) - base for _, a, b in sent]
        clipped = [c * min(1.0, clip / np.linalg.norm(c)) for c in changes]
        want = base + np.mean(clipped, 0)
        got = acc._center(LQ, spec.modules[LQ], r.dp)
        assert _rel(got, want) < 1e-12 and r.dp["language"]["clipped"] == 5
    # norm clipping (shrink) with a dense reference: folded exactly (densified at finalize)
    acc = DeltaAccumulator(spec, reference={LQ: ref})
    for i, (w, a, b) in enumerate(sent):
        acc.add(ClientUpdate(f"c{i}", "t", 1, w, frozenset({"language"}),
                             {f"{LQ}.lora_A": a, f"{LQ}.lora_B": b}), shrink=0.5 if i == 2 else 1.0)
    moved = [(w, delta(a, b) if i != 2 else ref + 0.5 * (delta(a, b) - ref))
             for i, (w, a, b) in enumerate(sent)]
    want = sum(w * x for w, x in moved) / sum(w for w, _ in moved)
    assert _rel(acc.mean_delta(LQ), want) < 1e-12
    res = acc.finalize().modules[LQ]
    a32, b32 = svd_factors(want, rank)
    assert _rel(product(acc.finalize(), LQ), delta(a32.astype(np.float32), b32.astype(np.float32))) < 1e-6
    assert res.error > 0


def test_small_modules_keep_the_dense_sum(monkeypatch):
    """At the project's own widths (≤ 2**16 weights a module) the sum is the dense float64 one
    from the first client, so the default runs' results are bit for bit what they were."""
    monkeypatch.setattr(aggregation, "DENSE_BELOW", 1 << 16)
    assert not aggregation.LowRankSum(128, 128, 8).low_rank
    assert not aggregation.LowRankSum(64, 256, 8).low_rank
    assert aggregation.LowRankSum(300, 300, 8).low_rank


def test_server_step_extrapolates_the_change_from_the_reference():
    """server_lr η: the new ΔW is W_ref + η·(ΔW̄ − W_ref), re-factored by the same truncated SVD
    (error measured against that target); η = 1 is the plain mean; bad η and rule are refused."""
    d_out, d_in, rank = 30, 20, 2
    rng = np.random.default_rng(12)
    spec = AggregationSpec("t", {LQ: ModuleSpec("language", rank, d_in, d_out)})
    b0, a0 = rng.standard_normal((d_out, rank)), rng.standard_normal((rank, d_in))
    ref = b0 @ a0  # the expert before the round (rank r, as the cloud holds it)
    # clients that kept A and moved B along one shared direction u·mix (rank-r updates, the
    # mean and its extrapolation stay rank r, so the SVD re-factoring is exact)
    u = rng.standard_normal((d_out, 1))
    mix = rng.standard_normal((1, rank))
    sent = [(3, a0.astype(np.float32), (b0 + 1.0 * u @ mix).astype(np.float32)),
            (1, a0.astype(np.float32), (b0 + 5.0 * u @ mix).astype(np.float32))]
    mean = sum(w * delta(a, b) for w, a, b in sent) / 4  # = ref + 2·u·(mix a0), up to fp32
    for eta in (1.0, 2.5):
        acc = _accumulate(spec, sent, reference={LQ: ref}, server_lr=eta)
        res = acc.finalize().modules[LQ]
        want = ref + eta * (mean - ref)
        assert _rel(product(acc.finalize(), LQ), want) < 1e-5  # rank r: exact up to float32
        assert res.error < 1e-5
    # without a reference (a task's first round: B = 0) the step scales the mean
    acc = _accumulate(spec, sent, server_lr=3.0)
    assert _rel(product(acc.finalize(), LQ), 3.0 * mean) < 1e-5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="server_lr"):
            DeltaAccumulator(spec, server_lr=bad)
    with pytest.raises(ValueError, match="needs rule 'svd'"):
        DeltaAccumulator(spec, "fedavg-ab", server_lr=2.0)
