"""The update envelope: a ClientUpdate survives a Flower RecordDict round trip; bad ones are named."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from protocol.updates import ClientUpdate, MessageError, decode_update, encode_update

MOD = "llava.model.language_model.layers.0.self_attn.q_proj"


def _update() -> ClientUpdate:
    rng = np.random.default_rng(0)
    return ClientUpdate("c7", "color", 3, 120, frozenset({"vision", "language"}),
                        {f"{MOD}.lora_A": rng.standard_normal((2, 8)).astype(np.float32),
                         f"{MOD}.lora_B": rng.standard_normal((8, 2)).astype(np.float32)})


def test_round_trip_keeps_every_field_and_array():
    u = _update()
    back = decode_update(encode_update(u))
    assert (back.client_id, back.task, back.round, back.n_samples, back.modalities) == (
        "c7", "color", 3, 120, frozenset({"vision", "language"}))
    assert set(back.tensors) == set(u.tensors)
    for k, v in u.tensors.items():
        assert back.tensors[k].dtype == np.float32 and np.array_equal(back.tensors[k], v)
    assert encode_update(u)["meta"]["num-examples"] == 120  # Flower's weighting key


@pytest.mark.parametrize("mutate,match", [
    (lambda rd: rd.pop("meta"), "must carry records"),
    (lambda rd: rd["meta"].pop("task"), "lacks `task`"),
    (lambda rd: rd["meta"].__setitem__("round", "3"), "`round` must be int"),
    (lambda rd: rd["meta"].__setitem__("num-examples", True), "`num-examples` must be int"),
    (lambda rd: rd["meta"].__setitem__("modalities", [1, 2]), "`modalities` must be a list"),
])
def test_malformed_envelopes_are_rejected_by_field(mutate, match):
    rd = encode_update(_update())
    mutate(rd)
    with pytest.raises(MessageError, match=match):
        decode_update(rd)


def test_wrong_record_types_are_rejected():
    rd = RecordDict({"expert": ConfigRecord({"a": 1}), "meta": ArrayRecord()})
    with pytest.raises(MessageError, match="must be an ArrayRecord"):
        decode_update(rd)


def test_probe_reply_round_trip_and_bad_scores():
    from flwr.app import MetricRecord

    from protocol.updates import ProbeReply, decode_probe, encode_probe

    p = ProbeReply("c1", "pitch", 64, {MOD: 0.5, "audio_tower.encoder.layers.0.self_attn.q_proj": 0.0})
    back = decode_probe(encode_probe(p))
    assert back == p
    for bad in (float("nan"), -1.0):
        rd = encode_probe(p)
        rd["scores"] = MetricRecord({MOD: bad})
        with pytest.raises(MessageError, match="finite number >= 0"):
            decode_probe(rd)
    rd = encode_probe(p)
    rd["meta"].pop("num-examples")
    with pytest.raises(MessageError, match="num-examples"):
        decode_probe(rd)

