"""FedMoLE's Flower strategy on hand-made replies: probe → allocation, training → per-modality mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from cloud.aggregation import svd_factors
from cloud.strategy import FedMoleStrategy
from protocol.config import parse_config
from protocol.instructions import unpack_state
from protocol.updates import ClientUpdate, ProbeReply, encode_probe, encode_update

L0, L1 = "language_model.layers.0.self_attn.q_proj", "language_model.layers.1.self_attn.q_proj"
V0, A0 = "vision_tower.layers.0.self_attn.q_proj", "audio_tower.layers.0.self_attn.q_proj"
MMAP = {L0: "language", L1: "language", V0: "vision", A0: "audio"}
DIMS = {m: (6, 5) for m in MMAP}  # (d_in, d_out)


class Grid:
    """The node list Flower's sampling reads and a send_and_receive for the quorum's retries,
    answered by ``answer`` (None: nobody answers) — the real Grid needs a running SuperLink."""

    def __init__(self, nodes=(11, 12, 13), answer=None):
        self.nodes = list(nodes)
        self.answer = answer
        self.resent: list[list[Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        msgs = list(messages)
        self.resent.append(msgs)
        return [r for r in (self.answer(m) for m in msgs) if r is not None] if self.answer else []


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    """Flower stamps messages with the running ServerApp's ids; a unit test has no ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def strategy() -> FedMoleStrategy:
    cfg = parse_config({"federation.fraction": 1.0,
                        "data.tasks": "color,pitch", "federation.rounds-per-task": 2,
                        "federation.min-clients": 2, "lora.rank": 2, "lora.alpha": 4,
                        "dmole.modality-floor": 0.0,
                        # float32 on the wire: these tests check the aggregation's exactness
                        # (the int8 downlink has its own tests in test_downlink.py)
                        "federation.downlink-compression": "none"})
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
    _, metrics = strategy.aggregate_train(1, replies)
    assert strategy.plan.tasks == ("color",)
    assert sorted(strategy.plan.modules_of("color")) == sorted([L0, L1])
    experts = strategy.state.experts["color"]
    assert sorted(experts) == sorted([f"{L0}.lora_A", f"{L0}.lora_B", f"{L1}.lora_A", f"{L1}.lora_B"])
    assert not experts[f"{L0}.lora_B"].any()  # B starts at zero: ΔW = 0
    assert strategy.rejected == {"malformed": 1}
    assert metrics["probe-clients"] == 2


def test_training_round_is_the_exact_weighted_mean_of_client_delta_w(strategy):
    from flwr.app import ArrayRecord, ConfigRecord

    probe = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    scores = {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0}
    strategy.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5, scores)))
                                 for i, m in enumerate(probe)])
    msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), Grid()))
    sent = {k.split("/", 2)[2]: v for k, v in msgs[0].content["arrays"].items()}
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
    _, metrics = strategy.aggregate_train(2, replies)
    arrays = strategy.state.experts["color"]
    for m in (L0, L1):
        expected = sum(w * d for w, d in zip(weights, deltas[m], strict=True)) / sum(weights)
        got = arrays[f"{m}.lora_B"].astype(np.float64) @ arrays[f"{m}.lora_A"]
        assert np.allclose(got, expected, atol=1e-5)  # shared A → rank ≤ r → exact
    assert strategy.rejected == {"invalid": 1} and metrics["clients"] == 2
    # counted for the node that sent it, too
    assert strategy.state.rejected_by_node == {str(msgs[2].metadata.dst_node_id): {"invalid": 1}}
    # A stale reply (echoing another round) is rejected too.
    stale = ClientUpdate("c5", "color", 1, 1, frozenset({"language"}), updates[0].tensors)
    strategy.aggregate_train(3, [_reply(msgs[0], encode_update(stale))])
    assert strategy.rejected["invalid"] == 2


