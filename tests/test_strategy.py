"""FedMoLE's Flower strategy on hand-made replies: probe → allocation, training → per-modality mean."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from cloud.strategy import FedMoleStrategy
from protocol.config import parse_config
from protocol.updates import ClientUpdate, ProbeReply, encode_probe, encode_update

L0, L1 = "language_model.layers.0.self_attn.q_proj", "language_model.layers.1.self_attn.q_proj"
V0, A0 = "vision_tower.layers.0.self_attn.q_proj", "audio_tower.layers.0.self_attn.q_proj"
MMAP = {L0: "language", L1: "language", V0: "vision", A0: "audio"}
DIMS = {m: (6, 5) for m in MMAP}  # (d_in, d_out)


class Grid:
    """Just the node list Flower's sampling reads (the real Grid needs a running SuperLink)."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    """Flower stamps messages with the running ServerApp's ids; a unit test has no ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def strategy() -> FedMoleStrategy:
    cfg = parse_config({"data.tasks": "color,pitch", "federation.rounds-per-task": 2,
                        "federation.min-clients": 2, "lora.rank": 2, "lora.alpha": 4,
                        "dmole.modality-floor": 0.0})
    return FedMoleStrategy(cfg, MMAP, DIMS)


def _reply(instruction: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=instruction)


def test_probe_round_allocates_from_weighted_scores_and_skips_bad_replies(strategy):
    from flwr.app import ArrayRecord, ConfigRecord

    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert len(msgs) == 3 and msgs[0].content["config"]["phase"] == "probe"
    # client 11 (weight 1) likes L1 and V0, client 12 (weight 3) likes L0 and L1: mean → L0, L1.
    s11 = {L0: 0.0, L1: 4.0, V0: 4.0, A0: 0.0}
    s12 = {L0: 3.0, L1: 3.0, V0: 0.0, A0: 0.0}
    replies = [_reply(msgs[0], encode_probe(ProbeReply("c11", "color", 1, s11))),
               _reply(msgs[1], encode_probe(ProbeReply("c12", "color", 3, s12))),
               _reply(msgs[2], RecordDict())]  # malformed: rejected, the round goes on
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy.plan.tasks == ("color",)
    assert sorted(strategy.plan.modules_of("color")) == sorted([L0, L1])
    assert sorted(arrays.keys()) == sorted([f"{L0}.lora_A", f"{L0}.lora_B", f"{L1}.lora_A", f"{L1}.lora_B"])
    assert not arrays[f"{L0}.lora_B"].numpy().any()  # B starts at zero: ΔW = 0
    assert strategy.rejected == {"malformed": 1}
    assert metrics["probe-clients"] == 2


def test_training_round_is_the_exact_weighted_mean_of_client_delta_w(strategy):
    from flwr.app import ArrayRecord, ConfigRecord

    probe = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    scores = {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0}
    strategy.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5, scores)))
                                 for i, m in enumerate(probe)])
    msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), Grid()))
    sent = msgs[0].content["arrays"]
    assert msgs[0].content["config"]["phase"] == "train" and "plan" in msgs[0].content["config"]
    rng = np.random.default_rng(0)
    updates, deltas, weights = [], {L0: [], L1: []}, [1, 3]
    for i, w in enumerate(weights):
        tensors = {}
        for m in (L0, L1):
            a = sent[f"{m}.lora_A"].numpy()  # clients share the init A and train B only here
            b = rng.standard_normal((5, 2)).astype(np.float32)
            tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = a, b
            deltas[m].append(b.astype(np.float64) @ a)
        updates.append(ClientUpdate(f"c{i}", "color", 2, w, frozenset({"language", "vision"}), tensors))
    bad = dict(updates[0].tensors)
    bad[f"{L0}.lora_B"] = np.full((5, 2), np.nan, np.float32)
    replies = [_reply(msgs[i], encode_update(u)) for i, u in enumerate(updates)]
    replies.append(_reply(msgs[2], encode_update(ClientUpdate("c9", "color", 2, 7,
                                                              frozenset({"language"}), bad))))
    arrays, metrics = strategy.aggregate_train(2, replies)
    for m in (L0, L1):
        expected = sum(w * d for w, d in zip(weights, deltas[m], strict=True)) / sum(weights)
        got = arrays[f"{m}.lora_B"].numpy().astype(np.float64) @ arrays[f"{m}.lora_A"].numpy()
        assert np.allclose(got, expected, atol=1e-5)  # shared A → rank ≤ r → exact
    assert strategy.rejected == {"invalid": 1} and metrics["clients"] == 2
    # A stale reply (echoing another round) is rejected too.
    stale = ClientUpdate("c5", "color", 1, 1, frozenset({"language"}), updates[0].tensors)
    strategy.aggregate_train(3, [_reply(msgs[0], encode_update(stale))])
    assert strategy.rejected["invalid"] == 2


def test_only_a_tasks_last_round_evaluates_and_rows_are_count_weighted(strategy):
    from flwr.app import ArrayRecord, ConfigRecord

    from protocol.updates import EvalReply, encode_eval

    probe = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    strategy.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5,
                                                                   {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0})))
                                 for i, m in enumerate(probe)])
    assert list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), Grid())) == []
    msgs = list(strategy.configure_evaluate(3, ArrayRecord(), ConfigRecord(), Grid()))  # color's last
    assert len(msgs) == 3 and list(msgs[0].content["config"]["seen"]) == ["color"]
    assert all(k.startswith("color/") for k in msgs[0].content["arrays"].keys())
    replies = [_reply(msgs[0], encode_eval(EvalReply("c0", 3, {"color": (80.0, 10), "pitch": (0.0, 5)}))),
               _reply(msgs[1], encode_eval(EvalReply("c1", 3, {"color": (50.0, 30)}))),
               _reply(msgs[2], encode_eval(EvalReply("c2", 2, {"color": (0.0, 99)})))]  # stale round
    metrics = strategy.aggregate_evaluate(3, replies)
    assert metrics["acc/color"] == pytest.approx((80 * 10 + 50 * 30) / 40)
    assert strategy.acc_matrix[0] == [pytest.approx(57.5), 0.0]
    assert strategy.rejected == {"stale-or-unknown": 1}


def test_malformed_evaluation_metrics_are_named():
    from flwr.app import MetricRecord

    from protocol.updates import EvalReply, MessageError, decode_eval, encode_eval

    rd = encode_eval(EvalReply("c0", 3, {"color": (80.0, 10)}))
    rd["eval"] = MetricRecord({"acc/color": 80.0})
    with pytest.raises(MessageError, match="pair acc/TASK with n/TASK"):
        decode_eval(rd)
    rd["eval"] = MetricRecord({"acc/color": 180.0, "n/color": 3})
    with pytest.raises(MessageError, match=r"\[0, 100\]"):
        decode_eval(rd)
