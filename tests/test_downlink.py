"""The delta-only downlink: manifests and digests (protocol.state_sync), the node's cache
(edge.state_cache), the Grid wrapper (cloud.downlink), and the real strategy driving the real
ClientApp handler through it: the same results as the full downlink, fewer bytes, and a node
that lost its cache gets the whole state again."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict

from cloud.downlink import Downlink
from edge.state_cache import DIR as CACHE_DIR
from edge.state_cache import DiskGroupCache
from protocol.config import parse_config
from protocol.instructions import as_sent, pack_state, unpack_state
from protocol.state_sync import (
    MissingState,
    encode_need_state,
    fill,
    manifest_of,
    need_state,
    split_groups,
    strip,
)
from protocol.updates import MessageError
from protocol.wire_pack import unpack_record


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    """Flower stamps messages with the running ServerApp's ids; these tests run none."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _state(seed: int = 0):
    rng = np.random.default_rng(seed)
    experts = {t: {"m.lora_A": rng.standard_normal((4, 6)).astype(np.float32),
                   "m.lora_B": rng.standard_normal((5, 4)).astype(np.float32)} for t in ("a", "b")}
    routers = {"a": {"enc.weight": rng.standard_normal((3, 6)).astype(np.float32),
                     "enc.bias": rng.standard_normal(3).astype(np.float32)}}
    return experts, routers


def _content(experts, routers, compression="int8", plan='{"tasks": []}') -> RecordDict:
    return RecordDict({"arrays": pack_state(experts, routers, compression),
                       "config": ConfigRecord({"phase": "train", "plan": plan})})


class DictCache(dict):
    def get(self, group, digest):  # type: ignore[override]
        v = super().get((group, digest))
        return v

    def put(self, group, digest, value):
        self[(group, digest)] = value


def test_a_stripped_message_filled_from_the_cache_is_the_full_message():
    content = _content(*_state())
    man = manifest_of(content)
    assert set(man) == {"expert/a", "expert/b", "router/a", "plan"}
    cache = DictCache()
    first = fill(strip(content, man, {}), cache)  # everything travels, and is cached
    held = dict(man)
    slim = strip(content, man, held)
    assert len(slim["arrays"]) == 0 and slim["config"]["plan"] == ""
    again = fill(slim, cache)
    for got in (first, again):
        assert got["config"]["plan"] == content["config"]["plan"] and "state" not in got["config"]
        assert {k: got["arrays"][k].data for k in got["arrays"]} == \
            {k: content["arrays"][k].data for k in content["arrays"]}
    # the content Flower shares between nodes is left as it was
    assert len(content["arrays"]) == len(first["arrays"]) and "state" not in content["config"]


def test_a_group_neither_sent_nor_held_is_asked_for_and_altered_bytes_are_refused():
    content = _content(*_state())
    man = manifest_of(content)
    with pytest.raises(MissingState) as e:
        fill(strip(content, man, {"expert/a": man["expert/a"], "plan": man["plan"]}), DictCache())
    assert sorted(e.value.groups) == ["expert/a", "plan"]
    # a new version of a group the node holds an older one of: sent again
    newer = _content(*_state(1))
    assert set(split_groups(strip(newer, manifest_of(newer), man)["arrays"])) == \
        {"expert/a", "expert/b", "router/a"}
    bad = strip(content, man, {})
    k = next(iter(bad["arrays"]))
    a = bad["arrays"][k]
    bad["arrays"][k] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype,
                             data=a.data[:-1] + bytes([a.data[-1] ^ 1]))
    with pytest.raises(MessageError, match="does not match its digest"):
        fill(bad, DictCache())
    reply = encode_need_state(["router/a", "expert/a"])
    assert need_state(reply) == ["expert/a", "router/a"] and need_state(RecordDict()) is None


def test_a_message_without_a_manifest_is_taken_as_it_is():
    content = _content(*_state())
    assert fill(content, DictCache()) is content