def test_server_lr_moves_the_expert_past_the_clients_mean():
    """federation.server-lr η: a task's first round starts from B = 0 (W_ref = 0), so the new
    expert is η × the clients' weighted mean ΔW; the A/B-averaging rule cannot take a step."""
    from flwr.app import ArrayRecord, ConfigRecord

    flat = {"federation.fraction": 1.0, "data.tasks": "color,pitch",
            "federation.rounds-per-task": 2, "federation.min-clients": 2, "lora.rank": 2,
            "lora.alpha": 4, "dmole.modality-floor": 0.0,
            "federation.downlink-compression": "none", "federation.server-lr": 2.0}
    cfg = parse_config(flat)
    with pytest.raises(ValueError, match="server-lr=2.0 needs the 'svd'"):
        FedMoleStrategy(cfg, MMAP, DIMS, rule="fedavg-ab")
    st = FedMoleStrategy(cfg, MMAP, DIMS)
    probe = list(st.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    st.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5,
                                                             {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0})))
                           for i, m in enumerate(probe)])
    msgs = list(st.configure_train(2, ArrayRecord(), ConfigRecord(), Grid()))
    sent = {k.split("/", 2)[2]: v for k, v in msgs[0].content["arrays"].items()}
    rng = np.random.default_rng(3)
    replies, means = [], dict.fromkeys((L0, L1), 0.0)
    for i, w in enumerate((1, 3)):
        tensors = {}
        for m in (L0, L1):
            a = sent[f"{m}.lora_A"].numpy()
            b = rng.standard_normal((5, 2)).astype(np.float32)
            tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = a, b
            means[m] = means[m] + w * (b.astype(np.float64) @ a) / 4
        replies.append(_reply(msgs[i], encode_update(
            ClientUpdate(f"c{i}", "color", 2, w, frozenset({"language", "vision"}), tensors))))
    st.aggregate_train(2, replies)
    arrays = st.state.experts["color"]
    for m in (L0, L1):
        got = arrays[f"{m}.lora_B"].astype(np.float64) @ arrays[f"{m}.lora_A"]
        assert np.allclose(got, 2.0 * means[m], atol=1e-5)


def test_only_a_tasks_last_round_evaluates_and_rows_are_count_weighted(strategy):
    from flwr.app import ArrayRecord, ConfigRecord

    from protocol.updates import EvalReply, encode_eval

    probe = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    strategy.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5,
                                                                   {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0})))
                                 for i, m in enumerate(probe)])
    assert list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), Grid())) == []
    msgs = list(strategy.configure_evaluate(3, ArrayRecord(), ConfigRecord(), Grid()))  # color's last
    assert len(msgs) == 3 and json.loads(msgs[0].content["config"]["seen"]) == ["color"]
    assert all(k.startswith("expert/color/") for k in msgs[0].content["arrays"].keys())
    replies = [_reply(msgs[0], encode_eval(EvalReply("c0", 3, {"color": (80.0, 10), "pitch": (0.0, 5)}))),
               _reply(msgs[1], encode_eval(EvalReply("c1", 3, {"color": (50.0, 30)}))),
               _reply(msgs[2], encode_eval(EvalReply("c2", 2, {"color": (0.0, 99)})))]  # stale round
    metrics = strategy.aggregate_evaluate(3, replies)
    assert metrics["acc/color"] == pytest.approx((80 * 10 + 50 * 30) / 40)
    assert strategy.state.acc_matrix[0] == [pytest.approx(57.5), 0.0]
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


# --- routers, partners, modalities, baselines, dropout, checkpoints -----------------------------

def _probe_all(strategy, rnd, task, scores, votes=None, router=None):
    from flwr.app import ArrayRecord, ConfigRecord

    from protocol.updates import RouterPart, add_router_part

    msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), Grid()))
    replies = []
    for i, m in enumerate(msgs):
        content = encode_probe(ProbeReply(f"c{i}", task, 4 * (i + 1), scores, votes or {}))
        if router is not None:
            add_router_part(content, RouterPart(4 * (i + 1), router(i), None))
        replies.append(_reply(m, content))
    strategy.aggregate_train(rnd, replies)
    return msgs


