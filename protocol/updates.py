"""A client's expert update, and its encoding as a Flower message payload (``RecordDict``).

The edge sends task t's LoRA factors and the metadata the cloud weighs them by; the cloud
decodes, then validates the tensors against the expert plan (cloud.aggregation). Decoding
here checks the *envelope* only — every field present with the right type — and raises
:class:`MessageError` naming the field, so a malformed reply is rejected before any math::

    RecordDict {
      "expert": ArrayRecord { "<module>.lora_A": (r, d_in) float, "<module>.lora_B": (d_out, r) float, … }
      "meta":   ConfigRecord { "client-id": str, "task": str, "round": int, "num-examples": int,
                               "modalities": [str, …] }
    }

``num-examples`` is the key Flower's strategies weigh by (``weighted_by_key``). Arrays travel as
numpy (Flower's ArrayRecord has no bfloat16: cast at the edge).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

ARRAYS_KEY = "expert"
META_KEY = "meta"
_META_FIELDS: dict[str, type] = {"client-id": str, "task": str, "round": int, "num-examples": int}


class MessageError(ValueError):
    """A message payload is malformed; the message names the field."""


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """One client's reply: task ``task``'s expert tensors, keyed ``"<module>.lora_A"``/``".lora_B"``."""

    client_id: str
    task: str
    round: int
    n_samples: int  # > 0: the client's weight
    modalities: frozenset[str]  # the modalities the client holds
    tensors: Mapping[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(int(np.asarray(t).nbytes) for t in self.tensors.values())


def encode_update(u: ClientUpdate) -> RecordDict:
    """``ClientUpdate`` → the ``RecordDict`` a ClientApp puts in its reply."""
    arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in u.tensors.items()})
    meta = ConfigRecord({"client-id": u.client_id, "task": u.task, "round": int(u.round),
                         "num-examples": int(u.n_samples), "modalities": sorted(u.modalities)})
    return RecordDict({ARRAYS_KEY: arrays, META_KEY: meta})


def _meta_field(meta: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in meta:
        raise MessageError(f"update metadata lacks `{name}`; the client must send {sorted(_META_FIELDS)}")
    v = meta[name]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise MessageError(f"update metadata `{name}` must be {kind.__name__}, got {v!r}")
    return v


def _envelope(content: RecordDict, what: str, key: str, kind: type) -> tuple[Any, ConfigRecord]:
    """The payload record ``key`` (of type ``kind``) and the ``meta`` ConfigRecord of a reply."""
    if key not in content or META_KEY not in content:
        raise MessageError(f"{what} must carry records {key!r} and {META_KEY!r}, got {sorted(content)}")
    payload, meta = content[key], content[META_KEY]
    if not isinstance(payload, kind) or not isinstance(meta, ConfigRecord):
        raise MessageError(f"{key!r} must be an {kind.__name__} and {META_KEY!r} a ConfigRecord, "
                           f"got {type(payload).__name__} and {type(meta).__name__}")
    return payload, meta


def decode_update(content: RecordDict) -> ClientUpdate:
    """A reply's ``RecordDict`` → ``ClientUpdate``; a malformed envelope raises :class:`MessageError`."""
    arrays, meta = _envelope(content, "update", ARRAYS_KEY, ArrayRecord)
    fields = {name: _meta_field(meta, name, kind) for name, kind in _META_FIELDS.items()}
    raw = meta.get("modalities")
    if not isinstance(raw, list) or not all(isinstance(m, str) and m for m in raw):
        raise MessageError(f"update metadata `modalities` must be a list of names, got {raw!r}")
    mods = [str(m) for m in raw]
    try:
        tensors = {k: arrays[k].numpy() for k in arrays}
    except Exception as e:  # a corrupt Array (bad bytes, shape or dtype) raises several types
        raise MessageError(f"update arrays cannot be decoded: {e}") from e
    return ClientUpdate(client_id=fields["client-id"], task=fields["task"], round=fields["round"],
                        n_samples=fields["num-examples"], modalities=frozenset(mods), tensors=tensors)


# --- the probe round: a client's zero-cost proxy scores (one float per candidate module) ---

SCORES_KEY = "scores"


@dataclass(frozen=True)
class ProbeReply:
    client_id: str
    task: str
    n_samples: int  # the weight of this client's vector in the cloud's mean
    scores: Mapping[str, float]  # candidate module → accumulated-gradient norm


def encode_probe(p: ProbeReply) -> RecordDict:
    return RecordDict({SCORES_KEY: MetricRecord({k: float(v) for k, v in p.scores.items()}),
                       META_KEY: ConfigRecord({"client-id": p.client_id, "task": p.task,
                                               "num-examples": int(p.n_samples)})})


def decode_probe(content: RecordDict) -> ProbeReply:
    """A probe reply → ``ProbeReply``; scores must be finite numbers >= 0 (gradient norms)."""
    scores, meta = _envelope(content, "probe reply", SCORES_KEY, MetricRecord)
    fields = {name: _meta_field(meta, name, kind) for name, kind in _META_FIELDS.items()
              if name != "round"}
    out: dict[str, float] = {}
    for k, v in scores.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            raise MessageError(f"probe score of {k!r} must be a finite number >= 0, got {v!r}")
        out[k] = float(v)
    if not out:
        raise MessageError("probe reply has no scores; the client must score every candidate module")
    return ProbeReply(fields["client-id"], fields["task"], fields["num-examples"], out)


# --- the evaluation round: a client's exact-match accuracy on its local test data per task ---

EVAL_KEY = "eval"


@dataclass(frozen=True)
class EvalReply:
    client_id: str
    global_round: int
    scores: Mapping[str, tuple[float, int]]  # task → (accuracy in percent, test samples)


def encode_eval(e: EvalReply) -> RecordDict:
    metrics: dict[str, int | float | list[int] | list[float]] = {}
    for task, (acc, n) in e.scores.items():
        metrics[f"acc/{task}"], metrics[f"n/{task}"] = float(acc), int(n)
    return RecordDict({EVAL_KEY: MetricRecord(metrics),
                       META_KEY: ConfigRecord({"client-id": e.client_id, "round": e.global_round})})


def decode_eval(content: RecordDict) -> EvalReply:
    """An evaluation reply → ``EvalReply``; accuracies in [0, 100], counts > 0, paired per task."""
    metrics, meta = _envelope(content, "evaluation reply", EVAL_KEY, MetricRecord)
    client = _meta_field(meta, "client-id", str)
    rnd = _meta_field(meta, "round", int)
    tasks = {k[4:] for k in metrics if k.startswith("acc/")}
    if {k for k in metrics} != {f"acc/{t}" for t in tasks} | {f"n/{t}" for t in tasks}:
        raise MessageError(f"evaluation metrics must pair acc/TASK with n/TASK, got {sorted(metrics)}")
    scores: dict[str, tuple[float, int]] = {}
    for t in sorted(tasks):
        acc, n = metrics[f"acc/{t}"], metrics[f"n/{t}"]
        if not isinstance(acc, int | float) or not 0 <= float(acc) <= 100:
            raise MessageError(f"accuracy of task {t!r} must be in [0, 100], got {acc!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise MessageError(f"test count of task {t!r} must be an int > 0, got {n!r}")
        scores[t] = (float(acc), n)
    return EvalReply(client, rnd, scores)
