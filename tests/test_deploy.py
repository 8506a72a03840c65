"""A real deployment on 127.0.0.1 (deploy/launcher.py): SuperLink with TLS and SuperNode
authentication, 3 SuperNodes, the bundle registry and 3 inference services, all as processes
started and stopped by PID; a stream of 2 tasks (color, beats) on a small model that learns them.

Node 3 is malicious in the first run (NaN experts in even rounds, ×100-scaled ones in odd rounds)
and is killed with SIGKILL and restarted mid-run; its accuracy is compared with the same run
with node 3 withholding its data (what the defences can keep)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import launcher as L
from deploy import topology as T
from deploy.pki import make_node_key
from protocol.config import parse_config
from tests.conftest import LEARNABLE_BASE

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


# The default model, pretrained briefly, on near-IID shards: small enough for CI, and it learns
# both tasks, so "within 2 points of the run with node 3 withholding" measures something. The scenario
# keeps client-lr 3e-3: at the default 6e-3 two runs whose aggregates differ (a median over 2
# honest + 1 attacked node vs over 3 honest) measured 63.5 and 59.5 once; larger steps spread them.
LEARNABLE = {**LEARNABLE_BASE, "federation.client-lr": 3e-3,
             "replay.buffer-size": 40, "federation.dirichlet-alpha": 100.0,
             "federation.no-audio-fraction": 0.0, "federation.rounds-per-task": 3,
             "federation.local-epochs": 8.0, "federation.local-steps": 100,
             "federation.router-local-epochs": 50, "federation.min-samples": 8,
             "federation.min-clients": 2, "federation.round-timeout": 60.0,
             "federation.aggregation": "median"}
ACCURACY: dict[str, float] = {}  # run → mean accuracy over both tasks at the end


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, learnable_cache):
    out = tmp_path_factory.mktemp("deploy") / "d"
    cfg = parse_config({"data.cache-dir": str(learnable_cache), **LEARNABLE})
    dep = L.up(out, 3, cfg, run=False, attacks={3: "mixed"})
    try:
        yield dep, cfg
    finally:
        L.down(out)
        left = [n for n, p in L.Deployment.load(out).pids.items() if L.alive(p)]
        assert not left, f"processes left running: {left}"


def _nodes(dep) -> list[dict]:
    r = L.flwr(dep, "supernode", "list", "--format", "json")
    return json.loads(r.stdout)["nodes"]


def test_an_unregistered_node_is_refused(deployment):
    dep, _ = deployment
    key = make_node_key(dep.out / "pki", "intruder")
    pid = L.start(dep, "intruder", T.supernode(L.topology_of(dep), 1, key=key.private,
                                               port=L.free_port()))
    try:
        deadline = time.time() + 60
        while "Connection attempt failed" not in dep.log("intruder").read_text():
            assert time.time() < deadline, dep.log("intruder").read_text()[-2000:]
            time.sleep(1)
        nodes = _nodes(dep)
        assert len(nodes) == 3 and all(n["status"] == "online" for n in nodes)
    finally:
        L.stop_pid(pid)


def _last_row_mean(result: dict) -> float:
    rows = result["acc_matrix"]
    return float(np.mean(rows[str(len(rows) - 1)]))


def test_run_with_a_malicious_node_killed_and_restarted_completes_and_edges_serve_its_bundles(
        deployment):
    from cloud.registry import BundleStore
    from edge.replay_store import ReplayStore
    from protocol.inference_codec import encode_input, encode_request
    from protocol.proto import inference_pb2_grpc

    dep, cfg = deployment
    L.submit(dep)
    checkpoint = dep.out / "cloud" / "checkpoint.safetensors"
    deadline = time.time() + 600
    while not checkpoint.is_file():  # round 1 (task 1's probe) is done
        assert time.time() < deadline and L.run_status(dep) != "finished:failed"
        time.sleep(1)
    victim = dep.pids["supernode-3"]
    os.killpg(victim, signal.SIGKILL)  # kill -9 of the node and its ClientApps
    L.stop_pid(victim, grace=1)
    L.restart_node(dep, 3)  # retried until the SuperLink lets the same identity back in
    status = L.wait(dep, timeout=1200)
    assert status == "finished:completed", dep.log("run").read_text()[-3000:]

    result = json.loads((dep.out / "cloud" / "server_result.json").read_text())
    assert result["round"] == 2 * 4 and set(result["acc_matrix"]) == {"0", "1"}
    # node 3's NaN experts were rejected (int8 wire format: a NaN row scale is a malformed
    # message; uncompressed: non-finite values are invalid) and its ×100 ones clipped, each counted
    rejected = result["rejected"]
    assert rejected.get("invalid", 0) + rejected.get("malformed", 0) >= 1, rejected
    assert rejected.get("norm-clipped", 0) >= 1, rejected
    # per node: the bad updates all came from one node, the malicious one
    bad = {n for n, kinds in result["rejected_by_node"].items()
           if {"invalid", "malformed", "norm-clipped"} & set(kinds)}
    assert len(bad) == 1, result["rejected_by_node"]
    ACCURACY["malicious"] = _last_row_mean(result)
    nodes = _nodes(dep)
    assert len(nodes) == 3 and all(n["status"] == "online" for n in nodes), nodes  # it rejoined
    # every node's replay buffer (the killed one's too) is intact on disk and loads
    sizes = [len(ReplayStore(f, cfg.replay.buffer_size, None, 0))
             for f in (dep.out / "run" / "clients").glob("client-*/_state/replay")]
    assert sizes and max(sizes) > 0

    # the cloud published a signed bundle per task; each edge serves the latest one
    store = BundleStore(dep.out / "registry", dep.out / "pki" / "bundle.pub")
    latest = store.latest()
    assert latest is not None and [m.tasks for m in store.list()] == [("color",), ("color", "beats")]
    img = np.zeros((32, 32, 3), np.uint8)
    for port in dep.ports["serve"]:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            health = health_pb2_grpc.HealthStub(channel)
            stub = inference_pb2_grpc.InferenceStub(channel)
            deadline = time.time() + 120
            while True:
                try:
                    resp = stub.Predict(encode_request([encode_input("what color", image=img)]),
                                        timeout=30)
                    if resp.bundle_id == latest.bundle_id:
                        break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                assert time.time() < deadline, dep.log("serve-1").read_text()[-2000:]
                time.sleep(1)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        finally:
            channel.close()


def _rerun(dep, name: str) -> dict:
    """Submit the same run again (empty replay buffers, no registry) and return its result."""
    for state in (dep.out / "run" / "clients").glob("client-*/_state"):
        shutil.rmtree(state)  # every run starts with empty replay buffers
    L.submit(dep, {"app.out-dir": str(dep.out / name), "app.registry-dir": ""})
    status = L.wait(dep, timeout=1200)
    assert status == "finished:completed", dep.log("run").read_text()[-3000:]
    result = json.loads((dep.out / name / "server_result.json").read_text())
    assert not {"invalid", "malformed", "norm-clipped"} & set(result["rejected"]), result["rejected"]
    return result


def test_the_malicious_node_costs_no_more_than_withholding_its_data(deployment):
    """The defences drop node 3's NaN updates and clip its ×100 ones, and the kill loses its
    updates of a round: what the attacked run can keep is the two honest nodes' learning. So
    the yardstick is the same run with node 3 *withholding* (it skips every probe and training
    round and still evaluates on its own test data, so both runs are scored on the same
    samples). An honest 3-node run is not the bar: node 3's data is worth a few points once the
    base learns the tasks well, more than the defences can be asked to keep. It is not run
    here either (it added ~3.5 min to a suite that must fit in 30); it measured clean 58.5 vs
    withholding 58.0 vs malicious 57.0 when it was."""
    dep, _ = deployment
    assert "malicious" in ACCURACY, "the malicious run did not finish"
    L.stop_pid(dep.pids["supernode-3"])
    L.restart_node(dep, 3, attack="withhold")
    withheld = _rerun(dep, "cloud-withhold")
    trained = [r["clients"] for r in withheld["rounds"] if r["phase"] == "train"]
    assert trained and all(n == 2 for n in trained), withheld["rounds"]  # node 3 sent nothing
    ACCURACY["withhold"] = _last_row_mean(withheld)
    print("final accuracy: node 3 withholding {withhold:.1f}, malicious "
          "{malicious:.1f}".format(**ACCURACY))
    assert ACCURACY["withhold"] > 30  # two honest nodes learned: the comparison means something
    assert ACCURACY["malicious"] >= ACCURACY["withhold"] - 2.0, ACCURACY