def _ae(dim, hidden, value):
    return {"encoder.0.weight": np.full((hidden, dim), value, np.float32),
            "encoder.0.bias": np.full((hidden,), value, np.float32),
            "decoder.0.weight": np.full((dim, hidden), value, np.float32),
            "decoder.0.bias": np.full((dim,), value, np.float32)}


def test_probe_fedavgs_router_weights_and_picks_the_partner_from_summed_votes():
    cfg = parse_config({"federation.fraction": 1.0,
                        "data.tasks": "color,count", "federation.rounds-per-task": 2,
                        "lora.rank": 2, "lora.alpha": 4, "dmole.modality-floor": 0.0,
                        "dmole.coactivate-share": 0.3})
    st = FedMoleStrategy(cfg, MMAP, DIMS, router_dim=6, full_model_bytes=10_000)
    scores = {L0: 1.0, L1: 2.0, V0: 0.5, A0: 0.0}
    _probe_all(st, 1, "color", scores, router=lambda i: _ae(6, 128, float(i)))
    # weights 4, 8, 12 on values 0, 1, 2 → (0·4 + 1·8 + 2·12) / 24
    assert np.allclose(st.state.routers["color"]["encoder.0.weight"], 32 / 24)
    assert st.state.partners["color"] == []
    # color's training rounds reached nobody: its router has no τ and must not go out
    early = list(st.configure_train(4, ArrayRecord(), ConfigRecord(), Grid()))
    assert not any(k.startswith("router/") for k in early[0].content["arrays"].keys())
    st.state.thresholds["color"] = 0.1
    # count's probe: the 3 clients (24 samples) put 10 votes on color: 10 ≥ 0.3·24 → partner
    msgs = _probe_all(st, 4, "count", scores, votes={"color": 10 // 3 + 1},
                      router=lambda i: _ae(6, 128, 0.0))
    assert any(k.startswith("router/color/") for k in msgs[0].content["arrays"].keys())
    assert json.loads(msgs[0].content["config"]["thresholds"]) == {"color": 0.1}
    assert st.state.partners["count"] == ["color"]
    train = list(st.configure_train(5, ArrayRecord(), ConfigRecord(), Grid()))
    keys = set(train[0].content["arrays"].keys())
    assert any(k.startswith("expert/color/") for k in keys)  # the partner travels, frozen
    assert json.loads(train[0].content["config"]["partners"]) == {"count": ["color"]}


def test_training_threshold_is_the_quantile_of_the_pooled_histograms():
    from mole.router import error_histogram, histogram_quantile
    from protocol.updates import RouterPart, add_router_part

    cfg = parse_config({"federation.fraction": 1.0,
                        "data.tasks": "color", "federation.rounds-per-task": 1, "lora.rank": 2,
                        "lora.alpha": 4, "dmole.modality-floor": 0.0, "dmole.router-quantile": 0.9})
    st = FedMoleStrategy(cfg, MMAP, DIMS, router_dim=6)
    _probe_all(st, 1, "color", {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0}, router=lambda i: _ae(6, 128, 0.1))
    msgs = list(st.configure_train(2, ArrayRecord(), ConfigRecord(), Grid()))
    assert msgs[0].content["config"]["router-fit"] is False  # last round: thresholds only
    rng = np.random.default_rng(1)
    errs = [rng.lognormal(-5, 1, n) for n in (30, 50, 70)]
    replies = []
    for i, m in enumerate(msgs):
        tensors = {k.split("/", 2)[2]: v.numpy() for k, v in m.content["arrays"].items()
                   if k.startswith("expert/")}
        content = encode_update(ClientUpdate(f"c{i}", "color", 2, 10, frozenset({"language"}), tensors))
        add_router_part(content, RouterPart(len(errs[i]), None, error_histogram(errs[i])))
        replies.append(_reply(m, content))
    st.aggregate_train(2, replies)
    pooled = error_histogram(np.concatenate(errs))
    assert st.state.thresholds["color"] == pytest.approx(histogram_quantile(pooled, 0.9))
    assert st.state.thresholds["color"] == pytest.approx(np.quantile(np.concatenate(errs), 0.9), rel=0.05)


def test_a_client_without_audio_neither_feeds_nor_dilutes_the_audio_experts():
    cfg = parse_config({"federation.fraction": 1.0,
                        "data.tasks": "pitch", "federation.rounds-per-task": 1, "lora.rank": 2,
                        "lora.alpha": 4, "dmole.modality-floor": 0.0, "dmole.budget-fraction": 0.5,
                        "dmole.router": "none", "federation.downlink-compression": "none"})
    st = FedMoleStrategy(cfg, MMAP, DIMS)
    _probe_all(st, 1, "pitch", {L0: 1.0, L1: 0.0, V0: 0.0, A0: 3.0})
    assert sorted(st.plan.modules_of("pitch")) == sorted([L0, A0])
    msgs = list(st.configure_train(2, ArrayRecord(), ConfigRecord(), Grid()))
    rng = np.random.default_rng(3)
    t = {}
    for cid in ("audio", "text"):
        t[cid] = {}
        for m in (L0, A0):
            t[cid][f"{m}.lora_A"] = rng.standard_normal((2, 6)).astype(np.float32)
            t[cid][f"{m}.lora_B"] = rng.standard_normal((5, 2)).astype(np.float32)
    replies = [_reply(msgs[0], encode_update(ClientUpdate("audio", "pitch", 2, 1,
                                                          frozenset({"audio", "language"}), t["audio"]))),
               _reply(msgs[1], encode_update(ClientUpdate("text", "pitch", 2, 3,
                                                          frozenset({"language"}), t["text"])))]
    st.aggregate_train(2, replies)
    e = st.state.experts["pitch"]

    def dw(d, m):
        return d[f"{m}.lora_B"].astype(np.float64) @ d[f"{m}.lora_A"]
    assert np.allclose(dw(e, A0), dw(t["audio"], A0), atol=1e-5)  # the audio client's alone
    mean = (1 * dw(t["audio"], L0) + 3 * dw(t["text"], L0)) / 4
    # two rank-2 updates: the mean has rank ≤ 4 > r → SVD truncation (the best rank-2 fit)
    u, s, vt = np.linalg.svd(mean)
    assert np.allclose(dw(e, L0), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)


def test_skips_are_not_rejections_and_dropout_withholds_messages():
    from protocol.updates import encode_skip

    cfg = parse_config({"federation.fraction": 1.0,
                        "data.tasks": "color", "federation.rounds-per-task": 1, "lora.rank": 2,
                        "lora.alpha": 4, "dmole.modality-floor": 0.0, "dmole.router": "none",
                        "federation.dropout": 0.5, "federation.seed": 3})
    st = FedMoleStrategy(cfg, MMAP, DIMS)
    sent = list(st.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert st.rejected["dropped"] == 3 - len(sent)
    replies = [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5, {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0})))
               for i, m in enumerate(sent)]
    if sent:
        replies[0] = _reply(sent[0], encode_skip("c0", "color", "no-data"))
    if len(sent) > 1:
        st.aggregate_train(1, replies)
        assert "malformed" not in st.rejected and st.state.comm["client_rounds"] == len(sent) - 1


