"""Bounded replay buffer for continual learning on an edge client.

An edge device can keep only a few hundred past samples (``replay.buffer-size``), yet every task
seen so far should stay represented, and a client's tasks may arrive in many small batches. So the
buffer splits its capacity evenly across the tasks seen so far and keeps, within each task, a
uniform random subset of everything ever offered for it (reservoir sampling, Algorithm R):

    quota_i = capacity // n_tasks (+1 for the first capacity % n_tasks tasks, in arrival order)
    P(item x of task i is kept) = min(1, quota_i / seen_i)     for every x offered for task i

When a new task arrives the older tasks shrink to the new quota by evicting uniformly at random,
which keeps each one a uniform subset. All of the buffer's own randomness comes from one seeded
generator that is saved in ``state_dict()``, so a buffer reloaded on the device keeps and evicts
exactly what the original would have. Items are opaque (sample ids or small JSON dicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

T = TypeVar("T")

_STATE_KEYS = {"policy", "capacity", "seed", "tasks", "rng"}
_TASK_KEYS = {"name", "seen", "items"}


class ReplayBuffer(Protocol[T]):
    """What the local trainer needs from a replay buffer; policies live in ``REPLAY_POLICIES``."""

    def add(self, task: str, items: Sequence[T]) -> None: ...
    def sample(self, n: int, rng: np.random.Generator) -> list[T]: ...
    def __len__(self) -> int: ...
    def tasks(self) -> list[str]: ...
    def counts(self) -> dict[str, int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, d: dict[str, Any]) -> None: ...


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def task_quotas(capacity: int, n_tasks: int) -> list[int]:
    """Even split of ``capacity`` over ``n_tasks``; the remainder goes to the earliest tasks.

    A task's quota never grows as tasks are added, so shrinking is the only change ever needed.
    """
    base, rem = divmod(capacity, n_tasks)
    return [base + (1 if i < rem else 0) for i in range(n_tasks)]


def _bad(field: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"replay state `{field}` must be {rule}, got {value!r}")


def _validate_state(d: Any, policy: str, capacity: int) -> np.random.Generator:
    """Check a ``state_dict()`` snapshot against the buffer's invariants; return its RNG."""
    if not isinstance(d, dict):
        raise ValueError(f"replay state must be a dict, got {type(d).__name__}")
    if unknown := sorted(set(d) - _STATE_KEYS):
        raise ValueError(f"replay state has unknown keys {unknown}; known: {sorted(_STATE_KEYS)}")
    if missing := sorted(_STATE_KEYS - set(d)):
        raise ValueError(f"replay state is missing keys {missing}")
    if d["policy"] != policy:
        raise _bad("policy", repr(policy), d["policy"])
    if d["capacity"] != capacity:
        raise _bad(
            "capacity",
            f"this buffer's {capacity} (restore `replay.buffer-size`, or load with "
            "BalancedReservoirBuffer.from_state_dict)",
            d["capacity"],
        )
    if not _is_int(d["seed"]) or d["seed"] < 0:
        raise _bad("seed", "an integer >= 0", d["seed"])
    tasks = d["tasks"]
    if not isinstance(tasks, list):
        raise _bad("tasks", "a list", type(tasks).__name__)
    quotas = task_quotas(capacity, len(tasks)) if tasks else []
    names: set[str] = set()
    for i, (t, q) in enumerate(zip(tasks, quotas, strict=True)):
        f = f"tasks[{i}]"
        if not isinstance(t, dict) or set(t) != _TASK_KEYS:
            raise _bad(f, f"a dict with keys {sorted(_TASK_KEYS)}", t)
        name, seen, items = t["name"], t["seen"], t["items"]
        if not isinstance(name, str) or not name or name in names:
            raise _bad(f"{f}.name", "a non-empty string not used by an earlier task", name)
        if not isinstance(items, list):
            raise _bad(f"{f}.items", "a list", type(items).__name__)
        if len(items) > q:
            raise _bad(f"{f}.items", f"at most its quota of {q} items (capacity {capacity}, "
                       f"{len(tasks)} tasks)", f"{len(items)} items")
        # Below quota nothing was ever dropped, so seen == kept there (Algorithm R's fill phase).
        if not _is_int(seen) or seen < len(items) or (len(items) < q and seen != len(items)):
            raise _bad(f"{f}.seen", f"an integer >= its {len(items)} items, and equal to it "
                       f"while below quota {q}", seen)
        names.add(name)
    rng = np.random.default_rng()
    state = d["rng"]
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise _bad("rng", "a numpy PCG64 bit_generator.state dict", state)
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as e:
        raise _bad("rng", f"a valid PCG64 state ({e})", state) from e
    return rng


