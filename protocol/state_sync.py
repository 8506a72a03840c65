"""The delta-only downlink: what a round's message must hold, and what it may leave out.

A round's global state — the ``arrays`` ArrayRecord (``expert/<task>/…``, ``router/<task>/…``)
and the expert plan (the instruction's ``plan`` JSON) — is cut into *groups*: one per
``expert/<task>``, one per ``router/<task>``, and ``plan``. Every group has a digest. The cloud
(:mod:`cloud.downlink`) adds to each instruction a manifest ``state`` = JSON {group: digest} of
every group the round needs, and leaves out of a node's message each group that node is known to
hold at that digest (an emptied ``plan`` string; the group's arrays dropped). The edge
(:mod:`edge.state_cache`) keeps the last version of each group it received, fills in what was
left out (:func:`fill`), and checks every digest. A group it does not hold — a node whose cache
was lost, or one the cloud has never heard from since its own restart — makes it answer with a
``need-state`` reply naming the groups; the cloud then re-sends that node the whole message.

A message without a manifest is taken as it is (every group in it): the full downlink
(``federation.downlink = "full"``) and older clouds.

Digest: sha256 over the group's arrays in key order — key, dtype, shape, stype and the Array's
bytes as they travel (after :mod:`protocol.compression`) — or over the plan's JSON text; the
first 16 bytes, hex. Only equal bytes give equal digests, so a cached group is the group.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Protocol

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protocol.updates import MessageError

STATE_KEY = "state"  # instruction key: JSON {group: digest}
PLAN = "plan"  # the plan's group name, and the instruction key holding its JSON
ARRAYS = "arrays"
CONFIG = "config"
NEED_KEY = "need-state"  # reply: JSON list of the groups the node does not hold
GROUP_KINDS = ("expert", "router")


class MissingState(Exception):
    """The node holds none of ``groups`` at the digests the message names."""

    def __init__(self, groups: list[str]):
        super().__init__(f"not held here: {', '.join(groups)}")
        self.groups = groups


class GroupCache(Protocol):
    """What the edge keeps: the last version of each group (arrays, or the plan's text)."""

    def get(self, group: str, digest: str) -> dict[str, Array] | str | None: ...

    def put(self, group: str, digest: str, value: dict[str, Array] | str) -> None: ...


def group_of(key: str) -> str:
    """``expert/<task>/<module>.lora_A[::scale]`` → ``expert/<task>``."""
    kind, _, rest = key.partition("/")
    task, _, name = rest.partition("/")
    if kind not in GROUP_KINDS or not task or not name:
        raise MessageError(f"global state key {key!r} is not 'expert/<task>/<key>' or "
                           "'router/<task>/<key>'")
    return f"{kind}/{task}"


def split_groups(rec: ArrayRecord) -> dict[str, dict[str, Array]]:
    """An ArrayRecord of global state → group → {key: Array} (the Arrays as they are)."""
    out: dict[str, dict[str, Array]] = {}
    for key in rec:
        out.setdefault(group_of(key), {})[key] = rec[key]
    return out


def digest_arrays(arrays: Mapping[str, Array]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = arrays[key]
        h.update(json.dumps([key, a.dtype, list(a.shape), a.stype]).encode())
        h.update(len(a.data).to_bytes(8, "little"))
        h.update(a.data)
    return h.hexdigest()[:32]


def digest_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def manifest_of(content: RecordDict) -> dict[str, str]:
    """The manifest of a full round message (``config`` + ``arrays``)."""
    config, arrays = _parts(content)
    out = {g: digest_arrays(a) for g, a in split_groups(arrays).items()}
    plan = config.get(PLAN)
    if isinstance(plan, str) and plan:
        out[PLAN] = digest_text(plan)
    return out


def _parts(content: RecordDict) -> tuple[ConfigRecord, ArrayRecord]:
    config, arrays = content.get(CONFIG), content.get(ARRAYS)
    if not isinstance(config, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise MessageError(f"a round message must carry a ConfigRecord {CONFIG!r} and an "
                           f"ArrayRecord {ARRAYS!r}, got {sorted(content)}")
    return config, arrays


def strip(content: RecordDict, manifest: Mapping[str, str], held: Mapping[str, str]
          ) -> RecordDict:
    """The message for a node that holds ``held`` (group → digest): the manifest added, every
    group held at its manifest digest left out. ``content`` is not changed (Flower's sampling
    hands every node the same records)."""
    config, arrays = _parts(content)
    keep = {g for g, d in manifest.items() if held.get(g) != d}
    cfg = ConfigRecord(dict(config))
    cfg[STATE_KEY] = json.dumps(dict(manifest), sort_keys=True)
    if PLAN in manifest and PLAN not in keep:
        cfg[PLAN] = ""
    out_arrays = ArrayRecord(array_dict={k: arrays[k] for k in arrays if group_of(k) in keep})
    rest = {k: v for k, v in content.items() if k not in (CONFIG, ARRAYS)}
    return RecordDict({**rest, CONFIG: cfg, ARRAYS: out_arrays})


def read_manifest(config: Mapping[str, object]) -> dict[str, str] | None:
    """The instruction's manifest, or None for a message without one (the full downlink)."""
    raw = config.get(STATE_KEY)
    if raw is None:
        return None
    try:
        man = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError) as e:
        raise MessageError(f"round instruction `{STATE_KEY}` is not valid JSON: {e}") from e
    if not (isinstance(man, dict) and all(isinstance(g, str) and isinstance(d, str)
                                          for g, d in man.items())):
        raise MessageError(f"round instruction `{STATE_KEY}` must map group → digest, got {raw!r}")
    for g in man:
        if g != PLAN:
            kind, _, task = g.partition("/")
            if kind not in GROUP_KINDS or not task:
                raise MessageError(f"round instruction `{STATE_KEY}`: group {g!r} is not 'plan', "
                                   "'expert/<task>' or 'router/<task>'")
    return man


def fill(content: RecordDict, cache: GroupCache) -> RecordDict:
    """The full round message from a (possibly stripped) one: left-out groups from ``cache``,
    received groups checked against the manifest and stored there.

    Raises :class:`MissingState` (every group neither sent nor cached at its digest) and
    :class:`MessageError` (a sent group whose bytes do not match its digest, a group sent that
    the manifest does not name)."""
    config, arrays = _parts(content)
    man = read_manifest(config)
    if man is None:
        return content
    sent = split_groups(arrays)
    extra = sorted(set(sent) - set(man))
    if extra:
        raise MessageError(f"the message carries groups its manifest does not name: {extra}")
    full: dict[str, Array] = {}
    missing: list[str] = []
    plan_text = config.get(PLAN)
    plan = plan_text if isinstance(plan_text, str) else ""
    for g, d in sorted(man.items()):
        if g == PLAN:
            if plan:
                if digest_text(plan) != d:
                    raise MessageError(f"the plan sent does not match its digest {d}")
                cache.put(PLAN, d, plan)
            else:
                cached = cache.get(PLAN, d)
                if isinstance(cached, str):
                    plan = cached
                else:
                    missing.append(g)
            continue
        if g in sent:
            if digest_arrays(sent[g]) != d:
                raise MessageError(f"group {g!r} sent does not match its digest {d}: the message "
                                   "was altered on the way")
            cache.put(g, d, sent[g])
            full.update(sent[g])
        else:
            got = cache.get(g, d)
            if isinstance(got, dict):
                full.update(got)
            else:
                missing.append(g)
    if missing:
        raise MissingState(missing)
    cfg = ConfigRecord({k: v for k, v in config.items() if k != STATE_KEY})
    if PLAN in man:
        cfg[PLAN] = plan
    rest = {k: v for k, v in content.items() if k not in (CONFIG, ARRAYS)}
    return RecordDict({**rest, CONFIG: cfg, ARRAYS: ArrayRecord(array_dict=full)})


def encode_need_state(groups: list[str]) -> RecordDict:
    return RecordDict({NEED_KEY: ConfigRecord({"groups": json.dumps(sorted(groups))})})


def need_state(content: RecordDict) -> list[str] | None:
    """The groups a ``need-state`` reply asks for, or None for any other reply."""
    if NEED_KEY not in content or len(content) != 1:
        return None
    rec = content[NEED_KEY]
    raw = rec.get("groups") if isinstance(rec, ConfigRecord) else None
    try:
        groups = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        groups = None
    if not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
        return []  # a need-state reply that names nothing legible: send everything
    return groups