def test_fedavg_baseline_has_one_shared_adapter_and_no_probe():
    cfg = parse_config({"federation.fraction": 1.0,
                        "data.tasks": "color,pitch", "federation.rounds-per-task": 2,
                        "lora.rank": 2, "lora.alpha": 4, "federation.method": "fedavg-seq-lora",
                        "federation.downlink-compression": "none"})
    st = FedMoleStrategy(cfg, MMAP, DIMS)
    assert st.total_rounds == 4 and st.plan.tasks == ("shared",)
    msgs = list(st.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert msgs[0].content["config"]["phase"] == "train"
    assert {k.split("/")[1] for k in msgs[0].content["arrays"].keys()} == {"shared"}
    tensors = {k: v + 1.0 for k, v in unpack_state(msgs[0].content["arrays"])[0]["shared"].items()}
    st.aggregate_train(1, [_reply(m, encode_update(ClientUpdate(f"c{i}", "color", 1, 5,
                                                                frozenset({"language", "vision"}), tensors)))
                           for i, m in enumerate(msgs)])
    assert st.rejected == {} and st.state.comm["client_rounds"] == 3
    got = st.state.experts["shared"]
    for m in (L0, V0):  # every client sent the same factors: exact
        assert np.allclose(got[f"{m}.lora_B"] @ got[f"{m}.lora_A"],
                           tensors[f"{m}.lora_B"] @ tensors[f"{m}.lora_A"], atol=1e-5)
    # audio: no client holds it → the shared adapter's audio part is unchanged (B = 0)
    assert not got[f"{A0}.lora_B"].any()


def test_checkpoint_round_trip_resumes_at_the_saved_round(tmp_path, strategy):
    from protocol.state import CheckpointError, load_checkpoint

    strategy.checkpoint_dir = tmp_path
    _probe_all(strategy, 1, "color", {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0})
    strategy.on_round_end(1, ArrayRecord())
    state = load_checkpoint(tmp_path)
    assert state.round == 1 and state.plan.tasks == ("color",)
    for k, v in strategy.state.experts["color"].items():
        assert np.array_equal(state.experts["color"][k], v)
    resumed = FedMoleStrategy(strategy.cfg, MMAP, DIMS, state=state)
    assert resumed.offset == 1 and resumed._round(1).phase == "train"  # Flower's 1 = global 2
    (tmp_path / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_probe_reaches_every_client_and_training_samples_the_fraction():
    cfg = parse_config({"data.tasks": "color", "federation.fraction": 0.34, "federation.min-clients": 2,
                        "federation.rounds-per-task": 1, "lora.rank": 2, "lora.alpha": 4,
                        "dmole.router": "none"})
    st = FedMoleStrategy(cfg, MMAP, DIMS)
    probe = list(st.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert len(probe) == 3
    st.aggregate_train(1, [])  # nobody answered: a blind allocation, the run goes on
    assert st.plan.tasks == ("color",) and st.rejected["probe-fallback"] == 1
    assert len(list(st.configure_train(2, ArrayRecord(), ConfigRecord(), Grid()))) == 2


def test_a_sampled_training_round_goes_to_the_tasks_holders_only():
    from protocol.updates import encode_skip

    cfg = parse_config({"data.tasks": "color", "federation.clients": 8, "federation.fraction": 0.25,
                        "federation.min-clients": 2, "federation.rounds-per-task": 2,
                        "lora.rank": 2, "lora.alpha": 4, "dmole.router": "none"})
    st = FedMoleStrategy(cfg, MMAP, DIMS)
    grid = Grid(nodes=range(1, 9))
    probe = list(st.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert len(probe) == 8  # the probe reaches everyone
    scores = {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0}
    holders = {m.metadata.dst_node_id for m in probe[:3]}
    st.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5, scores)))
                           if m.metadata.dst_node_id in holders
                           else _reply(m, encode_skip(f"c{i}", "color", "no-data"))
                           for i, m in enumerate(probe)])
    for r in (2, 3):  # 25% of 8 = 2 nodes, drawn among the 3 holders every time
        msgs = list(st.configure_train(r, ArrayRecord(), ConfigRecord(), grid))
        assert len(msgs) == 2 and {m.metadata.dst_node_id for m in msgs} <= holders
    # holders unknown (e.g. a resumed run): Flower's sampling over every node
    st.holders.clear()
    assert len(list(st.configure_train(2, ArrayRecord(), ConfigRecord(), grid))) == 2


