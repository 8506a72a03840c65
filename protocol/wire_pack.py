"""One wire object per ArrayRecord: a round message's arrays packed into a single Flower ``Array``.

Why: Flower 1.39 moves a message as a tree of objects, one per ``Array``, each pulled or pushed
with its own request — ServerApp ⇄ SuperLink (HTTP), SuperLink ⇄ SuperNode (gRPC) and
SuperNode ⇄ ClientApp (HTTP). A D-MoLE round message holds ~70 small arrays (each expert's
A, B and their int8 scales, the routers), so a 3-node training round made ~400 requests for the
replies alone: ~10 s of a round's overhead on the local deployment (bench/deploy_round.py),
whatever the bytes. Packed, a message is a handful of objects.

What is packed is exactly what was there: each ``Array``'s dtype, shape, stype and bytes, in
key order, behind a JSON index; :func:`unpack_record` gives back equal ``Array`` objects, so
nothing above the wire (the strategy, the handler, the byte accounting, the digests of the
delta downlink) sees a difference. Content without the marker key passes through unchanged.

Layout of the packed ``Array`` (dtype ``uint8``, stype :data:`STYPE`, shape ``(n,)``):
``u64 little-endian header length | header JSON | bytes of each array, in header order``;
header = ``[[key, dtype, shape, stype, nbytes], ...]``.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, RecordDict

PACKED_KEY = "__packed__"
STYPE = "fedmole.packed-arrays.v1"
_MAX_HEADER = 1 << 24  # 16 MB of index: far beyond any real message, bounds a hostile one


class PackError(ValueError):
    """A packed record that does not unpack (names what is wrong)."""


def pack_arrays(rec: ArrayRecord) -> ArrayRecord:
    """``rec`` as an ArrayRecord of one packed Array (empty records stay empty)."""
    if not len(rec) or PACKED_KEY in rec:
        return rec
    keys = list(rec)
    head = [[k, rec[k].dtype, list(rec[k].shape), rec[k].stype, len(rec[k].data)] for k in keys]
    text = json.dumps(head).encode()
    blob = b"".join([len(text).to_bytes(8, "little"), text, *(rec[k].data for k in keys)])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})


def unpack_arrays(rec: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord :func:`pack_arrays` was given; raises :class:`PackError` on bad bytes."""
    if PACKED_KEY not in rec:
        return rec
    if len(rec) != 1:
        raise PackError(f"a packed ArrayRecord holds only {PACKED_KEY!r}, got {sorted(rec)[:5]}")
    arr = rec[PACKED_KEY]
    if arr.stype != STYPE:
        raise PackError(f"{PACKED_KEY!r} has stype {arr.stype!r}, expected {STYPE!r}")
    blob = arr.data
    if len(blob) < 8:
        raise PackError("packed arrays: shorter than their header length")
    n = int.from_bytes(blob[:8], "little")
    if n > min(_MAX_HEADER, len(blob) - 8):
        raise PackError(f"packed arrays: header length {n} exceeds the {len(blob)} bytes")
    try:
        head: Any = json.loads(blob[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise PackError(f"packed arrays: header is not JSON: {e}") from e
    out: dict[str, Array] = {}
    at = 8 + n
    if not isinstance(head, list):
        raise PackError("packed arrays: header must be a list of [key, dtype, shape, stype, nbytes]")
    for entry in head:
        try:
            key, dtype, shape, stype, size = entry
            ok = (isinstance(key, str) and isinstance(dtype, str) and isinstance(stype, str)
                  and isinstance(size, int) and size >= 0 and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in shape))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise PackError(f"packed arrays: bad header entry {str(entry)[:100]!r}")
        if key in out or at + size > len(blob):
            raise PackError(f"packed arrays: entry {key!r} repeats or runs past the end")
        out[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blob[at:at + size])
        at += size
    if at != len(blob):
        raise PackError(f"packed arrays: {len(blob) - at} bytes after the last entry")
    return ArrayRecord(out)


def pack_record(content: RecordDict) -> RecordDict:
    """Every ArrayRecord of ``content`` packed (other records as they are)."""
    return RecordDict({k: pack_arrays(v) if isinstance(v, ArrayRecord) else v
                       for k, v in content.items()})


def unpack_record(content: RecordDict) -> RecordDict:
    """Every packed ArrayRecord of ``content`` unpacked; raises :class:`PackError`."""
    if not any(isinstance(v, ArrayRecord) and PACKED_KEY in v for v in content.values()):
        return content
    return RecordDict({k: unpack_arrays(v) if isinstance(v, ArrayRecord) else v
                       for k, v in content.items()})
