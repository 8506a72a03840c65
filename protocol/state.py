"""The cloud's global state, and its atomic checkpoint (one file, replaced whole every round).

Everything a resumed run needs to continue exactly where it stopped: the expert plan, every
task's global LoRA factors, every task's router (autoencoder weights and τ), co-activation
partners, the last finished server round, the accuracy matrix so far, rejection counters,
communication counters and the per-round log.

File: ``OUT/checkpoint.safetensors`` — tensors ``expert/<task>/<key>`` and ``router/<task>/<key>``,
and the JSON state in the safetensors metadata (key ``fedmole-state``). Written to a temp file in
the same folder, fsynced, then ``os.replace``d over the old one: a crash at any point leaves the
previous round's checkpoint or the new one, never a torn file. A corrupt or foreign file is a
:class:`CheckpointError` that names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from protocol.plan import ExpertPlan, PlanError

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "fedmole-cloud-state"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


@dataclass
class GlobalState:
    plan: ExpertPlan
    method: str
    round: int = 0  # the last finished global server round
    experts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # task → factors
    routers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # task → AE state
    thresholds: dict[str, float] = field(default_factory=dict)  # task → τ
    partners: dict[str, list[str]] = field(default_factory=dict)  # task → co-activated tasks
    acc_matrix: dict[int, list[float]] = field(default_factory=dict)  # row t; NaN: not measured
    router_acc: dict[int, float] = field(default_factory=dict)  # task index → % routed right
    # row t → task → every metric of it (test-count-weighted over the clients that hold it)
    task_scores: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)  # reason → count
    # Flower node id → reason → count: which node sent what was rejected or repaired
    rejected_by_node: dict[str, dict[str, int]] = field(default_factory=dict)
    comm: dict[str, Any] = field(default_factory=dict)  # see cloud.comm
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per-round log

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "method": self.method, "round": self.round,
                "plan": self.plan.to_json(), "thresholds": self.thresholds,
                "partners": self.partners,
                "acc_matrix": {str(k): v for k, v in self.acc_matrix.items()},
                "router_acc": {str(k): v for k, v in self.router_acc.items()},
                "task_scores": {str(k): v for k, v in self.task_scores.items()},
                "rejected": dict(self.rejected),
                "rejected_by_node": self.rejected_by_node, "comm": self.comm, "rounds": self.rounds}


def _nan_safe(obj: Any) -> Any:
    """JSON has no NaN: a missing accuracy (no client held the task) is null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_safe(v) for v in obj]
    return obj


def save_checkpoint(state: GlobalState, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    tensors = {f"expert/{t}/{k}": np.ascontiguousarray(v) for t, d in state.experts.items()
               for k, v in d.items()}
    tensors.update({f"router/{t}/{k}": np.ascontiguousarray(v) for t, d in state.routers.items()
                    for k, v in d.items()})
    meta = json.dumps(_nan_safe(state.meta()))
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fedmole-state": meta})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def load_checkpoint(folder: Path) -> GlobalState:
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; start without --resume")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "np") as f:
            raw = (f.metadata() or {}).get("fedmole-state")
        meta = json.loads(raw) if raw else None
    except Exception as e:  # safetensors / JSON raise several types on corrupt files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}: {e}); "
                              "delete it to start over, or restore a backup") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} v{VERSION} checkpoint")
    try:
        plan = ExpertPlan.from_json(meta["plan"])
        state = GlobalState(
            plan=plan, method=str(meta["method"]), round=int(meta["round"]),
            thresholds={k: float(v) for k, v in meta["thresholds"].items()},
            partners={k: list(v) for k, v in meta["partners"].items()},
            acc_matrix={int(k): [float("nan") if x is None else float(x) for x in v]
                        for k, v in meta["acc_matrix"].items()},
            router_acc={int(k): float(v) for k, v in meta.get("router_acc", {}).items()},
            task_scores={int(k): {str(t): {str(m): float(x) for m, x in d.items()}
                                  for t, d in v.items()}
                         for k, v in meta.get("task_scores", {}).items()},
            rejected=Counter(meta["rejected"]),
            rejected_by_node={str(k): {str(r): int(n) for r, n in v.items()}
                              for k, v in meta.get("rejected_by_node", {}).items()},
            comm=dict(meta["comm"]), rounds=list(meta["rounds"]))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, PlanError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has a malformed state ({e}); delete it to "
                              "start over") from e
    for key, v in tensors.items():
        kind, _, rest = key.partition("/")
        task, _, name = rest.partition("/")
        if kind not in ("expert", "router") or not name:
            raise CheckpointError(f"checkpoint {str(path)!r} has an unknown tensor {key!r}")
        (state.experts if kind == "expert" else state.routers).setdefault(task, {})[name] = v
    return state