class BalancedReservoirBuffer(Generic[T]):
    """Per-task reservoirs with equal shares of ``capacity`` (policy ``"balanced-reservoir"``)."""

    policy = "balanced-reservoir"

    def __init__(self, capacity: int, seed: int) -> None:
        if not _is_int(capacity) or capacity <= 0:
            raise ValueError(f"`replay.buffer-size` must be > 0, got {capacity!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"replay buffer `seed` must be an integer >= 0, got {seed!r}")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        # Insertion (= arrival) order matters: it decides who gets the remainder of the split.
        self._items: dict[str, list[T]] = {}
        self._seen: dict[str, int] = {}

    # -- filling ---------------------------------------------------------------------------
    def add(self, task: str, items: Sequence[T]) -> None:
        """Offer ``items`` of ``task``; an empty offer does not register a new task."""
        if not isinstance(task, str) or not task:
            raise ValueError(f"replay task name must be a non-empty string, got {task!r}")
        n = len(items)  # a lazy sequence (protocol.llava_format.TaskSamples) stays lazy:
        if not n:       # only the items kept are taken from it
            return
        if task not in self._items:
            self._items[task] = []
            self._seen[task] = 0
            self._shrink_to_quotas()
        k = task_quotas(self.capacity, len(self._items))[list(self._items).index(task)]
        kept, seen = self._items[task], self._seen[task]
        # Fill phase: below quota nothing was ever dropped (quotas only shrink, and a shrink
        # leaves a task exactly at quota), so keeping everything here is Algorithm R.
        n_fill = max(0, min(k - len(kept), n))
        kept.extend(items[i] for i in range(n_fill))
        seen += n_fill
        n_rest = n - n_fill
        if n_rest and k > 0:
            # The m-th later item is the (seen+m+1)-th ever offered: keep it with probability
            # k/(seen+m+1) by overwriting a uniform slot. One vectorised draw per call.
            js = self._rng.integers(0, seen + 1 + np.arange(n_rest))  # (n_rest,)
            for m, j in enumerate(js.tolist()):
                if j < k:
                    kept[j] = items[n_fill + m]
        self._seen[task] = seen + n_rest

    def _shrink_to_quotas(self) -> None:
        """Evict uniformly at random down to each task's quota (a uniform subset stays uniform)."""
        quotas = task_quotas(self.capacity, len(self._items))
        for (name, kept), q in zip(list(self._items.items()), quotas, strict=True):
            if len(kept) > q:
                keep = np.sort(self._rng.choice(len(kept), size=q, replace=False))
                self._items[name] = [kept[i] for i in keep.tolist()]

    # -- reading ---------------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> list[T]:
        """Draw ``n`` items: a task uniformly (among non-empty ones), then an item within it.

        Balanced by task, not by item, so a task squeezed to a small quota is not drowned out.
        Without replacement while ``n <= len(self)`` (exhausted tasks drop out of the draw);
        with replacement beyond that. ``rng`` is the caller's, so sampling never perturbs the
        buffer's own keep/evict stream (and a reload stays exact).
        """
        if not _is_int(n) or n < 0:
            raise ValueError(f"replay sample size must be an integer >= 0, got {n!r}")
        if len(self) == 0:
            raise ValueError(
                "cannot sample from an empty replay buffer; add() items first, or give the "
                "replay part of the batch 0 samples (see mix_batch_sizes)"
            )
        pools = [list(v) for v in self._items.values() if v]
        out: list[T] = []
        if n > len(self):
            for _ in range(n):
                pool = pools[int(rng.integers(len(pools)))]
                out.append(pool[int(rng.integers(len(pool)))])
            return out
        for _ in range(n):
            live = [p for p in pools if p]
            pool = live[int(rng.integers(len(live)))]
            out.append(pool.pop(int(rng.integers(len(pool)))))
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self._items.values())

    def tasks(self) -> list[str]:
        """Tasks in arrival order."""
        return list(self._items)

    def counts(self) -> dict[str, int]:
        """Items currently kept per task."""
        return {k: len(v) for k, v in self._items.items()}

    def seen(self) -> dict[str, int]:
        """Items ever offered per task."""
        return dict(self._seen)

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable (when the items are) snapshot, including the RNG state."""
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "seed": self.seed,
            "tasks": [
                {"name": k, "seen": self._seen[k], "items": list(v)}
                for k, v in self._items.items()
            ],
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a snapshot; validated in full before anything is changed.

        ``capacity`` must match this buffer's (a changed ``replay.buffer-size`` would silently
        break the quotas); use :meth:`from_state_dict` to adopt the saved capacity instead.
        """
        rng = _validate_state(d, self.policy, self.capacity)
        self.seed = int(d["seed"])
        self._rng = rng
        self._items = {t["name"]: list(t["items"]) for t in d["tasks"]}
        self._seen = {t["name"]: int(t["seen"]) for t in d["tasks"]}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> BalancedReservoirBuffer[Any]:
        """A buffer with the saved capacity and seed, restored from ``d``."""
        if not isinstance(d, dict) or "capacity" not in d or "seed" not in d:
            raise ValueError("replay state must be a dict with `capacity` and `seed` keys")
        buf: BalancedReservoirBuffer[Any] = cls(d["capacity"], d["seed"])
        buf.load_state_dict(d)
        return buf


