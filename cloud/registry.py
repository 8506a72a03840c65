"""The model registry: stores signed bundles and serves them to edges over gRPC (``fedmole.v1.Registry``).

It runs as its own process (``fedmole registry``) beside the Flower server, which publishes each
round's bundle (:func:`publish_cli` or :meth:`BundleStore.publish`). Layout on disk::

    root/<bundle_id>/...           one published bundle, immutable once renamed into place
    root/.incoming-<random>/       a publish in progress (skipped by readers)

A publish verifies the bundle against the trusted public key, copies it into ``.incoming-*``,
verifies the copy again (the source may change while we copy) and ``os.replace``s it into place: a
reader sees a whole bundle or none. Another process may publish into the same root the same way;
:meth:`BundleStore.list` re-scans, caching each folder's parse by its stat so a poll costs a few
``stat`` calls. Readers check each manifest's signature (cheap); the per-file hashes were checked at
publish time and are checked again by every edge after download, so serving never re-hashes.

The server is grpc's synchronous server: every open stream (a WatchBundles or a download) holds
one worker thread for its lifetime, so ``max_workers`` bounds watchers + concurrent downloads.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocol.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    FileEntry,
    Manifest,
    check_bundle_id,
    fsync_dir,
    load_public_key,
    sha256_file,
    verify_bundle,
    verify_manifest,
)
from protocol.proto import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name  # "fedmole.v1.Registry"
MAX_MESSAGE = 8 << 20  # bytes; a chunk is at most 1 MiB, so this leaves room for big BundleInfo lists
DEFAULT_CHUNK = 256 << 10
MIN_CHUNK, MAX_CHUNK = 1 << 10, 1 << 20
INCOMING = ".incoming-"
DEFAULT_PORT = 50052  # 50051 is grpc's customary first port; the edge's inference service may take it
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                # grpc sets SO_REUSEPORT by default: a second registry on the same port would then
                # bind silently and share the clients at random. Fail loudly instead.
                ("grpc.so_reuseport", 0)]


class BundleNotFound(KeyError):
    """No bundle with that id in the store (gRPC NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "bundle not found"


@dataclass(frozen=True)
class StoredBundle:
    """A published bundle: its manifest and every file it serves (manifest.json/.sig included)."""

    manifest: Manifest
    folder: Path
    files: MappingProxyType[str, FileEntry]

    @property
    def sort_key(self) -> tuple[int, float, str]:
        """Publication order: oldest first, the last one is the latest."""
        m = self.manifest
        return (m.global_round, m.created_unix, m.bundle_id)


class BundleStore:
    """Signed bundles under ``root``; every bundle is verified with ``public_key`` before it is served."""

    def __init__(self, root: str | Path, public_key: str | Path) -> None:
        self.root = Path(root)
        self.public_key_path = Path(public_key)
        self._key = load_public_key(public_key)  # fail at start, not on the first request
        self._key_name = repr(str(public_key))
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # folder name → (stat signature, parsed bundle or None when unreadable)
        self._cache: dict[str, tuple[tuple[int, ...], StoredBundle | None]] = {}

    # --- writing --------------------------------------------------------------------------------------

    def publish(self, src_folder: str | Path) -> Manifest:
        """Verify ``src_folder`` and install it as ``root/<bundle_id>`` atomically; return its manifest.

        Refuses (BundleError) an invalid or tampered bundle, and an id that is already published:
        bundles are immutable, edges cache them by id.
        """
        src = Path(src_folder)
        manifest = verify_bundle(src, self.public_key_path)
        final = self.root / manifest.bundle_id
        if final.exists() or final.is_symlink():
            raise BundleError(f"bundle id {manifest.bundle_id!r} is already published in {str(self.root)!r}; "
                              "bundles are immutable: export the new one under a new id")
        tmp = Path(tempfile.mkdtemp(prefix=INCOMING, dir=self.root))
        try:
            for rel in (MANIFEST, SIGNATURE, *manifest.files):
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                _copy_durable(src / rel, dst)
            copied = verify_bundle(tmp, self.public_key_path)  # src may have changed while we copied
            if copied.to_bytes() != manifest.to_bytes():
                raise BundleError(f"bundle {str(src)!r} changed while it was being published; publish again")
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            try:
                os.rename(tmp, final)  # a non-empty `final` (a concurrent publish) makes this fail
            except OSError as e:
                raise BundleError(f"cannot install bundle {manifest.bundle_id!r} as {str(final)!r}: {e} "
                                  "(published concurrently by another process?)") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        log.info("published bundle %s (round %d, %d files) in %s", manifest.bundle_id,
                 manifest.global_round, len(manifest.files), self.root)
        return manifest

    # --- reading --------------------------------------------------------------------------------------

    def _load(self, name: str) -> StoredBundle | None:
        """The bundle in ``root/name``, re-read only when its folder or manifest changed."""
        folder = self.root / name
        try:
            st_dir = folder.lstat()
            st_man = (folder / MANIFEST).lstat()
            st_sig = (folder / SIGNATURE).lstat()
            sig: tuple[int, ...] = (st_dir.st_ino, st_dir.st_mtime_ns, st_man.st_ino, st_man.st_mtime_ns,
                                    st_man.st_size, st_sig.st_ino, st_sig.st_mtime_ns, st_sig.st_size)
        except OSError:
            sig = (-1,)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == sig:
            return cached[1]
        bundle: StoredBundle | None = None
        try:
            if folder.is_symlink() or not folder.is_dir():
                raise BundleError(f"{str(folder)!r} is not a plain folder")
            manifest = verify_manifest(folder, self._key, self._key_name)
            if manifest.bundle_id != name:
                raise BundleError(f"its manifest says bundle_id {manifest.bundle_id!r}; the folder must "
                                  "be named after it")
            files = {rel: FileEntry(size=(folder / rel).stat().st_size, sha256=sha256_file(folder / rel))
                     for rel in (MANIFEST, SIGNATURE)}
            files.update(manifest.files)
            bundle = StoredBundle(manifest=manifest, folder=folder, files=MappingProxyType(files))
        except (BundleError, OSError) as e:
            log.warning("registry %s: skipping %r: %s", self.root, name, e)  # once per change, not per poll
        with self._lock:
            self._cache[name] = (sig, bundle)
        return bundle

    def bundles(self) -> list[StoredBundle]:
        """Every readable bundle, oldest first; unreadable folders are skipped with a warning."""
        try:
            names = sorted(e.name for e in os.scandir(self.root) if not e.name.startswith("."))
        except OSError as e:
            raise BundleError(f"registry root {str(self.root)!r} cannot be listed: {e}") from e
        with self._lock:  # forget folders that disappeared
            for gone in set(self._cache) - set(names):
                del self._cache[gone]
        found = [b for b in map(self._load, names) if b is not None]
        return sorted(found, key=lambda b: b.sort_key)

    def list(self) -> list[Manifest]:
        """Every readable bundle's manifest, sorted by (global_round, created_unix, bundle_id)."""
        return [b.manifest for b in self.bundles()]

    def stored(self, bundle_id: str) -> StoredBundle:
        """The bundle ``bundle_id``; :class:`BundleNotFound` if it is not published (or unreadable)."""
        try:
            check_bundle_id(bundle_id)
        except BundleError as e:
            raise BundleNotFound(f"no bundle {bundle_id!r} in registry {str(self.root)!r}: {e}") from None
        bundle = self._load(bundle_id) if (self.root / bundle_id).exists() else None
        if bundle is None:
            known = [m.bundle_id for m in self.list()][-5:]
            raise BundleNotFound(f"no bundle {bundle_id!r} in registry {str(self.root)!r}; the latest are "
                                 f"{known}: list the bundles and ask for one of them")
        return bundle

    def get(self, bundle_id: str) -> Manifest:
        """The manifest of ``bundle_id`` (:class:`BundleNotFound` if there is none)."""
        return self.stored(bundle_id).manifest

    def latest(self) -> Manifest | None:
        """The newest bundle's manifest, or None when the store is empty."""
        found = self.bundles()
        return found[-1].manifest if found else None

    def file_path(self, bundle_id: str, relpath: str) -> Path:
        """Path of one file of a bundle: a listed file, manifest.json or manifest.sig, nothing else."""
        bundle = self.stored(bundle_id)
        if relpath not in bundle.files:
            listed = sorted(bundle.files)
            shown = listed[:8] + (["…"] if len(listed) > 8 else [])
            raise BundleError(f"{relpath!r} is not a file of bundle {bundle_id!r}; its files are {shown}")
        return bundle.folder / relpath


def _copy_durable(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def to_bundle_info(bundle: StoredBundle) -> registry_pb2.BundleInfo:
    """The wire view of a stored bundle: its files include manifest.json and manifest.sig."""
    m = bundle.manifest
    return registry_pb2.BundleInfo(
        bundle_id=m.bundle_id, global_round=m.global_round, tasks=list(m.tasks), created_unix=m.created_unix,
        files=[registry_pb2.BundleFile(path=p, size=e.size, sha256=e.sha256)
               for p, e in sorted(bundle.files.items())])


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """``fedmole.v1.Registry`` over a :class:`BundleStore`."""

    def __init__(self, store: BundleStore, poll_s: float = 0.5, default_chunk: int = DEFAULT_CHUNK) -> None:
        if poll_s <= 0:
            raise ValueError(f"`poll_s` must be > 0 seconds, got {poll_s}")
        self.store = store
        self.poll_s = poll_s
        self.default_chunk = min(max(default_chunk, MIN_CHUNK), MAX_CHUNK)
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Make every open WatchBundles stream return (call before stopping the server)."""
        self._stopping.set()

    def ListBundles(self, request: registry_pb2.ListBundlesRequest,  # noqa: N802 (gRPC's name)
                    context: grpc.ServicerContext) -> registry_pb2.ListBundlesResponse:
        return registry_pb2.ListBundlesResponse(bundles=[to_bundle_info(b) for b in self.store.bundles()])

    def WatchBundles(self, request: registry_pb2.WatchRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> Iterator[registry_pb2.BundleInfo]:
        done = threading.Event()
        context.add_callback(done.set)  # fires on client cancel, deadline and server stop
        last: tuple[int, float, str] | None = None
        if request.after_bundle_id:
            try:
                last = self.store.stored(request.after_bundle_id).sort_key
            except BundleNotFound as e:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"{e}; watch with after_bundle_id=\"\" to start from the latest")
        found = self.store.bundles()
        newer = [b for b in found if last is None or b.sort_key > last]
        if newer:  # the newest right away, not the whole history
            last = newer[-1].sort_key
            yield to_bundle_info(newer[-1])
        while context.is_active() and not self._stopping.is_set():
            if done.wait(self.poll_s):
                return
            for b in self.store.bundles():
                if last is None or b.sort_key > last:
                    last = b.sort_key
                    yield to_bundle_info(b)

    def DownloadFile(self, request: registry_pb2.DownloadRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> Iterator[registry_pb2.Chunk]:
        try:
            path = self.store.file_path(request.bundle_id, request.path)
        except BundleNotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except BundleError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        chunk = self.default_chunk if request.chunk_size == 0 else request.chunk_size
        chunk = min(max(chunk, MIN_CHUNK), MAX_CHUNK)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = request.offset
            if pos > size:
                context.abort(grpc.StatusCode.OUT_OF_RANGE,
                              f"offset {pos} is past the end of {request.path!r} of bundle "
                              f"{request.bundle_id!r} ({size} bytes); resume from an offset in 0..{size}")
            f.seek(pos)
            # At least one chunk, even for an empty file or offset == size: it carries file_size.
            while True:
                data = f.read(min(chunk, size - pos))
                if len(data) < min(chunk, size - pos):
                    context.abort(grpc.StatusCode.DATA_LOSS,
                                  f"{request.path!r} of bundle {request.bundle_id!r} shrank while being "
                                  "served; the registry's copy is damaged: republish it under a new id")
                yield registry_pb2.Chunk(path=request.path, offset=pos, data=data, file_size=size)
                pos += len(data)
                if pos >= size or not context.is_active():
                    return


@dataclass(frozen=True)
class RunningRegistry:
    """A started server with its health service (to flip to NOT_SERVING before stopping)."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: RegistryServicer

    def stop(self, grace: float | None = 2.0) -> None:
        """Report NOT_SERVING, end the watch streams, then stop the server (waits for it)."""
        self.health.enter_graceful_shutdown()
        self.servicer.stop()
        self.server.stop(grace).wait()


def serve(servicer: RegistryServicer, host: str = "127.0.0.1", port: int = 0,
          max_workers: int = 8) -> RunningRegistry:
    """Start a gRPC server for ``servicer`` plus the standard health service; port 0 picks a free port."""
    from concurrent.futures import ThreadPoolExecutor

    if max_workers < 1:
        raise ValueError(f"`max_workers` must be >= 1, got {max_workers}")
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="registry"),
                         options=GRPC_OPTIONS)
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cause: RuntimeError | None = None
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # recent grpc raises; older versions returned 0
        bound, cause = 0, e
    if not bound:
        server.stop(None)
        raise OSError(f"cannot bind the registry to {address}: the port is in use or the host is not an "
                      "address of this machine; choose another --host/--port") from cause
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningRegistry(server=server, port=bound, health=health_servicer, servicer=servicer)


def start_registry(root: str | Path, public_key: str | Path, host: str = "127.0.0.1", port: int = 0,
                   max_workers: int = 8) -> tuple[grpc.Server, int]:
    """Serve the bundles under ``root``; return the started server and its bound port."""
    running = serve(RegistryServicer(BundleStore(root, public_key)), host, port, max_workers)
    return running.server, running.port


def run_registry(root: str | Path, public_key: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 max_workers: int = 8) -> None:
    """Serve until SIGINT/SIGTERM, then report NOT_SERVING and stop with a 2 s grace period."""
    store = BundleStore(root, public_key)
    running = serve(RegistryServicer(store), host, port, max_workers)
    log.info("registry serving %d bundles from %s on %s:%d", len(store.list()), store.root, host,
             running.port)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("registry: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    previous: dict[int, Any] = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        running.stop(grace=2.0)
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("registry stopped")


def publish_cli(src: str | Path, root: str | Path, public_key: str | Path) -> Manifest:
    """``fedmole registry publish``: verify ``src`` and install it into the registry at ``root``."""
    return BundleStore(root, public_key).publish(src)
