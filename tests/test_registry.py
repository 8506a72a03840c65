"""Bundle registry over real gRPC on 127.0.0.1: publish, list, health, watch, resumable verified download."""

from __future__ import annotations

import os
import queue
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.registry import (
    BundleStore,
    RegistryServicer,
    RunningRegistry,
    serve,
    start_registry,
)
from edge.bundle_client import DownloadInterrupted, RegistryClient, _announced_files
from protocol.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    generate_keypair,
    sha256_file,
    sign_bundle,
    verify_bundle,
    write_manifest,
)
from protocol.proto import registry_pb2, registry_pb2_grpc

FILES = {"model.onnx": 10_000, "model_int8.onnx": 3000, "tokenizer/tokenizer.json": 300,
         "tokenizer/special_tokens_map.json": 0}


def make_signed(folder: Path, key: Path, bundle_id: str, global_round: int = 1) -> Path:
    """A small signed bundle of random bytes."""
    folder.mkdir(parents=True)
    for rel, size in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(os.urandom(size))
    write_manifest(folder, bundle_id=bundle_id, global_round=global_round, tasks=["color"],
                   thresholds={"color": 0.5}, partners={}, extra={"opset": 17})
    sign_bundle(folder, key)
    return folder


@dataclass
class Env:
    root: Path
    key: Path
    pub: Path
    src: Path  # where bundles are built before publishing
    address: str
    store: BundleStore  # a second store on the same root: "the publisher process"

    def publish(self, bundle_id: str, global_round: int = 1) -> Path:
        self.store.publish(make_signed(self.src / bundle_id, self.key, bundle_id, global_round))
        return self.root / bundle_id


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "cloud.key", d / "cloud.pub")
    return d / "cloud.key", d / "cloud.pub"


def _env(tmp_path: Path, keys: tuple[Path, Path], port: int) -> Env:
    root = tmp_path / "registry"
    return Env(root=root, key=keys[0], pub=keys[1], src=tmp_path / "src", address=f"127.0.0.1:{port}",
               store=BundleStore(root, keys[1]))


@pytest.fixture()
def env(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Env]:
    (tmp_path / "registry").mkdir()
    server, port = start_registry(tmp_path / "registry", keys[1], port=0, max_workers=4)
    try:
        yield _env(tmp_path, keys, port)
    finally:
        server.stop(None).wait()