def test_size_sampling_draws_holders_by_samples_and_weights_updates_by_draws():
    """federation.client-sampling = size: k draws with replacement ∝ declared samples; a node
    drawn twice gets one message and weight 2, so the round's mean is unbiased for the full one."""
    from protocol.updates import encode_skip

    rounds = 80
    cfg = parse_config({"data.tasks": "color", "federation.clients": 6, "federation.fraction": 0.75,
                        "federation.min-clients": 2, "federation.rounds-per-task": rounds,
                        "federation.client-sampling": "size", "lora.rank": 2, "lora.alpha": 4,
                        "dmole.router": "none", "federation.downlink-compression": "none"})
    st = FedMoleStrategy(cfg, MMAP, DIMS)
    grid = Grid(nodes=range(1, 7))
    probe = list(st.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    sizes = {1: 700, 2: 100, 3: 100, 4: 100}  # nodes 5 and 6 hold no data of the task
    scores = {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0}
    st.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{n}", "color", sizes[n], scores)))
                           if (n := m.metadata.dst_node_id) in sizes else
                           _reply(m, encode_skip(f"c{n}", "color", "no-data")) for m in probe])
    draws = dict.fromkeys(sizes, 0)
    checked = False
    rng = np.random.default_rng(1)
    for r in range(2, 1 + rounds):  # the last round is kept for the resumed cloud below
        msgs = list(st.configure_train(r, ArrayRecord(), ConfigRecord(), grid))
        drawn = dict(st._draws)
        # int(4 holders · 0.75) = 3 draws; one message per drawn node, holders only
        assert sum(drawn.values()) == 3 and {m.metadata.dst_node_id for m in msgs} == set(drawn)
        assert len(msgs) == len(drawn) and set(drawn) <= set(sizes)
        for n, k in drawn.items():
            draws[n] += k
        if checked or len(drawn) < 2 or max(drawn.values()) < 2:
            st.aggregate_train(r, [])  # nobody answers: the experts stay as they were
            continue
        # a round with a node drawn twice: its update weighs 2, whatever samples it claims
        sent = {k.split("/", 2)[2]: v for k, v in msgs[0].content["arrays"].items()}
        replies, deltas = [], []
        for m in msgs:
            n = m.metadata.dst_node_id
            a, b = sent[f"{L0}.lora_A"].numpy(), rng.standard_normal((5, 2)).astype(np.float32)
            tensors = {f"{L0}.lora_A": a, f"{L0}.lora_B": b, f"{L1}.lora_A": sent[f"{L1}.lora_A"].numpy(),
                       f"{L1}.lora_B": np.zeros((5, 2), np.float32)}
            deltas.append((drawn[n], b.astype(np.float64) @ a))
            replies.append(_reply(m, encode_update(ClientUpdate(f"c{n}", "color", r, sizes[n],
                                                                frozenset({"language"}), tensors))))
        st.aggregate_train(r, replies)
        e = st.state.experts["color"]
        expected = sum(w * d for w, d in deltas) / sum(w for w, _ in deltas)
        assert np.allclose(e[f"{L0}.lora_B"].astype(np.float64) @ e[f"{L0}.lora_A"], expected, atol=1e-5)
        checked = True
    assert checked
    # ∝ samples: node 1 holds 70% and gets about 70% of the 237 draws (binomial sd 7)
    share = draws[1] / (3 * (rounds - 1))
    assert 0.6 <= share <= 0.8 and min(draws[n] for n in (2, 3, 4)) > 0
    # without the probe's sizes (a resumed cloud): Flower's uniform sampling, weights by samples
    st.node_samples.clear()
    msgs = list(st.configure_train(1 + rounds, ArrayRecord(), ConfigRecord(), grid))
    assert st._draws == {} and len(msgs) == 3


