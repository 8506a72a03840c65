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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocol.checks import finite_number
from protocol.compression import compress, decompress

ARRAYS_KEY = "expert"
META_KEY = "meta"
_META_FIELDS: dict[str, type] = {"client-id": str, "task": str, "round": int, "num-examples": int}
# Flower's wire carries 64-bit integers; a larger one (only possible in memory) would overflow the
# cloud's float arithmetic on counts, so every integer field is held to the int64 range.
MAX_INT = 2**63 - 1


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
    if isinstance(v, int) and not -MAX_INT <= v <= MAX_INT:
        raise MessageError(f"update metadata `{name}` must be a 64-bit int, got {v!r}")
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


def _numpy(arrays: ArrayRecord, what: str) -> dict[str, np.ndarray]:
    try:
        out = {k: arrays[k].numpy() for k in arrays}
    except Exception as e:  # a corrupt Array (bad bytes, shape or dtype) raises several types
        raise MessageError(f"{what} arrays cannot be decoded: {e}") from e
    for k, x in out.items():
        check_numeric(x, f"{what} array {k!r}")
    return out


def check_numeric(x: Any, what: str) -> np.ndarray:
    """``x`` if it is a numpy array of numbers; raise :class:`MessageError` otherwise.

    ``np.load`` also returns an ``NpzFile`` for zip bytes, and strings, records or zero-width
    ``V0``/``U0`` arrays (whose element count a header can make astronomically large) are no
    tensor: they are rejected here, before anything iterates over them.
    """
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biufc":
        kind = f"dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise MessageError(f"{what} must be a numeric array, got {kind}")
    return x


def decode_update(content: RecordDict) -> ClientUpdate:
    """A reply's ``RecordDict`` → ``ClientUpdate``; a malformed envelope raises :class:`MessageError`."""
    arrays, meta = _envelope(content, "update", ARRAYS_KEY, ArrayRecord)
    fields = {name: _meta_field(meta, name, kind) for name, kind in _META_FIELDS.items()}
    raw = meta.get("modalities")
    if not isinstance(raw, list) or not all(isinstance(m, str) and m for m in raw):
        raise MessageError(f"update metadata `modalities` must be a list of names, got {raw!r}")
    mods = [str(m) for m in raw]
    tensors = _numpy(arrays, "update")
    try:
        tensors = decompress(tensors)
    except ValueError as e:
        raise MessageError(f"update arrays: {e}") from e
    return ClientUpdate(client_id=fields["client-id"], task=fields["task"], round=fields["round"],
                        n_samples=fields["num-examples"], modalities=frozenset(mods), tensors=tensors)


# --- the probe round: a client's zero-cost proxy scores (one float per candidate module) ---

SCORES_KEY = "scores"


VOTES_KEY = "votes"


@dataclass(frozen=True)
class ProbeReply:
    client_id: str
    task: str
    n_samples: int  # the weight of this client's vector in the cloud's mean
    scores: Mapping[str, float]  # candidate module → accumulated-gradient norm
    # Older task → how many of the client's task-t training samples the global router sends
    # there (D-MoLE's co-activation vote, counted on the edge).
    votes: Mapping[str, int] = field(default_factory=dict)


def encode_probe(p: ProbeReply) -> RecordDict:
    return RecordDict({SCORES_KEY: MetricRecord({k: float(v) for k, v in p.scores.items()}),
                       VOTES_KEY: MetricRecord({k: int(v) for k, v in p.votes.items()}),
                       META_KEY: ConfigRecord({"client-id": p.client_id, "task": p.task,
                                               "num-examples": int(p.n_samples)})})


def decode_probe(content: RecordDict) -> ProbeReply:
    """A probe reply → ``ProbeReply``; scores must be finite numbers >= 0 (gradient norms)."""
    scores, meta = _envelope(content, "probe reply", SCORES_KEY, MetricRecord)
    fields = {name: _meta_field(meta, name, kind) for name, kind in _META_FIELDS.items()
              if name != "round"}
    out: dict[str, float] = {}
    for k, v in scores.items():
        if not finite_number(v) or v < 0:
            raise MessageError(f"probe score of {k!r} must be a finite number >= 0, got {v!r}")
        out[k] = float(v)
    if not out:
        raise MessageError("probe reply has no scores; the client must score every candidate module")
    raw = content.get(VOTES_KEY, MetricRecord())
    if not isinstance(raw, MetricRecord):
        raise MessageError(f"{VOTES_KEY!r} must be a MetricRecord, got {type(raw).__name__}")
    votes: dict[str, int] = {}
    for k, v in raw.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT:
            raise MessageError(f"vote count for {k!r} must be an int in [0, 2**63), got {v!r}")
        votes[k] = v
    if fields["num-examples"] <= 0 or sum(votes.values()) > fields["num-examples"]:
        raise MessageError(f"probe reply: `num-examples` {fields['num-examples']} must be > 0 and "
                           f">= the {sum(votes.values())} votes cast")
    return ProbeReply(fields["client-id"], fields["task"], fields["num-examples"], out, votes)


# --- the evaluation round: a client's exact-match accuracy on its local test data per task ---

