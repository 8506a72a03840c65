"""The node worker (edge/worker.py): a real ``fedmole worker`` process on a Unix socket, driven by
the real ClientApp handler and the real strategy. A run whose messages all go through the worker
is the same run, bit for bit, as one handled in-process; a worker that is not there costs speed,
not the round; a failure inside the worker comes back as an error naming it; a peer without the
key is refused and the worker keeps serving."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from deploy.launcher import DeployError, alive, stop_pid, wait_socket
from edge.worker import WorkerError, WorkerUnavailable, forward, key_path
from tests.test_downlink import _run, run_identity, scenario  # noqa: F401  (fixtures)

BIN = Path(sys.executable).parent


def _start_worker(sock: Path) -> subprocess.Popen:
    log = sock.with_name("worker.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "fedmole"), "worker", "--socket", str(sock)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_socket(sock, proc.pid, log, timeout=120)
    except DeployError:
        stop_pid(proc.pid)
        raise
    return proc


@pytest.fixture()
def worker():
    short = Path(tempfile.mkdtemp(prefix="fw-"))  # a Unix socket path must stay short
    sock = short / "worker.sock"
    proc = _start_worker(sock)
    try:
        yield sock, proc
    finally:
        stop_pid(proc.pid)
        assert not alive(proc.pid)


@pytest.mark.slow
def test_a_run_through_the_worker_equals_the_in_process_run(scenario, tmp_path, worker):  # noqa: F811
    sock, proc = worker
    log = tmp_path / "timing.jsonl"
    here = _run(*scenario, "delta", tmp_path / "in-process")
    there = _run(*scenario, "delta", tmp_path / "worker",
                 node_extra={"worker": str(sock), "timing-log": str(log)})
    assert there.state.acc_matrix == here.state.acc_matrix and sorted(here.state.acc_matrix) == [0, 1]
    for t, d in here.state.experts.items():
        for k, v in d.items():
            np.testing.assert_array_equal(there.state.experts[t][k], v)
    assert there.state.comm["bytes_up"] == here.state.comm["bytes_up"]
    assert there.rejected.get("client-error", 0) == 0
    # every message was handled by the worker's process, which stayed up throughout
    rows = [__import__("json").loads(x) for x in log.read_text().splitlines()]
    assert rows and {r["where"] for r in rows} == {"worker"} and {r["pid"] for r in rows} == {proc.pid}
    assert {r["phase"] for r in rows} == {"probe", "train", "evaluate"}
    assert all(0 <= r["compute_s"] <= r["handle_s"] for r in rows)
    assert proc.poll() is None


def test_without_a_worker_the_clientapp_handles_the_message_itself(scenario, tmp_path, caplog):  # noqa: F811
    gone = Path(tempfile.mkdtemp(prefix="fw-")) / "worker.sock"  # nobody listens here
    with pytest.raises(WorkerUnavailable, match="no node worker"):
        forward(gone, RecordDict(), {}, {})
    log = tmp_path / "timing.jsonl"
    st = _run(*scenario, "delta", tmp_path / "fallback",
              node_extra={"worker": str(gone), "timing-log": str(log)})
    assert sorted(st.state.acc_matrix) == [0, 1] and st.rejected.get("client-error", 0) == 0
    assert {__import__("json").loads(x)["where"] for x in log.read_text().splitlines()} == {"clientapp"}
    assert "handling the message in the ClientApp process instead" in caplog.text


def test_a_failure_in_the_worker_names_itself_and_a_stranger_is_refused(worker):
    sock, proc = worker
    bad = RecordDict({"config": ConfigRecord({"phase": "train"})})
    with pytest.raises(WorkerError, match="node worker: ValueError: run config `model.base-path`"):
        forward(sock, bad, {"data-dir": "/nonexistent"}, {"model.base-path": ""})
    # a peer with the wrong key does not get in, and the worker goes on serving
    with pytest.raises((AuthenticationError, EOFError, OSError)):
        Client(str(sock), family="AF_UNIX", authkey=b"not the key")
    # a peer with the key that sends garbage (not JSON, not Flower's protobuf) costs that request
    key = bytes.fromhex(key_path(sock).read_text())
    for head, body in ((b"not json", b""), (b'{"node_config": {}, "run_config": {}}', b"\xff\x00garbage")):
        with Client(str(sock), family="AF_UNIX", authkey=key) as c, \
                pytest.raises((EOFError, OSError)):  # the worker hangs up on it
            c.send_bytes(head)
            c.send_bytes(body)
            c.recv_bytes()
    with pytest.raises(WorkerError, match="model.base-path"):
        forward(sock, bad, {"data-dir": "/nonexistent"}, {"model.base-path": ""})
    assert proc.poll() is None
    # a second worker on the same socket is refused; the first keeps it
    second = subprocess.run([str(BIN / "fedmole"), "worker", "--socket", str(sock)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "another node worker" in (second.stdout + second.stderr)
    assert proc.poll() is None and sock.exists()