def test_scaled_update_is_shrunk_duplicates_refused_and_claimed_samples_capped(strategy):
    """A ×100 update is pulled back to 3× the round's median change; a second reply of the same
    client is refused; a client claiming more samples than it declared in the probe is capped."""
    from flwr.app import ArrayRecord, ConfigRecord

    probe = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    scores = {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0}
    strategy.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 4, scores)))
                                 for i, m in enumerate(probe)])
    msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), Grid()))
    sent = {k.split("/", 2)[2]: v.numpy() for k, v in msgs[0].content["arrays"].items()}
    rng = np.random.default_rng(1)

    def update(cid, scale=1.0, n=4):
        t = {}
        for m in (L0, L1):
            t[f"{m}.lora_A"] = sent[f"{m}.lora_A"]
            t[f"{m}.lora_B"] = (scale * rng.standard_normal((5, 2))).astype(np.float32)
        return ClientUpdate(cid, "color", 2, n, frozenset({"language"}), t)

    honest = [update("c0"), update("c1")]
    attacker = update("c2", scale=100.0, n=10**9)  # declared 4 samples in the probe
    replies = [_reply(msgs[0], encode_update(honest[0])), _reply(msgs[1], encode_update(honest[1])),
               _reply(msgs[2], encode_update(attacker)), _reply(msgs[0], encode_update(honest[0]))]
    strategy.aggregate_train(2, replies)
    assert strategy.rejected == {"norm-clipped": 1, "samples-capped": 1, "duplicate": 1}
    got = {m: strategy.state.experts["color"][f"{m}.lora_B"].astype(np.float64)
           @ strategy.state.experts["color"][f"{m}.lora_A"] for m in (L0, L1)}
    norms = [np.sqrt(sum(np.sum((u.tensors[f"{m}.lora_B"].astype(np.float64)
                                 @ u.tensors[f"{m}.lora_A"]) ** 2) for m in (L0, L1)))
             for u in honest + [attacker]]
    limit = 3.0 * float(np.median(norms))
    total = np.sqrt(sum(np.sum(g ** 2) for g in got.values()))
    # equal weights after the cap; the attacker's change counts at most `limit` (not 100×)
    assert total <= (norms[0] + norms[1] + limit) / 3 + 1e-6
    assert norms[2] > 30 * limit / 3


