"""The committed gRPC stubs are exactly what the pinned grpcio-tools makes of the .proto files."""

from __future__ import annotations

from pathlib import Path

from protocol.proto.generate import ROOT, generate


def test_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert {p.name for p in fresh} == {
        f"{n}{s}" for n in ("inference", "registry") for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    }
    for p in fresh:
        committed = ROOT / "protocol" / "proto" / p.name
        assert committed.is_file(), f"{committed} is missing: run `make protos` and commit it"
        assert committed.read_bytes() == p.read_bytes(), (
            f"{committed} differs from what protocol/proto/*.proto generate: run `make protos`")


def test_stubs_import_and_round_trip() -> None:
    from protocol.proto import inference_pb2, registry_pb2

    req = inference_pb2.PredictRequest(inputs=[inference_pb2.Input(
        id="a", text="what color?", media={"image": inference_pb2.Media(
            shape=[2, 2, 3], dtype="uint8", data=bytes(12))})])
    back = inference_pb2.PredictRequest.FromString(req.SerializeToString())
    assert back.inputs[0].media["image"].shape == [2, 2, 3]
    info = registry_pb2.BundleInfo(bundle_id="b1", files=[registry_pb2.BundleFile(path="m", size=3)])
    assert registry_pb2.BundleInfo.FromString(info.SerializeToString()).files[0].size == 3
