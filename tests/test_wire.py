"""The wire pieces of a round: compression of uploads, round instructions, app run config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from protocol.app_config import AppConfig, split_run_config
from protocol.compression import COMPRESSIONS, SCALE_SUFFIX, compress, decompress
from protocol.config import COMPRESSIONS as CONFIG_COMPRESSIONS
from protocol.config import ConfigError, RunConfig
from protocol.instructions import Instruction, pack_state, unpack_state
from protocol.plan import ExpertPlan
from protocol.updates import MessageError, RouterPart, add_router_part, decode_router_part


def test_config_and_protocol_agree_on_compressions():
    assert CONFIG_COMPRESSIONS == COMPRESSIONS


@pytest.mark.parametrize("mode,bytes_per_value,tol", [("none", 4, 0.0), ("fp16", 2, 1e-3), ("int8", 1, 1e-2)])
def test_compression_round_trip_error_and_size(mode, bytes_per_value, tol):
    rng = np.random.default_rng(0)
    x = {"m.lora_A": rng.standard_normal((8, 64)).astype(np.float32),
         "m.lora_B": np.zeros((32, 8), np.float32)}  # an all-zero tensor (fresh B) stays zero
    wire = compress(x, mode)
    payload = sum(v.nbytes for k, v in wire.items() if not k.endswith(SCALE_SUFFIX))
    assert payload == bytes_per_value * (8 * 64 + 32 * 8)
    back = decompress(wire)
    assert set(back) == set(x) and all(v.dtype == np.float32 for v in back.values())
    rel = np.abs(back["m.lora_A"] - x["m.lora_A"]).max() / np.abs(x["m.lora_A"]).max()
    assert rel <= tol
    assert not back["m.lora_B"].any()


def test_malformed_compressed_tensors_are_named():
    wire = compress({"m.lora_A": np.ones((2, 3), np.float32)}, "int8")
    with pytest.raises(ValueError, match="without its"):
        decompress({"m.lora_A": wire["m.lora_A"]})
    with pytest.raises(ValueError, match="no tensor"):
        decompress({"x" + SCALE_SUFFIX: wire["m.lora_A" + SCALE_SUFFIX]})
    bad = dict(wire)
    bad["m.lora_A" + SCALE_SUFFIX] = np.full((2, 1), np.nan, np.float32)
    with pytest.raises(ValueError, match="finite"):
        decompress(bad)
    with pytest.raises(ValueError, match="unknown compression"):
        compress({}, "zip")


def test_router_part_travels_compressed_and_comes_back_as_float32():
    from flwr.app import RecordDict

    state = {"encoder.0.weight": np.full((4, 6), 0.5, np.float32)}
    content = RecordDict({"meta": ConfigRecord({"client-id": "c"})})
    add_router_part(content, RouterPart(7, state, np.arange(512)), "int8")
    part = decode_router_part(content)
    assert part is not None and part.n_samples == 7
    assert np.allclose(part.state["encoder.0.weight"], 0.5, atol=1e-2)
    assert part.histogram is not None and part.histogram.sum() == np.arange(512).sum()
    content["meta"]["router-samples"] = 0
    with pytest.raises(MessageError, match="router-samples"):
        decode_router_part(content)


def test_instruction_round_trip_and_malformed_fields():
    plan = ExpertPlan.empty({"a.q_proj": "language"})
    ins = Instruction(phase="evaluate", task="t", task_index=0, global_round=3, method="dmole",
                      plan=plan, seen=("t",), partners={"t": ("u",)}, thresholds={"t": 0.5})
    rec = ins.to_record()
    assert Instruction.from_record(rec) == ins
    for key, value, match in (("phase", "dance", "phase"), ("seen", "[1]", "seen"),
                              ("thresholds", json.dumps({"t": "x"}), "thresholds"),
                              ("plan", "{", "plan"), ("global-round", "3", "global-round")):
        bad = ConfigRecord(dict(rec))
        bad[key] = value
        with pytest.raises(MessageError, match=match):
            Instruction.from_record(bad)
    missing = ConfigRecord({k: v for k, v in rec.items() if k != "task"})
    with pytest.raises(MessageError, match="lacks `task`"):
        Instruction.from_record(missing)


def test_state_packing_round_trip_and_bad_keys():
    experts = {"t": {"m.lora_A": np.ones((2, 3), np.float32)}}
    routers = {"t": {"encoder.0.bias": np.zeros(4, np.float32)}}
    e, r = unpack_state(pack_state(experts, routers))
    assert np.array_equal(e["t"]["m.lora_A"], experts["t"]["m.lora_A"]) and set(r["t"]) == {"encoder.0.bias"}
    from flwr.app import Array, ArrayRecord

    with pytest.raises(MessageError, match="not 'expert/"):
        unpack_state(ArrayRecord(array_dict={"weights": Array(np.zeros(2, np.float32))}))


def test_split_run_config_separates_app_keys_and_names_bad_ones():
    flat = {**RunConfig().to_flat(), **AppConfig(out_dir="/x", resume=True).to_flat()}
    cfg, app = split_run_config(flat)
    assert cfg == RunConfig() and app.out_dir == "/x" and app.resume is True
    with pytest.raises(ConfigError, match="app.typo"):
        split_run_config({"app.typo": 1})
    with pytest.raises(ConfigError, match="app.client-threads"):
        split_run_config({"app.client-threads": 0})
    with pytest.raises(ConfigError, match="federation.compression"):
        split_run_config({"federation.compression": "zip"})