class Recording(RegistryServicer):
    """Records every download request; aborts the first transfer of `flaky` after two chunks."""

    def __init__(self, store: BundleStore, flaky: str = "") -> None:
        super().__init__(store, poll_s=0.05)
        self.requests: list[tuple[str, int]] = []
        self.flaky = flaky

    def DownloadFile(self, request: registry_pb2.DownloadRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> Iterator[registry_pb2.Chunk]:
        self.requests.append((request.path, request.offset))
        for i, chunk in enumerate(super().DownloadFile(request, context)):
            if request.path == self.flaky and i == 2:
                self.flaky = ""
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: connection lost")
            yield chunk


@pytest.fixture()
def recording(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[tuple[Env, Recording]]:
    servicer = Recording(BundleStore(tmp_path / "registry", keys[1]), flaky="model.onnx")
    running: RunningRegistry = serve(servicer, port=0, max_workers=4)
    try:
        yield _env(tmp_path, keys, running.port), servicer
    finally:
        running.stop(grace=None)


def _codes(env: Env, bundle_id: str, path: str, offset: int = 0) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(env.address) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        req = registry_pb2.DownloadRequest(bundle_id=bundle_id, path=path, offset=offset)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.DownloadFile(req, timeout=10))
    return e.value.code(), e.value.details()


def test_publish_then_list(env: Env) -> None:
    env.publish("round-0002", global_round=2)
    env.publish("round-0001", global_round=1)
    with RegistryClient(env.address, timeout_s=10) as client:
        found = client.list()
        assert [b.bundle_id for b in found] == ["round-0001", "round-0002"]  # oldest first
        latest = client.latest()
    assert latest is not None and latest.bundle_id == "round-0002" and latest.global_round == 2
    files = {f.path: f for f in latest.files}
    assert set(files) == {*FILES, MANIFEST, SIGNATURE}
    for rel, f in files.items():
        assert f.size == (env.root / "round-0002" / rel).stat().st_size
        assert f.sha256 == sha256_file(env.root / "round-0002" / rel)
    assert list(latest.tasks) == ["color"]
    assert not [p for p in env.root.iterdir() if p.name.startswith(".incoming-")]


def test_publish_refuses_tampered_and_duplicate_bundles(env: Env) -> None:
    src = make_signed(env.src / "round-0003", env.key, "round-0003")
    (src / "model.onnx").write_bytes(os.urandom(FILES["model.onnx"]))
    with pytest.raises(BundleError, match="'model.onnx' has sha256"):
        env.store.publish(src)
    env.publish("round-0001")
    with pytest.raises(BundleError, match="'round-0001' is already published"):
        env.store.publish(make_signed(env.src / "again" / "round-0001", env.key, "round-0001"))
    assert [m.bundle_id for m in env.store.list()] == ["round-0001"]
    assert not [p for p in env.root.iterdir() if p.name.startswith(".")]


def test_health_is_serving(env: Env) -> None:
    with grpc.insecure_channel(env.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "fedmole.v1.Registry"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_download_is_identical_and_verified(env: Env, tmp_path: Path) -> None:
    published = env.publish("round-0001")
    dest = tmp_path / "edge"
    with RegistryClient(env.address, timeout_s=10) as client:
        got = client.download("round-0001", dest, env.pub, chunk_size=1024)
    assert got == dest / "round-0001"
    for rel in (*FILES, MANIFEST, SIGNATURE):
        assert (got / rel).read_bytes() == (published / rel).read_bytes()
    assert verify_bundle(got, env.pub).bundle_id == "round-0001"
    assert sorted(p.name for p in dest.iterdir()) == ["round-0001"]  # no .partial-* left
    # Installed and verified: returned without asking the (here unreachable) registry.
    with RegistryClient("127.0.0.1:1", timeout_s=1) as offline:
        assert offline.download("round-0001", dest, env.pub) == got


def test_interrupted_download_resumes_from_the_part_file(recording: tuple[Env, Recording],
                                                         tmp_path: Path) -> None:
    env, servicer = recording
    published = env.publish("round-0001")
    dest = tmp_path / "edge"
    with RegistryClient(env.address, timeout_s=10) as client:
        with pytest.raises(DownloadInterrupted,
                           match="'model.onnx' .* stopped at byte .* run the download again"):
            client.download("round-0001", dest, env.pub, chunk_size=1024)
        part = dest / ".partial-round-0001" / "model.onnx.part"
        held = part.stat().st_size
        assert 0 < held < FILES["model.onnx"]
        assert not (dest / "round-0001").exists()
        got = client.download("round-0001", dest, env.pub, chunk_size=1024)
    assert ("model.onnx", held) in servicer.requests  # asked only for the missing bytes
    assert (got / "model.onnx").read_bytes() == (published / "model.onnx").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["round-0001"]


@pytest.mark.parametrize(("bundle_id", "path", "offset", "code", "match"), [
    ("round-9999", "model.onnx", 0, grpc.StatusCode.NOT_FOUND, "no bundle 'round-9999'"),
    ("../registry", "model.onnx", 0, grpc.StatusCode.NOT_FOUND, "no bundle '../registry'"),
    ("round-0001", "../round-0001/model.onnx", 0, grpc.StatusCode.INVALID_ARGUMENT,
     "'../round-0001/model.onnx' is not a file of bundle 'round-0001'"),
    ("round-0001", "/etc/passwd", 0, grpc.StatusCode.INVALID_ARGUMENT, "'/etc/passwd' is not a file"),
    ("round-0001", "notes.txt", 0, grpc.StatusCode.INVALID_ARGUMENT, "'notes.txt' is not a file"),
    ("round-0001", "model.onnx", 10_001, grpc.StatusCode.OUT_OF_RANGE,
     r"offset 10001 is past the end of 'model.onnx' .*\(10000 bytes\); resume from an offset in 0..10000"),
])
def test_download_errors(env: Env, bundle_id: str, path: str, offset: int, code: grpc.StatusCode,
                         match: str) -> None:
    env.publish("round-0001")
    (env.root / "round-0001" / "notes.txt").write_text("not listed: never served")
    got_code, details = _codes(env, bundle_id, path, offset)
    assert got_code == code
    assert re.search(match, details), details


def test_tampered_store_file_is_refused_by_the_client(env: Env, tmp_path: Path) -> None:
    stored = env.publish("round-0001") / "model_int8.onnx"
    data = bytearray(stored.read_bytes())
    data[7] ^= 0xFF
    stored.write_bytes(bytes(data))
    dest = tmp_path / "edge"
    with RegistryClient(env.address, timeout_s=10) as client, \
            pytest.raises(BundleError, match="'model_int8.onnx' of bundle 'round-0001' has sha256"):
        client.download("round-0001", dest, env.pub)
    assert not (dest / "round-0001").exists()
    assert not (dest / ".partial-round-0001" / "model_int8.onnx.part").exists()


def test_bundle_signed_by_another_key_is_refused_by_the_client(tmp_path: Path,
                                                               keys: tuple[Path, Path]) -> None:
    """A registry trusting another key serves self-consistent files; the edge's own key check stops it."""
    generate_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    root, pub = tmp_path / "rogue-registry", tmp_path / "rogue.pub"
    rogue = Env(root=root, key=tmp_path / "rogue.key", pub=pub, src=tmp_path / "src", address="",
                store=BundleStore(root, pub))
    rogue.publish("round-0001")
    server, port = start_registry(rogue.root, rogue.pub)
    try:
        with RegistryClient(f"127.0.0.1:{port}", timeout_s=10) as client, \
                pytest.raises(BundleError, match="does not verify with .*cloud.pub"):
            client.download("round-0001", tmp_path / "edge", keys[1])
    finally:
        server.stop(None).wait()
    assert not (tmp_path / "edge" / "round-0001").exists()
    assert not (tmp_path / "edge" / ".partial-round-0001").exists()


def test_client_refuses_unsafe_announced_paths() -> None:
    info = registry_pb2.BundleInfo(bundle_id="b", files=[
        registry_pb2.BundleFile(path=MANIFEST), registry_pb2.BundleFile(path=SIGNATURE),
        registry_pb2.BundleFile(path="../../.bashrc")])
    with pytest.raises(BundleError, match=r"'../../.bashrc'"):
        _announced_files(info)


def test_bundle_renamed_in_by_another_process_is_listed(env: Env) -> None:
    with RegistryClient(env.address, timeout_s=10) as client:
        assert client.list() == [] and client.latest() is None
        src = make_signed(env.src / "round-0005", env.key, "round-0005", global_round=5)
        staged = env.root / ".incoming-other"
        shutil.copytree(src, staged)
        assert client.list() == []  # .incoming-* is never served
        os.replace(staged, env.root / "round-0005")
        assert [b.bundle_id for b in client.list()] == ["round-0005"]
        # an unsigned folder dropped in is skipped, not served
        shutil.copytree(src, env.root / "round-0006")
        (env.root / "round-0006" / SIGNATURE).unlink()
        assert [b.bundle_id for b in client.list()] == ["round-0005"]


def test_watch_announces_bundles_published_later(recording: tuple[Env, Recording]) -> None:
    env, _ = recording
    env.publish("round-0001", global_round=1)
    got: queue.Queue[str] = queue.Queue()
    with RegistryClient(env.address, timeout_s=10) as client:
        watch = client.watch()
        def drain() -> None:
            for b in watch:
                got.put(b.bundle_id)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        assert got.get(timeout=10) == "round-0001"  # the latest right away
        env.publish("round-0002", global_round=2)
        assert got.get(timeout=10) == "round-0002"
        watch.cancel()
        thread.join(timeout=10)
        assert not thread.is_alive()
        # after = the one we hold: only newer ones
        env.publish("round-0003", global_round=3)
        later = client.watch(after="round-0002")
        assert next(iter(later)).bundle_id == "round-0003"
        later.cancel()
        with pytest.raises(grpc.RpcError) as e:
            next(iter(client.watch(after="round-0404")))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and 'after_bundle_id=""' in e.value.details()


def test_bind_failure_is_a_clear_error(env: Env, keys: tuple[Path, Path], tmp_path: Path) -> None:
    port = int(env.address.rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"cannot bind the registry to 127.0.0.1:{port}"):
        start_registry(tmp_path / "other", keys[1], port=port)


def test_store_requires_a_valid_key(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="public key .*missing.pub.* does not exist"):
        BundleStore(tmp_path / "registry", tmp_path / "missing.pub")


def test_stopping_the_server_ends_open_watches(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    store = BundleStore(tmp_path / "registry", keys[1])
    store.publish(make_signed(tmp_path / "src" / "round-0001", keys[0], "round-0001"))
    running = serve(RegistryServicer(store, poll_s=0.05), port=0)
    opened, ended = threading.Event(), threading.Event()
    try:
        with RegistryClient(f"127.0.0.1:{running.port}", timeout_s=10) as client:
            watch = client.watch()

            def drain() -> None:
                try:
                    for _ in watch:
                        opened.set()  # the stream is open on the server
                except grpc.RpcError:
                    pass  # UNAVAILABLE/CANCELLED is also a clean end here
                ended.set()

            threading.Thread(target=drain, daemon=True).start()
            assert opened.wait(timeout=10)
            running.stop(grace=5.0)  # returns once the watch stream has ended, well before the grace
            assert ended.wait(timeout=5)
    finally:
        running.server.stop(None)


def test_run_registry_serves_until_sigterm(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The production entry point in its own process: health SERVING, then a clean exit on SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "from cloud.registry import run_registry; "
            f"run_registry({str(tmp_path / 'registry')!r}, {str(keys[1])!r}, '127.0.0.1', 0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 15
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            found = re.search(r"on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
            assert line or proc.poll() is None, "registry process exited early"
        assert port, "registry did not report its address"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            reply = check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