EVAL_KEY = "eval"
DETAIL_KEY = "eval-detail"  # task/metric → value: every metric of the task, not just the primary
ROUTING_KEY = "routing"


@dataclass(frozen=True)
class EvalReply:
    client_id: str
    global_round: int
    scores: Mapping[str, tuple[float, int]]  # task → (primary metric in percent, test samples)
    # Seen task → how many of its test samples the router sent to its own experts.
    routed: Mapping[str, int] = field(default_factory=dict)
    # Task → every metric of it (the stream's list, primary included), on the same samples.
    details: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


def encode_eval(e: EvalReply) -> RecordDict:
    metrics: dict[str, int | float | list[int] | list[float]] = {}
    for task, (acc, n) in e.scores.items():
        metrics[f"acc/{task}"], metrics[f"n/{task}"] = float(acc), int(n)
    detail: dict[str, int | float | list[int] | list[float]] = {
        f"{task}/{m}": float(v) for task, d in e.details.items() for m, v in d.items()}
    return RecordDict({EVAL_KEY: MetricRecord(metrics),
                       ROUTING_KEY: MetricRecord({t: int(v) for t, v in e.routed.items()}),
                       DETAIL_KEY: MetricRecord(detail),
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
        if not finite_number(acc) or not 0 <= acc <= 100:
            raise MessageError(f"accuracy of task {t!r} must be in [0, 100], got {acc!r}")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_INT:
            raise MessageError(f"test count of task {t!r} must be an int in (0, 2**63), got {n!r}")
        scores[t] = (float(acc), n)
    raw = content.get(ROUTING_KEY, MetricRecord())
    routed: dict[str, int] = {}
    for t, v in (raw.items() if isinstance(raw, MetricRecord) else [("?", raw)]):
        if t not in scores or not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= scores[t][1]:
            raise MessageError(f"routing count of {t!r} must be an int in [0, test count] of a "
                               f"scored task, got {v!r}")
        routed[t] = v
    raw = content.get(DETAIL_KEY, MetricRecord())
    details: dict[str, dict[str, float]] = {}
    for k, v in (raw.items() if isinstance(raw, MetricRecord) else [("?", raw)]):
        t, _, m = str(k).rpartition("/")
        # CIDEr-D in percent may pass 100; every metric is finite and >= 0
        if (t not in scores or not m or not isinstance(v, int | float) or isinstance(v, bool)
                or not finite_number(v) or not 0 <= v < 1e6):
            raise MessageError(f"metric {k!r} must be TASK/METRIC of a scored task with a finite "
                               f"value >= 0, got {v!r}")
        details.setdefault(t, {})[m] = float(v)
    return EvalReply(client, rnd, scores, routed, details)


# --- a task's router part of a reply: the client's autoencoder weights and/or error histogram ---

ROUTER_KEY = "router"
HISTOGRAM = "error-histogram"


@dataclass(frozen=True, eq=False)
class RouterPart:
    """Task t's router from one client: its locally fitted AE (FedAvg'd by the cloud) and/or the
    histogram of its held-out samples' errors under the current global AE (fixed shared bins)."""

    n_samples: int  # the samples the AE was fitted on / the histogram counts
    state: Mapping[str, np.ndarray] | None
    histogram: np.ndarray | None


def add_router_part(content: RecordDict, part: RouterPart, compression: str = "none") -> RecordDict:
    """Attach ``part``; the AE weights travel in ``compression`` (see protocol.compression), the
    histogram as int32 counts."""
    wire = compress(part.state or {}, compression)
    arrays = {k: Array(np.ascontiguousarray(v)) for k, v in wire.items()}
    if part.histogram is not None:
        arrays[HISTOGRAM] = Array(np.ascontiguousarray(part.histogram, dtype=np.int32))
    content[ROUTER_KEY] = ArrayRecord(array_dict=arrays)
    meta = content[META_KEY]
    assert isinstance(meta, ConfigRecord)
    meta["router-samples"] = int(part.n_samples)
    return content


def decode_router_part(content: RecordDict) -> RouterPart | None:
    """The router part of a reply, or None when it carries none; shapes are the cloud's to check."""
    if ROUTER_KEY not in content:
        return None
    rec, meta = _envelope(content, "router part", ROUTER_KEY, ArrayRecord)
    n = meta.get("router-samples")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_INT:
        raise MessageError(f"router part: `router-samples` must be an int in (0, 2**63), got {n!r}")
    arrays = _numpy(rec, "router")
    hist = arrays.pop(HISTOGRAM, None)
    try:
        state = decompress(arrays)
    except ValueError as e:
        raise MessageError(f"router arrays: {e}") from e
    return RouterPart(n, state or None, hist)


# --- a client with nothing to send this round (no local data of the task) ---

SKIP = "skip"


def encode_skip(client_id: str, task: str, reason: str) -> RecordDict:
    return RecordDict({META_KEY: ConfigRecord({"client-id": client_id, "task": task, SKIP: reason})})


def skip_reason(content: RecordDict) -> str | None:
    """Why a client sent nothing this round, or None for a normal reply."""
    meta = content.get(META_KEY) if META_KEY in content else None
    if isinstance(meta, ConfigRecord) and SKIP in meta and len(content) == 1:
        return str(meta[SKIP])
    return None
