"""Signed bundles: manifest round trip and validation, keys, signatures, tampering, forged manifests."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey

from protocol.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    Manifest,
    generate_keypair,
    load_private_key,
    read_manifest,
    sha256_file,
    sign_bundle,
    verify_bundle,
    write_manifest,
)

FILES = {"model.onnx": 3000, "model_int8.onnx": 1500, "tokenizer/tokenizer.json": 200,
         "processor/preprocessor_config.json": 50}


def make_bundle(folder: Path, bundle_id: str = "round-0001", global_round: int = 1) -> Manifest:
    """A small unsigned bundle of random bytes with its manifest written."""
    folder.mkdir(parents=True)
    for rel, size in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(os.urandom(size))
    return write_manifest(folder, bundle_id=bundle_id, global_round=global_round, tasks=["color", "count"],
                          thresholds={"color": 0.5, "count": 0.25}, partners={"count": ["color"]},
                          extra={"opset": 17, "precision": "int8"})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "cloud.key", d / "cloud.pub")
    return d / "cloud.key", d / "cloud.pub"


@pytest.fixture()
def signed(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    folder = tmp_path / "round-0001"
    make_bundle(folder)
    sign_bundle(folder, keys[0])
    return folder


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = make_bundle(tmp_path / "b")
    assert read_manifest(tmp_path / "b") == m
    assert Manifest.from_json(json.loads(m.to_bytes())) == m
    assert list(m.files) == sorted(FILES)  # manifest.json / .sig are not listed
    entry = m.files["tokenizer/tokenizer.json"]
    assert entry.size == 200 and entry.sha256 == sha256_file(tmp_path / "b/tokenizer/tokenizer.json")
    assert m.versions["python"] and "numpy" in m.versions
    assert m.partners == {"count": ("color",)} and m.extra["opset"] == 17
    # deterministic bytes: sorted keys, indent 1
    assert (tmp_path / "b" / MANIFEST).read_bytes() == m.to_bytes()
    text = m.to_bytes().decode()
    assert text.index('"bundle_id"') < text.index('"created_unix"') < text.index('"extra"')
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(TypeError):
        m.files["x"] = m.files["model.onnx"]  # type: ignore[index]


def test_sign_and_verify(signed: Path, keys: tuple[Path, Path]) -> None:
    assert len((signed / SIGNATURE).read_bytes()) == 64
    m = verify_bundle(signed, keys[1])
    assert m == read_manifest(signed) and m.bundle_id == "round-0001"


def test_rewriting_the_manifest_drops_the_stale_signature(signed: Path) -> None:
    write_manifest(signed, bundle_id="round-0001", global_round=2, tasks=[], thresholds={}, partners={})
    assert not (signed / SIGNATURE).exists()


def test_tampered_file_is_refused_naming_it(signed: Path, keys: tuple[Path, Path]) -> None:
    path = signed / "model_int8.onnx"
    data = bytearray(path.read_bytes())
    data[100] ^= 1  # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"'model_int8.onnx' has sha256 [0-9a-f]{64}, the manifest lists"
                       ) as e:
        verify_bundle(signed, keys[1])
    listed = read_manifest(signed).files["model_int8.onnx"].sha256
    assert sha256_file(path) in str(e.value) and listed in str(e.value)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match=r"'model_int8.onnx' has 1499 bytes, the manifest lists 1500"):
        verify_bundle(signed, keys[1])


def test_extra_and_missing_files_are_refused(signed: Path, keys: tuple[Path, Path]) -> None:
    (signed / "tokenizer" / "evil.py").write_text("import os")
    with pytest.raises(BundleError, match=r"does not list: \['tokenizer/evil.py'\]"):
        verify_bundle(signed, keys[1])
    (signed / "tokenizer" / "evil.py").unlink()
    (signed / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"lacks listed files \['model.onnx'\]"):
        verify_bundle(signed, keys[1])


def test_symlinks_are_refused(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    target = signed / "model.onnx"
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(BundleError, match=r"'model.onnx' is a symlink"):
        verify_bundle(signed, keys[1])
    with pytest.raises(BundleError, match="symlink"):
        write_manifest(signed, bundle_id="x", global_round=0, tasks=[], thresholds={}, partners={})


def test_bad_signature_and_other_key_are_refused(signed: Path, keys: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(BundleError,
                       match="does not verify with .*other.pub.*tampered with or signed by another"):
        verify_bundle(signed, tmp_path / "other.pub")
    sig = bytearray((signed / SIGNATURE).read_bytes())
    sig[0] ^= 1
    (signed / SIGNATURE).write_bytes(bytes(sig))
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(signed, keys[1])
    (signed / SIGNATURE).write_bytes(b"short")
    with pytest.raises(BundleError, match="has 5 bytes, an Ed25519 signature has 64"):
        verify_bundle(signed, keys[1])


def test_edited_manifest_is_refused(signed: Path, keys: tuple[Path, Path]) -> None:
    d = json.loads((signed / MANIFEST).read_bytes())
    d["thresholds"]["color"] = 99.0  # a valid manifest, but not the signed one
    (signed / MANIFEST).write_text(json.dumps(d, sort_keys=True, indent=1) + "\n")
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(signed, keys[1])


def test_missing_manifest_signature_and_keys_name_the_path(signed: Path, keys: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="public key .*nope.pub.* does not exist"):
        verify_bundle(signed, tmp_path / "nope.pub")
    (tmp_path / "garbage.pub").write_text("not a key")
    with pytest.raises(BundleError, match="public key .*garbage.pub.* is not a PEM public key"):
        verify_bundle(signed, tmp_path / "garbage.pub")
    with pytest.raises(BundleError, match="public key .*cloud.key.* is not a PEM public key"):
        verify_bundle(signed, keys[0])  # the private key where the public one belongs
    (signed / SIGNATURE).unlink()
    with pytest.raises(BundleError, match=r"signature .*manifest.sig.* does not exist"):
        verify_bundle(signed, keys[1])
    (signed / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"manifest .*manifest.json.* does not exist"):
        verify_bundle(signed, keys[1])
    with pytest.raises(BundleError, match="does not exist or is not a plain folder"):
        verify_bundle(tmp_path / "missing", keys[1])


def test_corrupt_manifest_is_not_signed(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest .*manifest.json.* is not valid UTF-8 JSON"):
        sign_bundle(tmp_path / "b", keys[0])
    assert not (tmp_path / "b" / SIGNATURE).exists()


@pytest.mark.parametrize("path", ["../evil.onnx", "/etc/passwd", "a/../../b", "a//b", "./model.onnx",
                                  "a\\..\\b", "manifest.sig", ""])
def test_forged_manifest_with_unsafe_path_is_refused(signed: Path, keys: tuple[Path, Path],
                                                     path: str) -> None:
    """Even correctly signed (a stolen key, a buggy exporter), such a manifest is never followed."""
    d = json.loads((signed / MANIFEST).read_bytes())
    d["files"][path] = {"size": 1, "sha256": "0" * 64}
    (signed / MANIFEST).write_text(json.dumps(d, sort_keys=True, indent=1) + "\n")
    sig = load_private_key(keys[0]).sign((signed / MANIFEST).read_bytes())
    (signed / SIGNATURE).write_bytes(sig)
    with pytest.raises(BundleError, match=r"files\[") as e:
        verify_bundle(signed, keys[1])
    assert repr(path) in str(e.value) and str(signed / MANIFEST) in str(e.value)


def _valid() -> dict[str, Any]:
    return {"format": 1, "bundle_id": "b1", "global_round": 3, "created_unix": 1.5, "tasks": ["a", "b"],
            "thresholds": {"a": 0.1}, "partners": {"b": ["a"]},
            "files": {"model.onnx": {"size": 3, "sha256": "ab" * 32}}, "versions": {"python": "3.11"},
            "extra": {"opset": 17}}


@pytest.mark.parametrize(("key", "value", "match"), [
    ("format", 2, "`format` is 2, this fedmole reads format 1"),
    ("bundle_id", "../up", "`bundle_id` must be .* got '../up'"),
    ("bundle_id", ".hidden", "`bundle_id` must be"),
    ("global_round", -1, "`global_round` must be an integer >= 0, got -1"),
    ("global_round", True, "`global_round` must be a JSON int, got True"),
    ("created_unix", "now", "`created_unix` must be a JSON int or float, got 'now'"),
    ("tasks", ["a", "a"], "`tasks` must be a list of distinct non-empty strings"),
    ("thresholds", {"zzz": 0.1}, r"`thresholds\['zzz'\]` must be a threshold of a listed task"),
    ("thresholds", {"a": "high"}, r"`thresholds\['a'\]` must be a finite number, got 'high'"),
    ("partners", {"b": ["nope"]}, r"`partners\['b'\]` must be listed tasks"),
    ("files", {"m": {"size": 1, "sha256": "XYZ"}}, r"`files\['m'\].sha256` must be 64 lower-case hex"),
    ("files", {"m": {"size": -1, "sha256": "ab" * 32}}, r"`files\['m'\].size` must be an integer >= 0"),
    ("files", {"m": {"size": 1}}, r"`files\['m'\]` must have exactly the keys size, sha256"),
    ("versions", {"torch": 2}, r"`versions\['torch'\]` must be a string"),
    ("extra", {"x": float("nan")}, "`extra` must be a JSON object with finite numbers"),
])
def test_from_json_names_the_bad_key_and_value(key: str, value: Any, match: str) -> None:
    d = _valid()
    d[key] = value
    with pytest.raises(BundleError, match=match) as e:
        Manifest.from_json(d, where="bundles/b1/manifest.json")
    assert str(e.value).startswith("bundles/b1/manifest.json: ")


def test_from_json_refuses_missing_and_unknown_keys() -> None:
    d = _valid()
    del d["partners"]
    d["signature"] = "x"
    with pytest.raises(BundleError, match=r"missing keys \['partners'\], unknown keys \['signature'\]"):
        Manifest.from_json(d)
    assert Manifest.from_json(_valid()).to_json() == _valid()


@pytest.mark.parametrize("bundle_id", ["../x", ".hidden", "a/b", "", "x y"])
def test_write_manifest_refuses_unsafe_ids(tmp_path: Path, bundle_id: str) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="`bundle_id` must be"):
        write_manifest(tmp_path / "b", bundle_id=bundle_id, global_round=0, tasks=[], thresholds={},
                       partners={})
    assert not (tmp_path / "b" / MANIFEST).exists()


def test_keypair_permissions_and_no_overwrite(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k" / "cloud.key", tmp_path / "k" / "cloud.pub"
    generate_keypair(priv, pub)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = priv.read_bytes()
    with pytest.raises(FileExistsError, match="cloud.key.* exists; refusing to overwrite"):
        generate_keypair(priv, tmp_path / "k" / "new.pub")
    assert priv.read_bytes() == before and not (tmp_path / "k" / "new.pub").exists()
    generate_keypair(priv, pub, overwrite=True)
    assert priv.read_bytes() != before and stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_non_ed25519_keys_are_refused(tmp_path: Path, signed: Path) -> None:
    key = Ed448PrivateKey.generate()
    (tmp_path / "ed448.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "ed448.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(BundleError, match="ed448.key.* not Ed25519"):
        sign_bundle(signed, tmp_path / "ed448.key")
    with pytest.raises(BundleError, match="ed448.pub.* not Ed25519"):
        verify_bundle(signed, tmp_path / "ed448.pub")
