"""The node worker: one long-lived process per edge node that keeps the model and the local data
in memory between round messages.

Why: Flower 1.39's SuperNode starts a fresh ClientApp process for every message (subprocess
isolation; ``flwr-clientapp`` in process isolation also runs one message and exits), and each
such process would import torch, load the base model and read the node's data again — seconds
per round that are not the client's compute. Flower offers no long-lived ClientApp in 1.39, so
the ClientApp stays Flower's (the SuperNode still starts it, it still talks to the SuperLink)
but only forwards: with node config ``worker`` = a Unix socket path, :mod:`edge.client_app`
sends the message to this process and returns its reply, and imports neither torch nor the
model. The worker runs exactly :func:`edge.handler.handle`, the function the ClientApp runs
in-process when no worker is configured — one code path either way.

Wire (one request per connection, over ``multiprocessing.connection`` with an HMAC challenge;
no pickle): the client sends a JSON header ``{"node_config", "run_config"}`` then the message
content as Flower's own protobuf (``flwr.common.serde.recorddict_to_proto``); the worker
answers a JSON header ``{"ok": true}`` and the reply content the same way, or
``{"ok": false, "error": "..."}`` (the ClientApp raises it, and Flower turns it into the
node's error reply, as for an exception in-process).

The shared secret is ``<socket>.key`` (32 random bytes, hex, mode 0600), written by the worker
when it starts and read by the ClientApp; the socket lives in the node's own state folder.
Start: ``fedmole worker --socket PATH`` (the deployment launcher and docker-compose do).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

log = logging.getLogger("fedmole.worker")

KEY_SUFFIX = ".key"
# A header is a few kB of run config; anything larger is not a header of ours.
MAX_HEADER = 1 << 20


class WorkerUnavailable(ConnectionError):
    """No worker answers at the configured socket (not started yet, or gone)."""


class WorkerError(RuntimeError):
    """The worker handled the message and it failed there (the message names why)."""


def key_path(sock: Path) -> Path:
    return sock.with_name(sock.name + KEY_SUFFIX)


def _pack(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def _unpack(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's config values (bool, int, float, str, bytes, lists of them) as JSON."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, bytes):
            raise TypeError(f"config key {k!r} holds bytes, which the node worker does not carry")
        out[str(k)] = list(v) if isinstance(v, list | tuple) else v
    return out


# -- the ClientApp's side ------------------------------------------------------------------------


def forward(sock: Path, content: RecordDict, node_config: Mapping[str, Any],
            run_config: Mapping[str, Any]) -> RecordDict:
    """The worker's reply content to ``content``. Raises :class:`WorkerUnavailable` when nothing
    answers at ``sock`` (the caller may handle the message itself) and :class:`WorkerError`
    when the worker's handling failed."""
    sock = Path(sock)
    try:
        key = bytes.fromhex(key_path(sock).read_text().strip())
        conn = Client(str(sock), family="AF_UNIX", authkey=key)
    except (OSError, ValueError, EOFError) as e:
        raise WorkerUnavailable(f"no node worker at {str(sock)!r}: {e}") from e
    with conn:
        try:
            conn.send_bytes(json.dumps({"node_config": _scalars(node_config),
                                        "run_config": _scalars(run_config)}).encode())
            conn.send_bytes(_pack(content))
            head = json.loads(conn.recv_bytes(MAX_HEADER))
        except (OSError, EOFError) as e:  # the worker died while handling it
            raise WorkerUnavailable(f"the node worker at {str(sock)!r} dropped the message: {e}") from e
        if not head.get("ok"):
            raise WorkerError(f"node worker: {head.get('error', 'unknown error')}")
        return _unpack(conn.recv_bytes())


# -- the worker's side ---------------------------------------------------------------------------


def _listener(sock: Path) -> Listener:
    """Bind ``sock`` (refusing when another worker answers there) with a fresh key."""
    if len(str(sock).encode()) > 100:  # sun_path holds 108 bytes on Linux, 104 elsewhere
        raise SystemExit(f"socket path {str(sock)!r} is {len(str(sock).encode())} bytes; a Unix "
                         "socket path must stay under 100: use a shorter --socket (and node "
                         "config `worker`)")
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(sock))
        except OSError:
            sock.unlink()  # a stale socket of a worker that is gone
        else:
            raise SystemExit(f"another node worker is listening on {str(sock)!r}; stop it first "
                             "(each node runs one worker)")
        finally:
            probe.close()
    key = secrets.token_bytes(32)
    kp = key_path(sock)
    fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    os.chmod(kp, 0o600)
    return Listener(str(sock), family="AF_UNIX", authkey=key)


def _serve_one(conn: Connection) -> tuple[str, float]:
    from edge.handler import handle

    head = json.loads(conn.recv_bytes(MAX_HEADER))
    content = _unpack(conn.recv_bytes())
    t0 = time.perf_counter()
    try:
        reply = handle(content, head["node_config"], head["run_config"], where="worker")
    except Exception as e:  # the node's error reply, as a ClientApp exception would give
        log.exception("handling a message failed")
        conn.send_bytes(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}).encode())
        return "error", time.perf_counter() - t0
    conn.send_bytes(json.dumps({"ok": True}).encode())
    conn.send_bytes(_pack(reply))
    return "ok", time.perf_counter() - t0


class _Stop(Exception):
    """SIGTERM / SIGINT: leave the accept loop (a message in flight is dropped; its ClientApp
    then handles it itself)."""


def _raise_stop(*_: Any) -> None:
    raise _Stop


def serve(sock: Path) -> int:
    """Handle messages on ``sock`` one at a time until SIGTERM/SIGINT; returns the exit code."""
    sock = Path(sock).resolve()
    listener = _listener(sock)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    handled = 0
    try:
        import edge.handler  # noqa: F401  (torch and the model code once, before any message)

        log.info("node worker ready on %s (pid %d)", sock, os.getpid())
        print(f"node worker ready on {sock}", flush=True)
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError) as e:  # one bad peer, not the worker
                log.warning("refused a connection: %s", e)
                continue
            with conn:
                try:
                    status, secs = _serve_one(conn)
                except _Stop:
                    raise
                except Exception as e:  # a bad request (or a peer gone) costs that request only
                    log.warning("dropped a request: %s: %s", type(e).__name__, e)
                    continue
            handled += 1
            log.info("message %d: %s in %.2f s", handled, status, secs)
    except _Stop:
        log.info("node worker stopping after %d messages", handled)
    finally:
        listener.close()  # removes the socket file
        for p in (sock, key_path(sock)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edge.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.socket)


if __name__ == "__main__":
    raise SystemExit(main())
