"""The signed bundle format: the contract between the cloud's registry and the edges.

A bundle is a folder the cloud exports after a round (docs/design.md §2 step 6) and an edge runs::

    <bundle_id>/
      vision_encoder.onnx  embed_tokens.onnx  decoder_model_merged.onnx  router.onnx
      *_int8.onnx  decoder_model_merged_q4.onnx  weights*.onnx_data  tokenizer/  processor/
      (any files, any sub-folders: mole/export.py writes them)
      manifest.json   every other file with its size and sha256, the tasks, router thresholds…
      manifest.sig    detached Ed25519 signature (64 raw bytes) of manifest.json's exact bytes

Trust flows one way: the signature authenticates the manifest's bytes, and the manifest's
hashes authenticate every file. So :func:`verify_bundle` checks the signature *before* parsing
the JSON, then every file against the manifest, and refuses files the manifest does not list
(an unlisted file is an unauthenticated file an edge might load). Symlinks are refused
everywhere: a signed name must not point at unsigned bytes outside the folder.

manifest.json is deterministic JSON (sorted keys, indent 1) so the same bundle signs to the same
bytes. Nothing here imports torch or onnx; package versions are read from the installed metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.checks import finite_number

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = 1  # manifest format this code writes and reads
SIGNATURE_BYTES = 64  # an Ed25519 signature
BLOCK = 1 << 20  # hash files in 1 MiB blocks: bounded memory for multi-GB models
VERSIONED_PACKAGES = ("onnx", "onnxruntime", "torch", "transformers", "numpy", "fedmole")

_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEYS = ("format", "bundle_id", "global_round", "created_unix", "tasks", "thresholds", "partners",
         "files", "versions", "extra")
_RESERVED = (MANIFEST, SIGNATURE)


class BundleError(ValueError):
    """A bundle, its manifest, its signature or a key is missing or invalid; the message says where."""


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its size in bytes and its sha256 (lower-case hex)."""

    size: int
    sha256: str


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated ``manifest.json``; construction validates (errors name key and value)."""

    format: int
    bundle_id: str
    global_round: int
    created_unix: float
    tasks: tuple[str, ...]
    thresholds: Mapping[str, float]  # task → the autoencoder router's reconstruction threshold
    partners: Mapping[str, tuple[str, ...]]  # task → old tasks whose experts it may co-activate
    files: Mapping[str, FileEntry]  # relative "/"-separated path → entry; manifest/sig excluded
    versions: Mapping[str, str] = field(default_factory=dict)  # package → version at export time
    extra: Mapping[str, Any] = field(default_factory=dict)  # opset, precision, model info, …

    def __post_init__(self) -> None:
        # Read-only views: a frozen dataclass should not hand out mutable dicts.
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "thresholds", _frozen(self.thresholds))
        object.__setattr__(self, "partners", _frozen({k: tuple(v) for k, v in self.partners.items()}))
        object.__setattr__(self, "files", _frozen(dict(sorted(self.files.items()))))
        object.__setattr__(self, "versions", _frozen(self.versions))
        object.__setattr__(self, "extra", _frozen(self.extra))
        _validate(self, "manifest")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_json` reads it back to an equal manifest."""
        return {
            "format": self.format,
            "bundle_id": self.bundle_id,
            "global_round": self.global_round,
            "created_unix": self.created_unix,
            "tasks": list(self.tasks),
            "thresholds": dict(self.thresholds),
            "partners": {k: list(v) for k, v in self.partners.items()},
            "files": {p: {"size": e.size, "sha256": e.sha256} for p, e in self.files.items()},
            "versions": dict(self.versions),
            "extra": json.loads(json.dumps(dict(self.extra))),  # deep copy
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes written to ``manifest.json`` (and signed)."""
        text = json.dumps(self.to_json(), sort_keys=True, indent=1, allow_nan=False)
        return (text + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest") -> Manifest:
        """Parse and validate; ``where`` (e.g. the file's path) prefixes every error."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        unknown = sorted(set(d) - set(_KEYS))
        if missing or unknown:
            raise BundleError(f"{where}: missing keys {missing}, unknown keys {unknown}; "
                              f"a manifest has exactly {list(_KEYS)}: re-export the bundle")
        if not isinstance(d["format"], int) or isinstance(d["format"], bool) or d["format"] != FORMAT:
            raise BundleError(f"{where}: `format` is {d['format']!r}, this fedmole reads format {FORMAT}; "
                              "upgrade fedmole on this side or re-export the bundle with this version")
        files_d = _typed(d["files"], dict, where, "files")
        files: dict[str, FileEntry] = {}
        for path, entry in files_d.items():
            key = f"files[{path!r}]"
            entry = _typed(entry, dict, where, key)
            if set(entry) != {"size", "sha256"}:
                raise BundleError(f"{where}: `{key}` must have exactly the keys size, sha256, got "
                                  f"{sorted(entry)}; re-export the bundle")
            files[path] = FileEntry(size=_typed(entry["size"], int, where, f"{key}.size"),
                                    sha256=_typed(entry["sha256"], str, where, f"{key}.sha256"))
        partners_d = _typed(d["partners"], dict, where, "partners")
        try:
            return cls(
                format=d["format"],
                bundle_id=_typed(d["bundle_id"], str, where, "bundle_id"),
                global_round=_typed(d["global_round"], int, where, "global_round"),
                created_unix=_seconds(_typed(d["created_unix"], (int, float), where, "created_unix"), where),
                tasks=tuple(_typed(d["tasks"], list, where, "tasks")),
                thresholds=_typed(d["thresholds"], dict, where, "thresholds"),
                partners={k: tuple(_typed(v, list, where, f"partners[{k!r}]"))
                          for k, v in partners_d.items()},
                files=files,
                versions=_typed(d["versions"], dict, where, "versions"),
                extra=_typed(d["extra"], dict, where, "extra"),
            )
        except BundleError as e:
            # _validate says "manifest: ..."; name the real source instead.
            msg = str(e)
            raise BundleError(where + msg[len("manifest"):] if msg.startswith("manifest:") else msg) from None


def _typed(value: Any, kind: type | tuple[type, ...], where: str, key: str) -> Any:
    # bool is an int in Python but never a valid count, round or size here.
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"{where}: `{key}` must be a JSON {names}, got {value!r}; re-export the bundle")
    return value


def _seconds(value: int | float, where: str) -> float:
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond the float range
        raise BundleError(f"{where}: `created_unix` must be a finite number of seconds >= 0, got "
                          f"{value!r}; re-export the bundle") from None


def check_bundle_id(bundle_id: Any, what: str = "bundle_id") -> str:
    """Return ``bundle_id`` if it is a safe folder name ([A-Za-z0-9._-]+, no leading '.')."""
    if not isinstance(bundle_id, str) or not _SAFE_ID.fullmatch(bundle_id) or len(bundle_id) > 200:
        raise BundleError(f"`{what}` must be 1-200 characters of [A-Za-z0-9._-] not starting with '.', "
                          f"got {bundle_id!r}; choose a name like 'round-0042'")
    return bundle_id


def check_relpath(path: Any, what: str = "path") -> str:
    """Return ``path`` if it is a clean relative "/"-separated path that stays inside a folder."""
    p = PurePosixPath(path) if isinstance(path, str) else None
    if (p is None or not path or path.startswith("/") or "\\" in path or "\x00" in path
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise BundleError(f"`{what}` must be a relative '/'-separated path inside the bundle "
                          f"(no '..', '.', empty parts, backslashes or leading '/'), got {path!r}")
    return path


def _validate(m: Manifest, where: str) -> None:
    def bad(key: str, rule: str, value: Any) -> BundleError:
        return BundleError(f"{where}: `{key}` must be {rule}, got {value!r}; re-export the bundle")

    if m.format != FORMAT:
        raise bad("format", str(FORMAT), m.format)
    try:
        check_bundle_id(m.bundle_id)
    except BundleError as e:
        raise BundleError(f"{where}: {e}") from None
    if not isinstance(m.global_round, int) or isinstance(m.global_round, bool) or m.global_round < 0:
        raise bad("global_round", "an integer >= 0", m.global_round)
    if not isinstance(m.created_unix, float | int) or not math.isfinite(m.created_unix) or m.created_unix < 0:
        raise bad("created_unix", "a finite number of seconds >= 0", m.created_unix)
    if any(not isinstance(t, str) or not t for t in m.tasks) or len(set(m.tasks)) != len(m.tasks):
        raise bad("tasks", "a list of distinct non-empty strings", list(m.tasks))
    known = set(m.tasks)
    for task, thr in m.thresholds.items():
        if task not in known:
            raise bad(f"thresholds[{task!r}]", f"a threshold of a listed task {sorted(known)}", task)
        if not finite_number(thr):
            raise bad(f"thresholds[{task!r}]", "a finite number", thr)
    for task, others in m.partners.items():
        if task not in known or any(not isinstance(o, str) or o not in known for o in others):
            raise bad(f"partners[{task!r}]", f"listed tasks {sorted(known)}", list(others))
    for path, entry in m.files.items():
        try:
            check_relpath(path, f"files[{path!r}]")
        except BundleError as e:
            raise BundleError(f"{where}: {e}; a forged or broken manifest") from None
        if path in _RESERVED:
            raise bad(f"files[{path!r}]", f"a payload file, not {path} itself", path)
        if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
            raise bad(f"files[{path!r}].size", "an integer >= 0", entry.size)
        if not isinstance(entry.sha256, str) or not _SHA256.fullmatch(entry.sha256):
            raise bad(f"files[{path!r}].sha256", "64 lower-case hex digits", entry.sha256)
    for name, version in m.versions.items():
        if not isinstance(name, str) or not isinstance(version, str):
            raise bad(f"versions[{name!r}]", "a string", version)
    try:
        json.dumps(dict(m.extra), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise bad("extra", f"a JSON object with finite numbers ({e})", dict(m.extra)) from None


# --- files -------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def bundle_files(folder: str | Path) -> list[str]:
    """Sorted relative paths of every regular file under ``folder`` except manifest.json/.sig.

    Refuses symlinks and special files anywhere (BundleError naming them); empty folders are ignored.
    """
    root = Path(folder)
    if root.is_symlink() or not root.is_dir():
        raise BundleError(f"bundle folder {str(root)!r} does not exist or is not a plain folder")
    found: list[str] = []

    def walk_error(e: OSError) -> None:
        raise BundleError(f"cannot read bundle folder {str(root)!r}: {e}") from e

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        base = Path(dirpath)
        for name in (*dirnames, *filenames):
            p = base / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"bundle {str(root)!r}: {rel!r} is a symlink; bundles hold plain files "
                                  "only (copy the target in instead)")
            if name in filenames and not stat.S_ISREG(st.st_mode):
                raise BundleError(f"bundle {str(root)!r}: {rel!r} is not a regular file; remove it")
            if name in filenames and rel not in _RESERVED:
                found.append(rel)
    return sorted(found)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: not every platform opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` by ``data``: temp file beside it, fsync, ``os.replace``, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def package_versions(names: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (those not installed are left out) plus ``python``."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(
    folder: str | Path,
    *,
    bundle_id: str,
    global_round: int,
    tasks: Iterable[str],
    thresholds: Mapping[str, float],
    partners: Mapping[str, Iterable[str]],
    extra: Mapping[str, Any] | None = None,
    created_unix: float | None = None,
) -> Manifest:
    """Hash every file of ``folder`` and write its ``manifest.json`` atomically; return the manifest.

    A stale ``manifest.sig`` is deleted: it signed the old manifest and would only fail later with
    a confusing "tampered" error. Sign the new manifest with :func:`sign_bundle`.
    """
    root = Path(folder)
    check_bundle_id(bundle_id)
    files = {rel: FileEntry(size=(root / rel).stat().st_size, sha256=sha256_file(root / rel))
             for rel in bundle_files(root)}
    manifest = Manifest(
        format=FORMAT, bundle_id=bundle_id, global_round=global_round,
        created_unix=time.time() if created_unix is None else float(created_unix),
        tasks=tuple(tasks), thresholds=dict(thresholds),
        partners={k: tuple(v) for k, v in partners.items()}, files=files,
        versions=package_versions(), extra=dict(extra or {}))
    (root / SIGNATURE).unlink(missing_ok=True)
    atomic_write(root / MANIFEST, manifest.to_bytes())
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    """Parse ``folder/manifest.json`` WITHOUT checking signature or files (see :func:`verify_bundle`)."""
    return _parse(_read(Path(folder) / MANIFEST, "manifest"), Path(folder) / MANIFEST)


def _read(path: Path, what: str) -> bytes:
    if path.is_symlink():
        raise BundleError(f"{what} {str(path)!r} is a symlink; bundles hold plain files only")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{what} {str(path)!r} does not exist; an incomplete bundle or a wrong path "
                          "(export, sign and copy the bundle again)") from None
    except OSError as e:
        raise BundleError(f"{what} {str(path)!r} cannot be read: {e}") from e


def _parse(data: bytes, path: Path) -> Manifest:
    try:
        d = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, a 4300+-digit int, nesting too deep
        raise BundleError(f"manifest {str(path)!r} is not valid UTF-8 JSON: {e}; re-export the bundle") from e
    return Manifest.from_json(d, where=str(path))


# --- keys and signatures -----------------------------------------------------------------------------


def generate_keypair(private_path: str | Path, public_path: str | Path, *, overwrite: bool = False) -> None:
    """Write a new Ed25519 key pair as PEM: PKCS8 private key (mode 0600, unencrypted), SPKI public key.

    Refuses (FileExistsError) to replace an existing file unless ``overwrite``: losing the private key
    that edges trust means re-provisioning every edge.
    """
    priv_p, pub_p = Path(private_path), Path(public_path)
    if priv_p.resolve() == pub_p.resolve():
        raise BundleError(f"private and public key paths are the same ({str(priv_p)!r}); give two files")
    for p in (priv_p, pub_p):
        if p.exists() and not overwrite:
            raise FileExistsError(f"key file {str(p)!r} exists; refusing to overwrite it (edges may trust "
                                  "it): choose another path or pass overwrite=True")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    for p in (priv_p, pub_p):
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(priv_p, priv, mode=0o600)  # the temp file is 0600 from birth: never world-readable
    atomic_write(pub_p, pub, mode=0o644)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key (unencrypted); errors name the file."""
    p = Path(path)
    data = _read(p, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BundleError(f"private key {str(p)!r} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"private key {str(p)!r} is a {type(key).__name__}, not Ed25519; "
                          "make one with generate_keypair")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a PEM (SubjectPublicKeyInfo) Ed25519 public key; errors name the file."""
    p = Path(path)
    data = _read(p, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise BundleError(f"public key {str(p)!r} is not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {str(p)!r} is a {type(key).__name__}, not Ed25519; "
                          "use the .pub file written by generate_keypair")
    return key


def sign_bundle(folder: str | Path, private_key_path: str | Path) -> bytes:
    """Sign ``folder/manifest.json``'s bytes; write the 64-byte signature to ``manifest.sig``; return it.

    The manifest is parsed first so a broken manifest is never signed.
    """
    root = Path(folder)
    key = load_private_key(private_key_path)
    data = _read(root / MANIFEST, "manifest")
    _parse(data, root / MANIFEST)
    sig = key.sign(data)
    atomic_write(root / SIGNATURE, sig)
    return sig


def verify_manifest(folder: str | Path, public_key: Ed25519PublicKey, key_name: str = "the key") -> Manifest:
    """Check the signature of ``folder/manifest.json`` and parse it; the files are NOT checked.

    Cheap (two small reads): what a registry does on every scan. :func:`verify_bundle` is the full check.
    """
    root = Path(folder)
    if root.is_symlink() or not root.is_dir():
        raise BundleError(f"bundle folder {str(root)!r} does not exist or is not a plain folder")
    data = _read(root / MANIFEST, "manifest")
    sig = _read(root / SIGNATURE, "signature")
    if len(sig) != SIGNATURE_BYTES:
        raise BundleError(f"signature {str(root / SIGNATURE)!r} has {len(sig)} bytes, an "
                          f"Ed25519 signature has {SIGNATURE_BYTES}: corrupt or not a signature; "
                          "sign the bundle again")
    try:
        public_key.verify(sig, data)
    except InvalidSignature:
        raise BundleError(f"signature of {str(root / MANIFEST)!r} does not verify with {key_name}: the "
                          "bundle was tampered with or signed by another key") from None
    # Parse only authenticated bytes.
    return _parse(data, root / MANIFEST)


def verify_bundle(folder: str | Path, public_key_path: str | Path) -> Manifest:
    """Verify a whole bundle against a trusted public key; return its manifest.

    Checks, in order: the signature of manifest.json's bytes; that every listed file exists as a regular
    file inside the folder (no symlinks) with the listed size and sha256; that no unlisted file is present.
    Any failure raises :class:`BundleError` naming the file.
    """
    root = Path(folder)
    key = load_public_key(public_key_path)
    manifest = verify_manifest(root, key, repr(str(public_key_path)))
    present = bundle_files(root)  # refuses symlinks anywhere
    listed = set(manifest.files)
    missing = sorted(listed - set(present))
    if missing:
        raise BundleError(f"bundle {str(root)!r} lacks listed files {missing}: an incomplete copy; "
                          "download or copy the bundle again")
    extra = sorted(set(present) - listed)
    if extra:
        raise BundleError(f"bundle {str(root)!r} holds files its manifest does not list: {extra}; "
                          "they are not signed: remove them or re-export the bundle")
    for rel, entry in manifest.files.items():
        path = root / rel
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"bundle {str(root)!r}: {rel!r} has {size} bytes, the manifest lists "
                              f"{entry.size}: changed or truncated after signing; copy the bundle again")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BundleError(f"bundle {str(root)!r}: {rel!r} has sha256 {digest}, the manifest lists "
                              f"{entry.sha256}: changed after signing; copy the bundle again")
    return manifest
