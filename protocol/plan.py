"""The expert plan: which module holds an expert of which task (D-MoLE's cumulative A_t(m)).

The cloud's allocator turns task t's proxy scores into a :class:`TaskAllocation`; the plan
accumulates them, ``A_t(m) = A_{t-1}(m) ∪ {t}`` for every chosen module m, and both sides read it:
clients attach task t's experts on ``modules_of(t)``, the cloud aggregates them per modality. A
module with no task gets no LoRA at all. The plan travels and is stored as JSON (never pickle)::

    {"version": 1, "tasks": ["color", ...], "modality_of": {"<module>": "vision", ...},
     "experts": [{"module": ..., "modality": ..., "task": ..., "rank": 8, "alpha": 16}, ...],
     "allocations": [{"task": ..., "budget": 12, "per_modality": {...}, "shares": {...},
                      "modules": [...], "seconds": 0.0001}, ...]}

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.checks import finite_number

PLAN_VERSION = 1

_PLAN_KEYS = ("version", "tasks", "modality_of", "experts", "allocations")
_EXPERT_KEYS = ("module", "modality", "task", "rank", "alpha")
_ALLOC_KEYS = ("task", "budget", "per_modality", "shares", "modules", "seconds")


class PlanError(ValueError):
    """An expert plan (or one of its parts) is invalid; the message names the field and value."""


@dataclass(frozen=True)
class ExpertSpec:
    """One LoRA expert: task ``task``'s adapter on module ``module``."""

    module: str
    modality: str
    task: str
    rank: int
    alpha: int


@dataclass(frozen=True)
class TaskAllocation:
    """The allocator's answer for one task (see ``cloud.allocator``)."""

    task: str
    budget: int  # B: the number of new experts
    per_modality: dict[str, int]  # n_k, Σ n_k = B
    shares: dict[str, float]  # π_k: each modality's share of the proxy's gradient mass
    modules: tuple[str, ...]  # the chosen modules, in a deterministic order
    seconds: float  # wall time of the allocation


# ---------------------------------------------------------------------------------------------
# validation helpers: every error names the field (a JSON path) and the bad value


