"""The edge's side of the model registry: list, watch and download signed bundles, resumably.

An edge trusts one thing, the cloud's public key; the registry and the network are not trusted.
So a download checks every file against the sizes and hashes the registry announced (to detect a
bad transfer early and name the file), then verifies the whole folder with the trusted key
(:func:`protocol.bundle.verify_bundle`), and only then renames it into place::

    dest_root/.partial-<bundle_id>/<path>.part   bytes received so far (kept on errors: resume)
    dest_root/.partial-<bundle_id>/<path>        a file whose size and sha256 matched
    dest_root/<bundle_id>/                       a verified bundle (atomic rename of .partial-*)

A later download of the same bundle asks the registry only for the bytes it lacks. Paths announced
by the registry are validated before anything is written, so a hostile registry cannot write
outside ``dest_root``. One downloader per ``dest_root`` at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from protocol.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    bundle_files,
    check_bundle_id,
    check_relpath,
    fsync_dir,
    sha256_file,
    verify_bundle,
)
from protocol.proto import registry_pb2, registry_pb2_grpc
from protocol.proto.registry_pb2 import BundleInfo

log = logging.getLogger(__name__)

MAX_MESSAGE = 8 << 20  # bytes; the registry uses the same limit
MIN_RATE = 256 << 10  # bytes/s: a file's deadline is timeout_s + size / MIN_RATE
PARTIAL = ".partial-"
PART = ".part"
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE)]


class DownloadInterrupted(RuntimeError):
    """A transfer stopped mid-file (network, registry restart); the bytes so far are kept: run again."""


class BundleWatch:
    """Iterate the bundles a registry announces; :meth:`cancel` (from any thread) ends the iteration."""

    def __init__(self, call: Any) -> None:
        self._call = call  # a grpc streaming call: an iterator of BundleInfo with .cancel()
        self._cancelled = False

    def __iter__(self) -> Iterator[BundleInfo]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise

    def cancel(self) -> None:
        """Stop watching; a thread blocked in the iteration returns normally."""
        self._cancelled = True
        self._call.cancel()


class RegistryClient:
    """A connection to a ``fedmole.v1.Registry``; use as a context manager (closes the channel)."""

    def __init__(self, address: str, timeout_s: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"`timeout_s` must be > 0 seconds, got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        # TLS comes later: pass grpc.ssl_channel_credentials(...) here once the registry serves TLS.
        self._channel = (grpc.secure_channel(address, credentials, options=GRPC_OPTIONS) if credentials
                         else grpc.insecure_channel(address, options=GRPC_OPTIONS))
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (cancels open watches and downloads)."""
        self._channel.close()

    # --- queries --------------------------------------------------------------------------------------

    def list(self) -> list[BundleInfo]:
        """Every bundle of the registry, oldest first."""
        reply = self._stub.ListBundles(registry_pb2.ListBundlesRequest(), timeout=self.timeout_s)
        return list(reply.bundles)

    def latest(self) -> BundleInfo | None:
        """The newest bundle, or None when the registry has none."""
        found = self.list()
        return found[-1] if found else None

    def watch(self, after: str = "") -> BundleWatch:
        """Stream announcements: the newest bundle after ``after`` ("" → the latest now), then each new one.

        No deadline: the stream lives until :meth:`BundleWatch.cancel` or :meth:`close` (the iteration
        ends), or the registry goes away: a clean shutdown ends the iteration, a lost connection raises
        grpc.RpcError (UNAVAILABLE or CANCELLED); either way, watch again
        with ``after`` = the last id you got.
        """
        return BundleWatch(self._stub.WatchBundles(registry_pb2.WatchRequest(after_bundle_id=after)))

    def info(self, bundle_id: str) -> BundleInfo:
        """The registry's description of ``bundle_id`` (BundleError if it has none)."""
        found = self.list()
        for b in found:
            if b.bundle_id == bundle_id:
                return b
        raise BundleError(f"registry {self.address} has no bundle {bundle_id!r}; it has "
                          f"{[b.bundle_id for b in found][-5:]} (the latest last)")

    # --- download -------------------------------------------------------------------------------------

    def download(self, bundle_id: str, dest_root: str | Path, public_key: str | Path,
                 chunk_size: int = 0) -> Path:
        """Download, verify with ``public_key`` and install ``dest_root/<bundle_id>``; return that folder.

        Resumes from the ``.part`` files of an earlier attempt. An already installed bundle that
        verifies is returned without contacting the registry. Raises BundleError (bad bytes or
        signature: the offending file is deleted so the next attempt fetches it again) or
        :class:`DownloadInterrupted` (transfer stopped: run again to resume).
        """
        check_bundle_id(bundle_id)
        dest = Path(dest_root)
        final = dest / bundle_id
        if final.exists():
            try:
                verify_bundle(final, public_key)
            except BundleError as e:
                raise BundleError(f"installed bundle {str(final)!r} does not verify ({e}); delete the folder "
                                  "to download it again") from e
            return final
        info = self.info(bundle_id)
        files = _announced_files(info)
        partial = dest / f"{PARTIAL}{bundle_id}"
        partial.mkdir(parents=True, exist_ok=True)
        _remove_unexpected(partial, set(files))
        for f in files.values():
            self._fetch(bundle_id, f, partial, chunk_size)
        try:
            verify_bundle(partial, public_key)
        except BundleError:
            # Every file matched what the registry announced, yet the bundle does not verify: the
            # registry serves a bad bundle. Nothing here is worth resuming.
            shutil.rmtree(partial, ignore_errors=True)
            raise
        try:
            os.rename(partial, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # installed meanwhile by another downloader
            verify_bundle(final, public_key)
        fsync_dir(dest)
        log.info("bundle %s downloaded from %s and verified: %s", bundle_id, self.address, final)
        return final

    def _fetch(self, bundle_id: str, f: registry_pb2.BundleFile, partial: Path, chunk_size: int) -> None:
        """Bring ``partial/<f.path>`` to the announced size and sha256, from its .part if there is one."""
        target = partial / f.path
        part = target.with_name(target.name + PART)
        if target.exists():  # completed by an earlier attempt
            if target.stat().st_size == f.size and sha256_file(target) == f.sha256:
                return
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:  # cannot be a prefix of the file: start over
            part.unlink()
            have = 0
        if have < f.size or f.size == 0:
            request = registry_pb2.DownloadRequest(bundle_id=bundle_id, path=f.path, offset=have,
                                                   chunk_size=chunk_size)
            timeout = self.timeout_s + (f.size - have) / MIN_RATE
            call = self._stub.DownloadFile(request, timeout=timeout)
            with open(part, "ab") as out:
                try:
                    for chunk in call:
                        if chunk.path != f.path or chunk.offset != have or chunk.file_size != f.size:
                            raise BundleError(
                                f"registry {self.address} sent {chunk.path!r} at offset {chunk.offset} of "
                                f"{chunk.file_size} bytes, expected {f.path!r} at offset {have} of {f.size} "
                                f"bytes (bundle {bundle_id!r}); a broken registry")
                        if have + len(chunk.data) > f.size:
                            raise BundleError(f"registry {self.address} sent more than the {f.size} bytes of "
                                              f"{f.path!r} (bundle {bundle_id!r}); a broken registry")
                        out.write(chunk.data)
                        have += len(chunk.data)
                except grpc.RpcError as e:
                    raise DownloadInterrupted(
                        f"download of {f.path!r} (bundle {bundle_id!r}) from {self.address} stopped at byte "
                        f"{have} of {f.size} ({e.code().name}: {e.details()}); the bytes so far are kept in "
                        f"{str(part)!r}: run the download again to resume") from e
                finally:
                    call.cancel()  # no-op when the stream ended; frees it when we stopped reading early
                out.flush()
                os.fsync(out.fileno())
        if have != f.size:
            raise DownloadInterrupted(f"registry {self.address} ended {f.path!r} (bundle {bundle_id!r}) "
                                      f"at byte {have} of {f.size}; run the download again to resume")
        digest = sha256_file(part)
        if digest != f.sha256:
            part.unlink()
            raise BundleError(f"downloaded {f.path!r} of bundle {bundle_id!r} has sha256 {digest}, the "
                              f"registry announced {f.sha256}; deleted it: run the download again")
        os.replace(part, target)


def _announced_files(info: BundleInfo) -> dict[str, registry_pb2.BundleFile]:
    """The files of ``info`` by path, refusing unsafe or duplicate paths before anything is written."""
    files: dict[str, registry_pb2.BundleFile] = {}
    for f in info.files:
        check_relpath(f.path, f"files[{f.path!r}] of bundle {info.bundle_id!r}")
        if f.path in files or f.path.endswith(PART):
            raise BundleError(f"bundle {info.bundle_id!r} announces {f.path!r} twice or with the reserved "
                              f"suffix {PART!r}; a broken registry")
        files[f.path] = f
    for name in (MANIFEST, SIGNATURE):
        if name not in files:
            raise BundleError(f"bundle {info.bundle_id!r} is announced without {name}; a broken registry")
    return files


def _remove_unexpected(partial: Path, expected: set[str]) -> None:
    """Delete leftovers that are neither an announced file nor its .part (they would fail verification)."""
    keep = expected | {p + PART for p in expected}
    for rel in [*bundle_files(partial), *(r for r in (MANIFEST, SIGNATURE) if (partial / r).exists())]:
        if rel not in keep:
            (partial / rel).unlink()
