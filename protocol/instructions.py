"""What the cloud sends in each round: the instruction (a ConfigRecord) and the global state a
client needs (an ArrayRecord of experts and routers).

Instruction keys (all rounds carry ``phase``, ``task``, ``task-index``, ``global-round``,
``method`` and ``plan``, the cumulative expert plan as JSON)::

    probe     router-seed  seed of task t's shared autoencoder init (clients draw the same one)
    train     train-round (1..R), rounds (R), partners (JSON list: older experts active, frozen),
              router-fit (fit task t's AE further this round?)
    evaluate  seen (tasks trained so far), partners (JSON {task: [partner, …]})
    probe, evaluate   thresholds (JSON {task: τ}) for the routers sent along

Arrays: ``expert/<task>/<module>.lora_A|lora_B`` and ``router/<task>/<AE key>``, matrices in
``federation.downlink-compression`` (int8 ones with ``"<key>::scale"`` beside them). Only what the
round needs travels: task t's experts (and its partners') in training, every seen task's in
evaluation, older routers in the probe (clients count co-activation votes with them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from protocol.compression import compress, decompress
from protocol.plan import ExpertPlan, PlanError
from protocol.updates import MessageError, check_numeric, finite_number

PHASES = ("probe", "train", "evaluate")
# The FedAvg baselines train one adapter under this name for every task (no probe, no router).
SHARED = "shared"


def is_shared(method: str) -> bool:
    """Whether ``federation.method`` is a one-shared-adapter FedAvg baseline."""
    return method.startswith("fedavg-")


@dataclass(frozen=True)
class Instruction:
    phase: str
    task: str
    task_index: int
    global_round: int
    method: str
    plan: ExpertPlan
    train_round: int = 0
    rounds: int = 0
    partners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # task → partners
    seen: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    router_fit: bool = False
    router_seed: int = 0

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "phase": self.phase, "task": self.task, "task-index": self.task_index,
            "global-round": self.global_round, "method": self.method,
            "plan": json.dumps(self.plan.to_json()), "train-round": self.train_round,
            "rounds": self.rounds, "partners": json.dumps({k: list(v) for k, v in self.partners.items()}),
            "seen": json.dumps(list(self.seen)), "thresholds": json.dumps(dict(self.thresholds)),
            "router-fit": self.router_fit, "router-seed": self.router_seed,
        })

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Instruction:
        """Parse a round's ConfigRecord; a missing or malformed key is a :class:`MessageError`."""
        def get(key: str, kind: type) -> Any:
            if key not in rec:
                raise MessageError(f"round instruction lacks `{key}`")
            v = rec[key]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise MessageError(f"round instruction `{key}` must be {kind.__name__}, got {v!r}")
            return v

        def js(key: str) -> Any:
            try:
                return json.loads(get(key, str))
            except (ValueError, RecursionError) as e:  # bad JSON, a 4300+-digit int, nesting too deep
                raise MessageError(f"round instruction `{key}` is not valid JSON: {e}") from e

        phase = get("phase", str)
        if phase not in PHASES:
            raise MessageError(f"round instruction `phase` must be one of {PHASES}, got {phase!r}")
        try:
            plan = ExpertPlan.from_json(js("plan"))
        except PlanError as e:
            raise MessageError(f"round instruction `plan`: {e}") from e
        partners, seen, thresholds = js("partners"), js("seen"), js("thresholds")
        if not (isinstance(partners, dict) and all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                                                   for v in partners.values())):
            raise MessageError(f"round instruction `partners` must map task → list of tasks, "
                               f"got {partners!r}")
        if not (isinstance(seen, list) and all(isinstance(t, str) for t in seen)):
            raise MessageError(f"round instruction `seen` must be a list of tasks, got {seen!r}")
        if not (isinstance(thresholds, dict) and all(finite_number(v) for v in thresholds.values())):
            raise MessageError(f"round instruction `thresholds` must map task → finite τ, got {thresholds!r}")
        return cls(phase=phase, task=get("task", str), task_index=get("task-index", int),
                   global_round=get("global-round", int), method=get("method", str), plan=plan,
                   train_round=get("train-round", int), rounds=get("rounds", int),
                   partners={k: tuple(v) for k, v in partners.items()}, seen=tuple(seen),
                   thresholds={k: float(v) for k, v in thresholds.items()},
                   router_fit=get("router-fit", bool), router_seed=get("router-seed", int))


def _wire(tensors: Mapping[str, np.ndarray], compression: str) -> dict[str, np.ndarray]:
    """One group's tensors as they travel: matrices in ``compression``, vectors (biases) as
    float32 (int8 with a scale per row would cost 5 bytes a value); "none" sends them as held."""
    if compression == "none":
        return dict(tensors)
    mats = {k: v for k, v in tensors.items() if np.ndim(v) >= 2}
    rest = {k: np.asarray(v, np.float32) for k, v in tensors.items() if np.ndim(v) < 2}
    return {**compress(mats, compression), **rest}


def as_sent(tensors: Mapping[str, np.ndarray], compression: str) -> dict[str, np.ndarray]:
    """``tensors`` as a client decodes them after the trip in ``compression``: the cloud holds its
    global state in this form, so what the clients train from and are scored with is what it
    holds, checkpoints and publishes (for "none": float32 copies)."""
    return decompress(_wire(tensors, compression))


def pack_state(experts: Mapping[str, Mapping[str, np.ndarray]],
               routers: Mapping[str, Mapping[str, np.ndarray]],
               compression: str = "none") -> ArrayRecord:
    """Experts and routers → the round's ArrayRecord (``compression`` as in
    protocol.compression, matrices only; ``"<key>::scale"`` keys beside int8 ones)."""
    arrays = {f"expert/{t}/{k}": v for t, d in experts.items() for k, v in _wire(d, compression).items()}
    arrays.update({f"router/{t}/{k}": v for t, d in routers.items()
                   for k, v in _wire(d, compression).items()})
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def unpack_state(rec: ArrayRecord) -> tuple[dict[str, dict[str, np.ndarray]],
                                            dict[str, dict[str, np.ndarray]]]:
    """ArrayRecord → (experts: task → {key: array}, routers: task → {key: array})."""
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {"expert": {}, "router": {}}
    for key in rec:
        kind, _, rest = key.partition("/")
        task, _, name = rest.partition("/")
        if kind not in out or not task or not name:
            raise MessageError(f"global state key {key!r} is not 'expert/<task>/<key>' or "
                               "'router/<task>/<key>'")
        try:
            x = rec[key].numpy()
        except Exception as e:  # corrupt bytes / dtype
            raise MessageError(f"global state array {key!r} cannot be decoded: {e}") from e
        out[kind].setdefault(task, {})[name] = check_numeric(x, f"global state array {key!r}")
    try:  # int8 matrices with their scales → float32 (a no-op for float arrays)
        return ({t: decompress(d) for t, d in out["expert"].items()},
                {t: decompress(d) for t, d in out["router"].items()})
    except ValueError as e:
        raise MessageError(f"global state arrays: {e}") from e