def _bad(field: str, rule: str, value: Any) -> PlanError:
    return PlanError(f"plan field `{field}` must be {rule}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name(v: Any, field: str) -> str:
    if not isinstance(v, str) or not v:
        raise _bad(field, "a non-empty string", v)
    return v


def _object(v: Any, field: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise _bad(field, "a JSON object", v)
    unknown = [k for k in v if k not in keys]
    if unknown:
        raise PlanError(f"plan field `{field}` has unknown keys {unknown}; known: {', '.join(keys)}")
    missing = [k for k in keys if k not in v]
    if missing:
        raise PlanError(f"plan field `{field}` is missing keys {missing}")
    return v


def _list(v: Any, field: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise _bad(field, "a list", v)
    return list(v)


def _check_modality_of(modality_of: Any) -> dict[str, str]:
    if not isinstance(modality_of, Mapping) or not modality_of:
        raise _bad("modality_of", "a non-empty object {module: modality}", modality_of)
    return {_name(m, "modality_of"): _name(mod, f"modality_of.{m}") for m, mod in modality_of.items()}


def _check_allocation(a: TaskAllocation, modality_of: Mapping[str, str], field: str) -> None:
    """The invariants every allocation keeps: B ≥ 1, Σ n_k = B = |modules|, counts match."""
    _name(a.task, f"{field}.task")
    if not _is_int(a.budget) or a.budget < 1:
        raise _bad(f"{field}.budget", "an integer >= 1", a.budget)
    modalities = set(modality_of.values())
    for mod, n in a.per_modality.items():
        if mod not in modalities:
            raise _bad(f"{field}.per_modality", f"keyed by known modalities {sorted(modalities)}", mod)
        if not _is_int(n) or n < 0:
            raise _bad(f"{field}.per_modality.{mod}", "an integer >= 0", n)
    for mod, s in a.shares.items():
        if mod not in modalities:
            raise _bad(f"{field}.shares", f"keyed by known modalities {sorted(modalities)}", mod)
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s <= 1:
            raise _bad(f"{field}.shares.{mod}", "a number in [0, 1]", s)
    if len(set(a.modules)) != len(a.modules):
        raise _bad(f"{field}.modules", "without repeats", list(a.modules))
    for m in a.modules:
        if m not in modality_of:
            raise _bad(f"{field}.modules", "candidate modules listed in `modality_of`", m)
    counted = {mod: sum(1 for m in a.modules if modality_of[m] == mod) for mod in modalities}
    if any(a.per_modality.get(mod, 0) != n for mod, n in counted.items()):
        raise _bad(f"{field}.per_modality", f"the count of its modules per modality {counted}",
                   a.per_modality)
    if len(a.modules) != a.budget:
        raise _bad(f"{field}.budget", f"the number of its modules ({len(a.modules)})", a.budget)
    if not finite_number(a.seconds) or a.seconds < 0:
        raise _bad(f"{field}.seconds", "a finite number >= 0", a.seconds)


def _allocation_from_json(d: Any, field: str) -> TaskAllocation:
    d = _object(d, field, _ALLOC_KEYS)
    for key in ("per_modality", "shares"):
        if not isinstance(d[key], Mapping):
            raise _bad(f"{field}.{key}", "a JSON object {modality: value}", d[key])
    modules = _list(d["modules"], f"{field}.modules")
    for m in modules:
        _name(m, f"{field}.modules")
    return TaskAllocation(task=d["task"], budget=d["budget"], per_modality=dict(d["per_modality"]),
                          shares=dict(d["shares"]), modules=tuple(modules), seconds=d["seconds"])


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertPlan:
    """The cumulative plan over the tasks allocated so far (immutable: ``with_task`` copies)."""

    tasks: tuple[str, ...]
    experts: tuple[ExpertSpec, ...]
    allocations: tuple[TaskAllocation, ...]
    modality_of: dict[str, str]  # every candidate module → its modality, in model order

    @classmethod
    def empty(cls, modality_of: Mapping[str, str]) -> ExpertPlan:
        """A plan with no task yet over the candidate modules of ``modality_of``."""
        return cls(tasks=(), experts=(), allocations=(), modality_of=_check_modality_of(modality_of))

    def _known_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not in the plan; tasks: {list(self.tasks)}")

    def modules_of(self, task: str) -> list[str]:
        """The modules holding an expert of ``task``, in the allocation's order."""
        self._known_task(task)
        return [e.module for e in self.experts if e.task == task]

    def tasks_at(self, module: str) -> list[str]:
        """A_t(m): the tasks with an expert on ``module``, in task order ([] if none)."""
        if module not in self.modality_of:
            raise ValueError(f"module {module!r} is not a candidate module of this plan")
        return [e.task for e in self.experts if e.module == module]

    def experts_per_modality(self, task: str) -> dict[str, int]:
        """Number of ``task``'s experts in each modality (every modality listed, 0 if none)."""
        self._known_task(task)
        out = dict.fromkeys(sorted(set(self.modality_of.values())), 0)
        for e in self.experts:
            if e.task == task:
                out[e.modality] += 1
        return out

    def with_task(self, alloc: TaskAllocation, rank: int, alpha: int) -> ExpertPlan:
        """A new plan with ``alloc``'s experts (rank, alpha) added; a task can be added once."""
        if alloc.task in self.tasks:
            raise ValueError(f"task {alloc.task!r} is already in the plan; tasks: {list(self.tasks)}")
        if not _is_int(rank) or rank <= 0:
            raise _bad("experts.rank", "an integer > 0", rank)
        if not _is_int(alpha) or alpha <= 0:
            raise _bad("experts.alpha", "an integer > 0", alpha)
        _check_allocation(alloc, self.modality_of, f"allocations[{len(self.allocations)}]")
        new = tuple(ExpertSpec(m, self.modality_of[m], alloc.task, rank, alpha) for m in alloc.modules)
        return ExpertPlan(tasks=(*self.tasks, alloc.task), experts=self.experts + new,
                          allocations=(*self.allocations, alloc), modality_of=self.modality_of)

    # -- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "tasks": list(self.tasks),
            "modality_of": dict(self.modality_of),
            "experts": [{"module": e.module, "modality": e.modality, "task": e.task,
                         "rank": e.rank, "alpha": e.alpha} for e in self.experts],
            "allocations": [{"task": a.task, "budget": a.budget, "per_modality": dict(a.per_modality),
                             "shares": dict(a.shares), "modules": list(a.modules),
                             "seconds": a.seconds} for a in self.allocations],
        }

    @classmethod
    def from_json(cls, d: Any) -> ExpertPlan:
        """Validate a parsed plan; every error names the field and the bad value."""
        d = _object(d, "<plan>", _PLAN_KEYS)
        if not _is_int(d["version"]) or d["version"] != PLAN_VERSION:
            raise _bad("version", f"{PLAN_VERSION} (the only plan format this code reads)", d["version"])
        tasks = [_name(t, "tasks") for t in _list(d["tasks"], "tasks")]
        if len(set(tasks)) != len(tasks):
            raise _bad("tasks", "a list without repeats", tasks)
        modality_of = _check_modality_of(d["modality_of"])
        experts: list[ExpertSpec] = []
        seen: set[tuple[str, str]] = set()
        for i, e in enumerate(_list(d["experts"], "experts")):
            f = f"experts[{i}]"
            e = _object(e, f, _EXPERT_KEYS)
            module, task = _name(e["module"], f"{f}.module"), _name(e["task"], f"{f}.task")
            if module not in modality_of:
                raise _bad(f"{f}.module", "a candidate module listed in `modality_of`", module)
            if e["modality"] != modality_of[module]:
                raise _bad(f"{f}.modality", f"{modality_of[module]!r} (its module's modality)",
                           e["modality"])
            if task not in tasks:
                raise _bad(f"{f}.task", f"one of the plan's tasks {tasks}", task)
            for key in ("rank", "alpha"):
                if not _is_int(e[key]) or e[key] <= 0:
                    raise _bad(f"{f}.{key}", "an integer > 0", e[key])
            if (module, task) in seen:
                raise _bad(f, "unique per (module, task)", (module, task))
            seen.add((module, task))
            experts.append(ExpertSpec(module, e["modality"], task, e["rank"], e["alpha"]))
        allocs = [_allocation_from_json(a, f"allocations[{i}]")
                  for i, a in enumerate(_list(d["allocations"], "allocations"))]
        if [a.task for a in allocs] != tasks:
            raise _bad("allocations", f"one per task, in task order {tasks}", [a.task for a in allocs])
        for i, a in enumerate(allocs):
            _check_allocation(a, modality_of, f"allocations[{i}]")
            if sorted(a.modules) != sorted(e.module for e in experts if e.task == a.task):
                raise _bad(f"allocations[{i}].modules", f"the modules of task {a.task!r}'s experts",
                           list(a.modules))
        return cls(tasks=tuple(tasks), experts=tuple(experts), allocations=tuple(allocs),
                   modality_of=modality_of)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically (temp file + ``os.replace``); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpertPlan:
        """Read a plan written by :meth:`save`; errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"expert plan {str(path)!r} cannot be read: {e}") from e
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # bad JSON, a 4300+-digit int, nesting too deep
            raise PlanError(f"expert plan {str(path)!r} is not valid JSON: {e}") from e
        try:
            return cls.from_json(d)
        except PlanError as e:
            raise PlanError(f"expert plan {str(path)!r}: {e}") from e