def test_the_disk_cache_keeps_the_latest_version_and_reads_damage_as_not_held(tmp_path):
    content = _content(*_state())
    man = manifest_of(content)
    cache = DiskGroupCache(tmp_path)
    fill(strip(content, man, {}), cache)
    got = cache.get("expert/a", man["expert/a"])
    assert isinstance(got, dict) and {k: v.data for k, v in got.items()} == \
        {k: v.data for k, v in split_groups(content["arrays"])["expert/a"].items()}
    assert cache.get("plan", man["plan"]) == content["config"]["plan"]
    assert cache.get("expert/a", "0" * 32) is None  # another version
    newer = _content(*_state(1))
    fill(strip(newer, manifest_of(newer), {}), cache)
    assert cache.get("expert/a", man["expert/a"]) is None  # replaced
    assert len(list(tmp_path.iterdir())) == 4  # one file per group, no temp files left
    f = cache._path("expert/b")
    f.write_bytes(f.read_bytes()[:-3])  # cut short
    assert cache.get("expert/b", manifest_of(newer)["expert/b"]) is None
    f.write_bytes(b"garbage")
    assert cache.get("expert/b", manifest_of(newer)["expert/b"]) is None


def test_the_cloud_holds_its_state_as_the_clients_decode_it():
    experts, routers = _state()
    for mode in ("none", "fp16", "int8"):
        held = {t: as_sent(d, mode) for t, d in experts.items()}
        e, r = unpack_state(pack_state(held, {"a": as_sent(routers["a"], mode)}, mode))
        for t in held:
            for k in held[t]:
                np.testing.assert_allclose(e[t][k], held[t][k], rtol=1e-6, atol=0)
        assert r["a"]["enc.bias"].dtype == np.float32
        np.testing.assert_array_equal(r["a"]["enc.bias"], routers["a"]["enc.bias"])  # vectors: fp32
    rec = pack_state(experts, routers, "int8")
    assert rec["expert/a/m.lora_A"].numpy().dtype == np.int8
    assert "router/a/enc.bias::scale" not in rec


class NodeGrid:
    """Nodes that answer like ``answer(node, message)``; records every message sent."""

    def __init__(self, answer, nodes=(11, 12)):
        self.answer, self.nodes, self.sent = answer, list(nodes), []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        msgs = list(messages)
        self.sent.append(msgs)
        return [Message(content=self.answer(m.metadata.dst_node_id, m), reply_to=m) for m in msgs]


def test_the_wrapper_sends_each_node_what_it_lacks_and_everything_after_a_lost_cache():
    caches = {11: DictCache(), 12: DictCache()}
    got: dict[int, RecordDict] = {}

    def answer(node, m):
        try:  # as the ClientApp does: the arrays arrive packed into one wire object
            got[node] = fill(unpack_record(m.content), caches[node])
        except MissingState as e:
            return encode_need_state(e.groups)
        return RecordDict({"meta": ConfigRecord({"ok": True})})

    grid = NodeGrid(answer)
    counted: list[int] = []
    link = Downlink(grid, lambda c: counted.append(len(c["arrays"])))
    content = _content(*_state())

    def round_(c):
        return list(link.send_and_receive([Message(content=c, message_type="train", dst_node_id=n)
                                           for n in (11, 12)]))

    assert len(round_(content)) == 2 and counted == [11, 11]  # 3 groups: int8 matrices + scales, a bias
    assert len(round_(content)) == 2 and counted[2:] == [0, 0]  # nothing new: nothing sent
    assert got[12]["config"]["plan"] == content["config"]["plan"]
    caches[12].clear()  # node 12 restarted with an empty state folder
    experts, routers = _state(0)
    partly = _content({"a": _state(1)[0]["a"], "b": experts["b"]}, routers)  # only expert/a is new
    replies = round_(partly)
    assert len(replies) == 2 and all(need_state(r.content) is None for r in replies)
    assert counted[4:] == [4, 4, 11]  # node 11: expert/a; node 12: the same, then everything
    assert link.resent == 1 and grid.sent[-1][0].metadata.dst_node_id == 12
    assert {k: v.data for k, v in got[12]["arrays"].items()} == \
        {k: v.data for k, v in partly["arrays"].items()}


