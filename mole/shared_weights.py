"""Graphs of one bundle that hold the same weights store them once, in a shared external-data file.

A bundle has two graphs per precision (mole.onnx_graph says why: the routing + prefill graph and
the KV-cache decode step), and both hold the whole language model: for the SmolLM2 base that
was 662 + 654 MB of fp32, the LM twice. ONNX's external data lets an initializer live in a side
file at an (offset, length); :func:`share_weights` moves every initializer of at least
``min_bytes`` out of the graphs into one file, **one copy per distinct content** (sha256 of the
raw bytes, whatever the initializer's name in each graph — the exporter names constants
differently in the two traces), and points each graph's initializers there. onnxruntime and
``onnx.load`` resolve the file relative to the graph, so a bundle folder stays self-contained,
and the bundle manifest hashes the shared file like any other. The same split keeps each graph
file far below protobuf's 2 GB limit whatever the model's size.

Offsets of tensors of at least :data:`PAGE_FROM` bytes are aligned to :data:`ALIGN` bytes
(onnxruntime can then map them instead of copying); smaller ones to 64 bytes — page-aligning
every 1 KB bias cost the own base's int8 weights file ~10% in padding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

ALIGN = 4096
PAGE_FROM = 64 << 10
MIN_BYTES = 1024  # smaller initializers stay inside their graph (shapes, scalars, small biases)


def _raw(t: TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()  # typed fields (float_data, …) → the same bytes


def share_weights(graphs: Sequence[Path], data_name: str, min_bytes: int = MIN_BYTES) -> dict[str, int]:
    """Rewrite ``graphs`` (ONNX files in one folder, weights inline or already external) so that
    their initializers of ≥ ``min_bytes`` live in ``<folder>/<data_name>``, each distinct content
    once. Returns {"tensors": externalised initializers, "unique": distinct contents, "bytes":
    the data file's size, "saved": bytes not written twice}."""
    folder = Path(graphs[0]).parent
    if any(Path(g).parent != folder for g in graphs):
        raise ValueError(f"graphs sharing {data_name!r} must lie in one folder, got {graphs}")
    models = [onnx.load(str(g), load_external_data=True) for g in graphs]
    where: dict[str, tuple[int, int]] = {}  # sha256 → (offset, length)
    tensors = saved = 0
    data = folder / data_name
    tmp = data.with_name(f".{data_name}.tmp")
    with open(tmp, "wb") as f:
        for m in models:
            for init in m.graph.initializer:
                if init.data_type == TensorProto.STRING:
                    continue
                raw = _raw(init)
                if len(raw) < min_bytes:
                    continue
                digest = hashlib.sha256(raw).hexdigest()
                if digest in where:
                    saved += len(raw)
                else:
                    f.write(b"\0" * (-f.tell() % (ALIGN if len(raw) >= PAGE_FROM else 64)))
                    where[digest] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = where[digest]
                # A tensor is either inline or external: its typed fields and bytes go.
                for field in ("float_data", "int32_data", "int64_data", "double_data",
                              "uint64_data", "raw_data"):
                    init.ClearField(field)
                del init.external_data[:]
                init.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", offset), ("length", length)):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, str(value)
                tensors += 1
    tmp.replace(data)
    for m, g in zip(models, graphs, strict=True):
        onnx.save(m, str(g))  # data already placed: only the graph is written
    return {"tensors": tensors, "unique": len(where), "bytes": data.stat().st_size, "saved": saved}


def stored_bytes(graphs: Sequence[Path]) -> int:
    """Bytes on disk of ``graphs`` with the external-data files they reference, each file once
    (what a device stores and downloads for them)."""
    files: set[Path] = set()
    for g in graphs:
        g = Path(g)
        files.add(g)
        model = onnx.load(str(g), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                loc = next((e.value for e in init.external_data if e.key == "location"), None)
                if loc:
                    files.add(g.parent / loc)
    return sum(f.stat().st_size for f in files)


def graph_bytes(graph: Path) -> int:
    """Bytes of one graph: its file and the external tensors it references (each (file, offset)
    once) — its own share of a weights file other graphs also use."""
    g = Path(graph)
    model = onnx.load(str(g), load_external_data=False)
    seen: set[tuple[str, str]] = set()
    total = g.stat().st_size
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            key = (info.get("location", ""), info.get("offset", "0"))
            if key not in seen:
                seen.add(key)
                total += int(info.get("length", 0))
    return total