def _trained(strategy, grid=None):
    """Probe round of color done; the training round's messages and the experts sent."""
    probe = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    scores = {L0: 1.0, L1: 2.0, V0: 0.0, A0: 0.0}
    strategy.aggregate_train(1, [_reply(m, encode_probe(ProbeReply(f"c{i}", "color", 5, scores)))
                                 for i, m in enumerate(probe)])
    msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid or Grid()))
    sent = unpack_state(msgs[0].content["arrays"])[0]["color"]  # as a client decodes it
    return msgs, sent


def _client_update(cid, sent, rng, scale=1.0, n=5):
    tensors = {}
    for m in (L0, L1):
        tensors[f"{m}.lora_A"] = sent[f"{m}.lora_A"]
        tensors[f"{m}.lora_B"] = (scale * rng.standard_normal((5, 2))).astype(np.float32)
    return ClientUpdate(cid, "color", 2, n, frozenset({"language"}), tensors)


def test_median_aggregation_shrugs_off_a_client_scaled_a_hundred_fold():
    cfg = parse_config({"data.tasks": "color,pitch", "federation.rounds-per-task": 2,
                        "lora.rank": 2, "lora.alpha": 4, "dmole.modality-floor": 0.0,
                        "federation.clip-factor": 0, "federation.aggregation": "median",
                        "federation.downlink-compression": "none"})
    s = FedMoleStrategy(cfg, MMAP, DIMS)
    msgs, sent = _trained(s)
    rng = np.random.default_rng(0)
    ups = [_client_update("c0", sent, rng), _client_update("c1", sent, rng),
           _client_update("c2", sent, rng, scale=100.0, n=10_000)]
    s.aggregate_train(2, [_reply(m, encode_update(u)) for m, u in zip(msgs, ups, strict=True)])
    got = s.state.experts["color"]
    for m in (L0, L1):
        d = [u.tensors[f"{m}.lora_B"].astype(np.float64) @ u.tensors[f"{m}.lora_A"] for u in ups]
        a, b = svd_factors(np.median(np.stack(d), 0), 2)  # the median's best rank-2 factors
        assert np.allclose(got[f"{m}.lora_B"].astype(np.float64) @ got[f"{m}.lora_A"], b @ a,
                           atol=1e-5)
        assert np.abs(got[f"{m}.lora_B"]).max() < 10  # the ×100 client moved nothing far


