"""The node's copy of the global state it has received, for the delta-only downlink.

One file per group (``expert/<task>``, ``router/<task>``, ``plan``; protocol.state_sync) under
the node's state folder, holding that group's latest version exactly as it travelled: every
Array's dtype, shape, stype and bytes. A new version replaces the old one (atomically), so the
folder never holds more than one copy of the round's state. Reading checks the digest: a file
that was cut short, altered or belongs to an older version reads as "not held", and the node
asks the cloud for it (``need-state``), so a damaged cache costs bytes, never correctness.

File layout (little-endian): 8-byte header length, the UTF-8 JSON header
``{"group", "digest", "kind": "arrays"|"text", "arrays": [[key, dtype, shape, stype, nbytes], …]}``,
then the arrays' bytes in that order (or the plan's text).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from flwr.app import Array

from protocol.state_sync import digest_arrays, digest_text

log = logging.getLogger(__name__)
DIR = "downlink-cache"  # under the node's state folder


class DiskGroupCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, group: str) -> Path:
        # Task names are the user's: the file is named by a hash of the group, which it records.
        return self.root / f"{hashlib.sha256(group.encode()).hexdigest()[:24]}.grp"

    def get(self, group: str, digest: str) -> dict[str, Array] | str | None:
        path = self._path(group)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            n = int.from_bytes(raw[:8], "little")
            head = json.loads(raw[8:8 + n])
            if head.get("group") != group or head.get("digest") != digest:
                return None  # another version: the cloud will send this one
            body = memoryview(raw)[8 + n:]
            if head["kind"] == "text":
                text = bytes(body).decode()
                return text if digest_text(text) == digest else None
            out: dict[str, Array] = {}
            at = 0
            for key, dtype, shape, stype, nbytes in head["arrays"]:
                out[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype,
                                 data=bytes(body[at:at + nbytes]))
                at += nbytes
            if at != len(body) or digest_arrays(out) != digest:
                raise ValueError("the bytes do not match the digest")
            return out
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            log.warning("cached global state %s (%s) is unreadable (%s); it will be fetched again",
                        group, path, e)
            return None

    def put(self, group: str, digest: str, value: dict[str, Array] | str) -> None:
        head: dict[str, object]
        if isinstance(value, str):
            head = {"group": group, "digest": digest, "kind": "text"}
            body = [value.encode()]
        else:
            keys = sorted(value)
            head = {"group": group, "digest": digest, "kind": "arrays",
                    "arrays": [[k, value[k].dtype, list(value[k].shape), value[k].stype,
                                len(value[k].data)] for k in keys]}
            body = [value[k].data for k in keys]
        text = json.dumps(head).encode()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(group)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for b in body:
                f.write(b)
        os.replace(tmp, path)