# --- the real strategy and the real ClientApp handler, through the wrapper ---------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_cfg):
    from simulation.federated import prepare

    root = tmp_path_factory.mktemp("downlink")
    cfg = parse_config({"data.cache-dir": str(root / "cache"), "data.tasks": "color,arith",
                        "federation.clients": 2, "federation.dirichlet-alpha": 100.0,
                        "federation.min-samples": 1, "federation.no-audio-fraction": 0.0,
                        "federation.local-steps": 2, "federation.local-epochs": 0.0,
                        "federation.router-local-epochs": 2, "federation.rounds-per-task": 2,
                        "federation.method": "dmole-replay"}, base=tiny_cfg)
    cfg, _, _ = prepare(cfg, root / "run", progress=False)
    return cfg, root / "run" / "clients"


def _run(cfg, clients: Path, downlink: str, tmp: Path, lose_cache_after_task: int = -1,
         node_extra: dict | None = None):
    """The task loop of ``cfg`` on two nodes answered by the ClientApp's handler (node config
    ``node_extra`` added to each node's); the strategy at the end."""
    from cloud.server_app import learn_task
    from cloud.strategy import FedMoleStrategy
    from edge.client_app import _handle
    from mole.backbone import load_backbone
    from mole.modality import modality_map, module_dims
    from mole.router import DEFAULT_BLOCKS
    from protocol.app_config import AppConfig

    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, downlink=downlink))
    here = tmp / downlink
    shutil.copytree(clients, here)  # each run its own node state folders
    flat = {**cfg.to_flat(), **AppConfig(clients_dir=str(here), client_threads=1).to_flat()}
    nodes = {101: 0, 102: 1}

    def answer(node, m):
        ctx = Context(run_id=1, node_id=node,
                      node_config={"partition-id": nodes[node], **(node_extra or {})},
                      state=RecordDict(), run_config={})
        return _handle(m, ctx, flat).content

    model, _ = load_backbone(cfg.model.base_path)
    mmap = modality_map(model)
    st = FedMoleStrategy(cfg, mmap, module_dims(model, list(mmap)),
                         router_dim=model.hidden_size * len(DEFAULT_BLOCKS))
    grid = NodeGrid(answer, nodes=tuple(nodes))
    for t in range(len(cfg.data.tasks)):
        learn_task(st, grid, t, timeout=60)  # type: ignore[arg-type]
        if t == lose_cache_after_task:
            shutil.rmtree(here / "client-01" / "_state" / CACHE_DIR)
    return st


def test_delta_and_full_downlinks_give_the_same_run_and_a_lost_cache_is_refilled(scenario, tmp_path):
    cfg, clients = scenario
    full = _run(cfg, clients, "full", tmp_path)
    delta = _run(cfg, clients, "delta", tmp_path / "d", lose_cache_after_task=0)
    assert sorted(full.state.acc_matrix) == [0, 1] and full.state.comm["client_rounds"] >= 6
    assert full.state.acc_matrix == delta.state.acc_matrix  # bit for bit the same run
    for t in full.state.experts:
        for k, v in full.state.experts[t].items():
            np.testing.assert_array_equal(delta.state.experts[t][k], v)
    assert delta.state.comm["bytes_up"] == full.state.comm["bytes_up"]
    assert delta.state.comm["bytes_down"] < 0.8 * full.state.comm["bytes_down"]
    assert full.downlink is not None and full.downlink.resent == 0
    assert delta.downlink is not None and delta.downlink.resent >= 1  # the node that lost its cache
    assert delta.rejected.get("client-error", 0) == 0 and delta.rejected.get("malformed", 0) == 0
    # Flower's Result of the last task's rounds holds the final global experts and routers
    assert delta.result is not None
    experts, routers = unpack_state(delta.result.arrays)
    assert set(experts) == set(delta.state.experts) and set(routers) == set(delta.state.routers)
    for t, d in delta.state.experts.items():
        for k, v in d.items():
            np.testing.assert_array_equal(experts[t][k], v)
