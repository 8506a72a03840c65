"""protocol/wire_pack.py: a message's arrays as one wire object, given back exactly; bad bytes
are refused with PackError naming the problem, and nothing else escapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.instructions import pack_state
from protocol.wire_pack import PACKED_KEY, STYPE, PackError, pack_record, unpack_arrays, unpack_record


def _content() -> RecordDict:
    rng = np.random.default_rng(0)
    experts = {t: {"m.lora_A": rng.standard_normal((4, 6)).astype(np.float32),
                   "m.lora_B": rng.standard_normal((5, 4)).astype(np.float32)} for t in ("a", "b")}
    routers = {"a": {"enc.bias": rng.standard_normal(3).astype(np.float32)}}
    return RecordDict({"arrays": pack_state(experts, routers, "int8"),
                       "config": ConfigRecord({"phase": "train"}),
                       "metrics": MetricRecord({"loss": 0.5})})


def _same(a: RecordDict, b: RecordDict) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], ArrayRecord):
            assert list(a[k]) == list(b[k])
            for key in a[k]:
                x, y = a[k][key], b[k][key]
                assert (x.dtype, tuple(x.shape), x.stype, x.data) == \
                    (y.dtype, tuple(y.shape), y.stype, y.data)
        else:
            assert dict(a[k]) == dict(b[k])


def test_packing_gives_back_every_array_exactly_through_flowers_own_serialisation():
    content = _content()
    packed = pack_record(content)
    assert list(packed["arrays"]) == [PACKED_KEY] and len(content["arrays"]) == 9
    wire = recorddict_from_proto(recorddict_to_proto(packed))  # what travels between processes
    _same(unpack_record(wire), content)
    _same(unpack_record(content), content)  # unpacked content passes through
    empty = RecordDict({"arrays": ArrayRecord({})})
    _same(unpack_record(pack_record(empty)), empty)


def _packed(blob: bytes, stype: str = STYPE) -> ArrayRecord:
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=stype, data=blob)})


def _blob(head, body: bytes = b"") -> bytes:
    text = json.dumps(head).encode()
    return len(text).to_bytes(8, "little") + text + body


@pytest.mark.parametrize("rec, why", [
    (_packed(b"\x01"), "shorter than their header"),
    (_packed(_blob([])[:-1]), "exceeds"),
    (_packed((5).to_bytes(8, "little") + b"nope!"), "not JSON"),
    (_packed(_blob({"a": 1})), "must be a list"),
    (_packed(_blob([["a", "float32", [1], "numpy.ndarray", 8]], b"1234")), "runs past the end"),
    (_packed(_blob([["a", "float32", [1], "numpy.ndarray", 0]] * 2)), "repeats"),
    (_packed(_blob([["a", "float32", [-1], "numpy.ndarray", 0]])), "bad header entry"),
    (_packed(_blob([], b"extra")), "after the last entry"),
    (_packed(_blob([]), stype="numpy.ndarray"), "stype"),
    (ArrayRecord({PACKED_KEY: Array(np.zeros(2)), "x": Array(np.zeros(2))}), "holds only"),
])
def test_bad_packed_bytes_are_refused_with_the_reason(rec, why):
    with pytest.raises(PackError, match=why):
        unpack_arrays(rec)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_unpack_or_are_refused(blob):
    try:
        unpack_arrays(_packed(blob))
    except PackError:
        pass
