"""Replay buffer: bounds, balance, reservoir uniformity, exact persistence, registry, batch mix."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest

from edge.replay import (
    REPLAY_POLICIES,
    BalancedReservoirBuffer,
    ReplayBuffer,
    make_replay_buffer,
    mix_batch_sizes,
)


def _filled(capacity: int = 12, seed: int = 0) -> BalancedReservoirBuffer[Any]:
    buf: BalancedReservoirBuffer[Any] = BalancedReservoirBuffer(capacity, seed)
    buf.add("a", [f"a{i}" for i in range(30)])
    buf.add("b", [{"id": i, "task": "b"} for i in range(30)])  # small JSON dicts as items
    return buf


def _keep_frequency(chunks: list[range], seeds: int, capacity: int = 100) -> np.ndarray:
    """Fraction of seeds in which each offered item 0..N-1 ends up kept."""
    n_items = sum(len(c) for c in chunks)
    kept = np.zeros(n_items)
    for seed in range(seeds):
        buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(capacity, seed)
        for c in chunks:
            buf.add("t", list(c))
        kept[buf.sample(len(buf), np.random.default_rng(0))] += 1
    return kept / seeds


def test_satisfies_protocol_and_registry() -> None:
    buf: ReplayBuffer[str] = make_replay_buffer("balanced-reservoir", 10, 0)
    assert isinstance(buf, BalancedReservoirBuffer)
    assert set(REPLAY_POLICIES) == {"balanced-reservoir"}


def test_unknown_policy_lists_known() -> None:
    with pytest.raises(ValueError, match=r"`replay.policy`.*balanced-reservoir.*'fifo'"):
        make_replay_buffer("fifo", 10, 0)


@pytest.mark.parametrize("capacity", [0, -3])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError, match=rf"`replay.buffer-size` must be > 0, got {capacity}"):
        BalancedReservoirBuffer(capacity, 0)


def test_capacity_never_exceeded() -> None:
    rng = np.random.default_rng(1)
    buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(50, 1)
    for step in range(200):
        task = f"t{rng.integers(8)}"
        buf.add(task, list(range(step * 100, step * 100 + int(rng.integers(0, 40)))))
        assert len(buf) <= 50
        assert sum(buf.counts().values()) == len(buf)


@pytest.mark.parametrize("capacity,n_tasks", [(100, 3), (240, 6), (10, 4), (7, 7)])
def test_balanced_across_tasks(capacity: int, n_tasks: int) -> None:
    buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(capacity, 0)
    for t in range(n_tasks):
        buf.add(f"t{t}", list(range(t * 1000, t * 1000 + 500)))
    counts = list(buf.counts().values())
    assert buf.tasks() == [f"t{t}" for t in range(n_tasks)]
    assert len(buf) == capacity
    assert all(abs(c - capacity / n_tasks) < 1 for c in counts), counts
    assert counts == sorted(counts, reverse=True)  # the remainder went to the earliest tasks
    # Every kept item still belongs to its own task after the evictions.
    for t, items in enumerate(buf.state_dict()["tasks"]):
        assert all(t * 1000 <= x < t * 1000 + 500 for x in items["items"])


def test_more_tasks_than_capacity_keeps_bound() -> None:
    buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(2, 0)
    for t in range(4):
        buf.add(f"t{t}", [t])
    assert buf.counts() == {"t0": 1, "t1": 1, "t2": 0, "t3": 0}
    assert buf.seen() == {"t0": 1, "t1": 1, "t2": 1, "t3": 1}


def test_reservoir_is_uniform() -> None:
    # 1000 items into 100 slots over 1000 seeds: each keep-frequency ~ 0.1, sd ~ 0.0095.
    freq = _keep_frequency([range(1000)], seeds=1000)
    assert freq.sum() == pytest.approx(100)
    assert np.abs(freq - 0.1).max() < 0.05
    # Early, middle and late items are kept equally often (each mean has sd ~ 0.001).
    for part in np.split(freq, 5):
        assert part.mean() == pytest.approx(0.1, abs=0.005)


def test_multi_call_add_accumulates_seen_and_stays_uniform() -> None:
    buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(100, 0)
    for start in range(0, 1000, 100):
        buf.add("t", list(range(start, start + 100)))
    assert buf.seen() == {"t": 1000} and len(buf) == 100
    # Same distribution as one big add: later chunks are not favoured (the bias of a
    # per-call reservoir that forgets `seen` would give the last chunk ~all the slots).
    freq = _keep_frequency([range(s, s + 100) for s in range(0, 1000, 100)], seeds=1000)
    for part in np.split(freq, 10):
        assert part.mean() == pytest.approx(0.1, abs=0.007)


def test_shrink_on_new_task_is_uniform() -> None:
    # A full task squeezed from 100 to 50 slots must keep a uniform subset of what it saw.
    freq = np.zeros(400)
    for seed in range(500):
        buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(100, seed)
        buf.add("old", list(range(400)))
        buf.add("new", [-1])
        freq[buf.state_dict()["tasks"][0]["items"]] += 1
    freq /= 500
    for part in np.split(freq, 4):
        assert part.mean() == pytest.approx(50 / 400, abs=0.01)


def test_state_dict_json_round_trip_continues_identically() -> None:
    a = _filled()
    state = json.loads(json.dumps(a.state_dict()))
    b: BalancedReservoirBuffer[Any] = BalancedReservoirBuffer(12, 123)  # seed is overwritten
    b.load_state_dict(state)
    c = BalancedReservoirBuffer.from_state_dict(state)
    for buf in (a, b, c):
        buf.add("b", [{"id": i, "task": "b"} for i in range(30, 80)])
        buf.add("c", [f"c{i}" for i in range(40)])
        buf.add("a", [f"a{i}" for i in range(30, 90)])
    assert json.dumps(a.state_dict()) == json.dumps(b.state_dict()) == json.dumps(c.state_dict())
    assert a.sample(5, np.random.default_rng(7)) == b.sample(5, np.random.default_rng(7))


def _corrupt(path: str, value: Any) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(json.dumps(_filled().state_dict()))
    keys = path.split(".")
    node = state
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return state


_DELETE = object()


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("extra", 1, "unknown keys ['extra']"),
        ("rng", _DELETE, "missing keys ['rng']"),
        ("policy", "fifo", "`policy`"),
        ("capacity", 13, "`capacity`"),
        ("seed", -1, "`seed`"),
        ("tasks", {}, "`tasks`"),
        ("tasks.0.items", [f"x{i}" for i in range(7)], "`tasks[0].items`"),
        ("tasks.1.items", "abc", "`tasks[1].items`"),
        ("tasks.1.name", "a", "`tasks[1].name`"),
        ("tasks.0.seen", 3, "`tasks[0].seen`"),
        ("tasks.0.seen", True, "`tasks[0].seen`"),
        ("tasks.0.bogus", 1, "`tasks[0]`"),
        ("rng.bit_generator", "MT19937", "`rng`"),
        ("rng.state", "nope", "`rng`"),
    ],
)
def test_load_state_dict_rejects_malformed(path: str, value: Any, field: str) -> None:
    buf: BalancedReservoirBuffer[Any] = BalancedReservoirBuffer(12, 0)
    before = copy.deepcopy(buf.state_dict())
    with pytest.raises(ValueError) as e:
        buf.load_state_dict(_corrupt(path, value))
    assert field in str(e.value)
    assert buf.state_dict() == before  # nothing half-loaded


def test_items_beyond_capacity_rejected() -> None:
    state = _filled().state_dict()
    state["tasks"].append({"name": "c", "seen": 1, "items": ["c0"]})  # 3 tasks → quota 4 each
    with pytest.raises(ValueError, match=r"`tasks\[0\].items`.*quota of 4"):
        BalancedReservoirBuffer(12, 0).load_state_dict(state)


def test_sample_is_balanced_across_tasks() -> None:
    buf: BalancedReservoirBuffer[str] = BalancedReservoirBuffer(12, 0)
    buf.add("small", ["s0", "s1"])  # holds 2 of its 6 slots
    buf.add("big", [f"b{i}" for i in range(100)])  # holds 6
    draws = buf.sample(4000, np.random.default_rng(0))  # > len → with replacement
    n_small = sum(x.startswith("s") for x in draws)
    assert abs(n_small - 2000) < 150  # sd ~ 32
    # Per-batch draws (no replacement) are balanced too and never repeat within a batch:
    # with batches of 2 the small task's share is exactly 1/2 (by items it would be 1/4).
    rng = np.random.default_rng(1)
    n_small = 0
    for _ in range(2000):
        batch = buf.sample(2, rng)
        assert len(set(batch)) == 2
        n_small += sum(x.startswith("s") for x in batch)
    assert abs(n_small / 4000 - 0.5) < 0.05


def test_sample_without_replacement_takes_everything() -> None:
    buf = _filled()
    all_items = buf.sample(len(buf), np.random.default_rng(0))
    assert len({json.dumps(x) for x in all_items}) == len(buf) == 12
    assert buf.sample(0, np.random.default_rng(0)) == []


def test_sample_errors() -> None:
    buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(4, 0)
    with pytest.raises(ValueError, match="empty replay buffer"):
        buf.sample(1, np.random.default_rng(0))
    buf.add("t", [1])
    with pytest.raises(ValueError, match="sample size.*-1"):
        buf.sample(-1, np.random.default_rng(0))


def test_empty_add_registers_no_task() -> None:
    buf: BalancedReservoirBuffer[int] = BalancedReservoirBuffer(4, 0)
    buf.add("t", [])
    assert buf.tasks() == [] and len(buf) == 0


@pytest.mark.parametrize(
    "batch_size,mix_ratio,buffer_len,expected",
    [
        (32, 0.25, 100, (24, 8)),
        (32, 0.25, 0, (32, 0)),  # nothing to replay yet
        (10, 0.25, 5, (7, 3)),  # 2.5 rounds half up
        (4, 0.1, 5, (3, 1)),  # 0.4 → at least 1 replayed sample
        (2, 0.9, 5, (1, 1)),  # at most batch_size - 1
        (1, 0.5, 5, (1, 0)),  # a batch of one stays on the current task
        (8, 0.0, 5, (8, 0)),
        (16, 0.5, 3, (8, 8)),  # more than the buffer holds → sampled with replacement
    ],
)
def test_mix_batch_sizes(
    batch_size: int, mix_ratio: float, buffer_len: int, expected: tuple[int, int]
) -> None:
    assert mix_batch_sizes(batch_size, mix_ratio, buffer_len) == expected


@pytest.mark.parametrize(
    "args,key", [((0, 0.25, 1), "train.batch-size"), ((8, 1.0, 1), "replay.mix-ratio"),
                 ((8, -0.1, 1), "replay.mix-ratio"), ((8, 0.25, -1), "buffer length")]
)
def test_mix_batch_sizes_rejects(args: tuple[int, float, int], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        mix_batch_sizes(*args)
