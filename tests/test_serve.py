"""The edge inference service (edge.serve) with a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocol.inference_codec import encode_input, encode_request
from protocol.proto import inference_pb2, inference_pb2_grpc
from tests.conftest import build_tiny_run, tone


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_cfg):
    from mole.export import export_bundle, load_run
    from protocol.bundle import generate_keypair

    root = tmp_path_factory.mktemp("serve")
    generate_keypair(root / "bundle.key", root / "bundle.pub")
    gm = load_run(build_tiny_run(root, tiny_cfg))
    first = export_bundle(gm, root / "b7", root / "bundle.key")
    gm.global_round = 8
    second = export_bundle(gm, root / "b8", root / "bundle.key")
    return root, first, second


@pytest.fixture()
def service(bundles):
    from edge.serve import start_service

    root, first, _ = bundles
    svc = start_service(first, root / "bundle.pub", port=0, max_request_bytes=64 << 10)
    channel = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        yield svc, stub, channel
    finally:
        channel.close()
        svc.stop(grace=0)


def _inputs():
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = (255, 0, 0)
    return [encode_input("what color is the shape", image=img, id="a"),
            encode_input("what is 3 plus 4", id="b"),
            encode_input("which note is played", audio=tone(261.6), audio_rate=16000, id="c")]


def test_predict_round_trip_matches_the_runtime(service, bundles):
    from edge.ort_runtime import OrtModel
    from protocol.inference_codec import InputLimits, decode_request

    svc, stub, _ = service
    req = encode_request(_inputs())
    resp = stub.Predict(req, timeout=30)
    assert [p.id for p in resp.predictions] == ["a", "b", "c"]
    assert resp.bundle_id == "round-00007" and resp.global_round == 7
    samples, _ = decode_request(req, InputLimits(32, 16000, 16000))
    direct = OrtModel(bundles[1], "int8", threads=1).answer(samples)
    assert [p.answer for p in resp.predictions] == [a.answer for a in direct]
    assert [p.route for p in resp.predictions] == [a.route or "" for a in direct]
    info = stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=10)
    assert info.image_size == 32 and "audio" in info.modalities and info.precision == "int8"
    health = health_pb2_grpc.HealthStub(_channel(svc))
    assert health.Check(health_pb2.HealthCheckRequest(service="fedmole.v1.Inference"),
                        timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def _channel(svc):
    return grpc.insecure_channel(f"127.0.0.1:{svc.port}")


BAD = {
    "wrong image shape": (lambda: encode_input("what color", image=np.zeros((16, 16, 3), np.uint8)),
                          "shape (16, 16, 3)"),
    "wrong image dtype": (lambda: encode_input("what color", image=np.zeros((32, 32, 3), np.float32)),
                          "dtype 'float32'"),
    "bytes do not match the shape": (
        lambda: inference_pb2.Input(text="what color", media={"image": inference_pb2.Media(
            shape=[32, 32, 3], dtype="uint8", data=b"\x00" * 10)}), "10 bytes"),
    "empty text": (lambda: encode_input("   "), "empty text"),
    "unknown modality": (lambda: inference_pb2.Input(text="what", media={"video": inference_pb2.Media(
        shape=[1], dtype="uint8", data=b"\x00")}), "unknown modality 'video'"),
    "clip over the window": (lambda: encode_input("which note", audio=np.zeros(16001, np.float32)),
                             "16001 samples"),
    "wrong sample rate": (lambda: encode_input("which note", audio=tone(440.0), audio_rate=8000),
                          "8000 Hz"),
    "oversized payload": (lambda: encode_input("which note", audio=np.zeros(15000, np.float32),
                                               image=np.zeros((32, 32, 3), np.uint8),
                                               id="x" * 20000), "over the limit"),
    "non-finite audio": (lambda: encode_input("which note", audio=np.full(100, np.nan, np.float32)),
                         "NaN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_and_the_server_stays_up(service, case):
    svc, stub, _ = service
    make, needle = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(encode_request([_inputs()[1], make()]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert stub.Predict(encode_request(_inputs()), timeout=30).bundle_id == "round-00007"


def test_too_many_inputs_and_empty_requests_are_refused(service):
    svc, stub, _ = service
    for req, needle in ((encode_request([]), "no inputs"),
                        (encode_request([_inputs()[1]] * 65), "max_batch"),
                        (encode_request([_inputs()[1]], max_new_tokens=10_000), "max_new_tokens")):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


@pytest.mark.parametrize("method", ["Predict", "GetModelInfo"])
def test_bytes_that_are_not_a_request_are_invalid_argument(service, method):
    svc, stub, channel = service
    raw = channel.unary_unary(f"/fedmole.v1.Inference/{method}",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    # A truncated varint, then a field with an invalid wire type: unparseable for protobuf.
    for junk in (b"\x0a\xff\xff\xff\xff\xff", bytes([0x0F, 0x01, 0x02]), b"\x80" * 20):
        with pytest.raises(grpc.RpcError) as err:
            raw(junk, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "not a valid fedmole.v1." in err.value.details()
    assert stub.Predict(encode_request(_inputs()), timeout=30).bundle_id == "round-00007"


def test_tampered_or_unsigned_bundle_is_refused_and_the_old_one_keeps_serving(service, bundles,
                                                                                tmp_path):
    from protocol.bundle import generate_keypair, sign_bundle

    svc, stub, _ = service
    root, _, second = bundles
    tampered = tmp_path / "tampered"
    shutil.copytree(second, tampered)
    with open(tampered / "decoder_model_merged_int8.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    other = tmp_path / "other"
    shutil.copytree(second, other)
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    sign_bundle(other, tmp_path / "k")  # a valid signature, by a key the edge does not trust
    for bad in (tampered, other):
        assert svc.holder.swap(bad) is False
        assert stub.Predict(encode_request(_inputs()), timeout=30).bundle_id == "round-00007"
    assert svc.holder.refused == 2


def test_hot_swap_under_concurrent_load_fails_no_request(service, bundles):
    svc, stub, _ = service
    seen: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()
    req = encode_request(_inputs())

    def client() -> None:
        while not stop.is_set():
            try:
                seen.append(stub.Predict(req, timeout=30).bundle_id)
            except Exception as e:  # any failure is a test failure
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert svc.holder.swap(bundles[2]) is True
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert "round-00007" in seen and seen[-1] == "round-00008"
    assert svc.holder.current.bundle_id == "round-00008"


def test_watcher_follows_the_registry_and_swaps(service, bundles, tmp_path):
    from cloud.registry import BundleStore, start_registry
    from edge.serve import BundleWatcher

    svc, stub, _ = service
    root, first, second = bundles
    store = BundleStore(tmp_path / "registry", root / "bundle.pub")
    store.publish(first)
    server, port = start_registry(tmp_path / "registry", root / "bundle.pub")
    watcher = BundleWatcher(svc.holder, f"127.0.0.1:{port}", tmp_path / "downloads",
                            root / "bundle.pub", retry_s=0.2).start()
    try:
        time.sleep(0.5)
        assert svc.holder.current.bundle_id == "round-00007"
        store.publish(second)
        deadline = time.time() + 30
        while svc.holder.current.bundle_id != "round-00008" and time.time() < deadline:
            time.sleep(0.1)
        assert svc.holder.current.bundle_id == "round-00008"
        assert (tmp_path / "downloads" / "round-00008" / "manifest.sig").is_file()
        assert stub.Predict(encode_request(_inputs()), timeout=30).bundle_id == "round-00008"
    finally:
        watcher.stop()
        server.stop(0).wait()