REPLAY_POLICIES: dict[str, Callable[[int, int], ReplayBuffer[Any]]] = {
    "balanced-reservoir": BalancedReservoirBuffer,
}


def make_replay_buffer(policy: str, capacity: int, seed: int) -> ReplayBuffer[Any]:
    """Build the buffer named by ``replay.policy``."""
    if policy not in REPLAY_POLICIES:
        raise ValueError(
            f"`replay.policy` must be one of {', '.join(sorted(REPLAY_POLICIES))}, got {policy!r}"
        )
    return REPLAY_POLICIES[policy](capacity, seed)


def mix_batch_sizes(batch_size: int, mix_ratio: float, buffer_len: int) -> tuple[int, int]:
    """Split a batch into ``(n_current, n_replay)``.

    ``n_replay`` is ``batch_size * mix_ratio`` rounded half up (not Python's half-to-even), but
    at least 1 whenever replay is on (buffer non-empty, ratio > 0) so small batches still
    rehearse, and at most ``batch_size - 1`` so every batch still learns the current task.
    """
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"`train.batch-size` must be > 0, got {batch_size!r}")
    if not 0 <= mix_ratio < 1:
        raise ValueError(f"`replay.mix-ratio` must be in [0, 1), got {mix_ratio!r}")
    if not _is_int(buffer_len) or buffer_len < 0:
        raise ValueError(f"replay buffer length must be an integer >= 0, got {buffer_len!r}")
    if buffer_len == 0 or mix_ratio == 0:
        return batch_size, 0
    n_replay = min(max(int(np.floor(batch_size * mix_ratio + 0.5)), 1), batch_size - 1)
    return batch_size - n_replay, n_replay