def _round_trip(strategy, grid, first):
    """The round's exchange through the strategy's link (cloud.downlink): the first send is
    answered with ``first`` (the replies that came back), every retry by ``grid``; returns all
    replies, as Strategy.start hands them to ``aggregate_train``."""
    from cloud.downlink import Downlink

    class Once:
        def __init__(self):
            self.calls = 0

        def get_node_ids(self):
            return grid.get_node_ids()

        def send_and_receive(self, messages, timeout=None):
            self.calls += 1
            return first if self.calls == 1 else grid.send_and_receive(messages, timeout)

    link = Downlink(Once(), lambda c: None, delta=False, retry=strategy.retry_policy)
    return list(link.send_and_receive(strategy._sent))


def test_below_quorum_a_round_is_retried_then_skipped_and_the_run_goes_on():
    cfg = parse_config({"data.tasks": "color,pitch", "federation.rounds-per-task": 2,
                        "lora.rank": 2, "lora.alpha": 4, "dmole.modality-floor": 0.0,
                        "federation.quorum": 2, "federation.round-retries": 2})
    rng = np.random.default_rng(0)
    s = FedMoleStrategy(cfg, MMAP, DIMS)
    silent = Grid()  # the retries reach nobody
    msgs, sent = _trained(s, silent)
    before = {k: v.copy() for k, v in s.state.experts["color"].items()}
    replies = _round_trip(s, silent, [_reply(msgs[0], encode_update(_client_update("c0", sent, rng)))])
    _, metrics = s.aggregate_train(2, replies)
    assert len(silent.resent) == 2 and all(len(r) == 2 for r in silent.resent)
    assert {m.metadata.dst_node_id for m in silent.resent[0]} == \
        {11, 12, 13} - {msgs[0].metadata.dst_node_id}  # not the node that answered
    assert metrics["skipped"] == 1 and s.rejected["round-skipped"] == 1 and s.rejected["retried"] == 4
    assert all(np.array_equal(before[k], v) for k, v in s.state.experts["color"].items())

    # nodes that answered "no data of this task" were heard: only the silent one is re-sent
    from protocol.updates import encode_skip

    s3 = FedMoleStrategy(cfg, MMAP, DIMS)
    silent3 = Grid()
    msgs, sent = _trained(s3, silent3)
    s3.aggregate_train(2, _round_trip(s3, silent3, [
        _reply(msgs[0], encode_update(_client_update("c0", sent, rng))),
        _reply(msgs[1], encode_skip("c1", "color", "no data"))]))
    assert [[m.metadata.dst_node_id for m in r] for r in silent3.resent] == \
        [[msgs[2].metadata.dst_node_id]] * 2

    # a retry that reaches a node completes the quorum: the round counts
    def answer(m):
        return _reply(m, encode_update(_client_update(f"c{m.metadata.dst_node_id}", sent, rng)))

    s2 = FedMoleStrategy(cfg, MMAP, DIMS)
    grid = Grid(answer=answer)
    msgs, sent = _trained(s2, grid)
    _, metrics = s2.aggregate_train(2, _round_trip(s2, grid, [
        _reply(msgs[0], encode_update(_client_update("c0", sent, rng)))]))
    assert len(grid.resent) == 1 and metrics["clients"] == 3 and "round-skipped" not in s2.rejected
    # aggregate_train itself sends nothing: every reply came through the link
    s4 = FedMoleStrategy(cfg, MMAP, DIMS)
    g4 = Grid(answer=answer)
    msgs, sent = _trained(s4, g4)
    s4.aggregate_train(2, [_reply(msgs[0], encode_update(_client_update("c0", sent, rng)))])
    assert g4.resent == [] and s4.rejected["round-skipped"] == 1


def test_too_few_nodes_wait_until_the_deadline_then_go_on_with_those(monkeypatch):
    cfg = parse_config({"data.tasks": "color,pitch", "federation.min-clients": 3,
                        "federation.round-timeout": 2.0, "lora.rank": 2, "lora.alpha": 4})
    s = FedMoleStrategy(cfg, MMAP, DIMS)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), Grid(nodes=(11, 12))))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]  # not a wait for ever
    assert s.min_available_nodes == 3  # restored for the next round
    assert list(s.configure_train(1, ArrayRecord(), ConfigRecord(), Grid(nodes=()))) == []
