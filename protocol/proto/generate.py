"""Regenerate the committed gRPC stubs: ``python -m protocol.proto.generate [--out DIR]``.

The stubs are generated with the grpcio-tools pinned in pyproject.toml (newer ones need
protobuf 7, which flwr refuses) and committed, so a deployment needs no
compiler. tests/test_protos.py regenerates them into a temporary folder and compares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root: imports read protocol.proto.*
PROTOS = ("protocol/proto/inference.proto", "protocol/proto/registry.proto")


def generate(out: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under ``out``/protocol/proto."""
    from grpc_tools import protoc  # a build-time tool: imported only when regenerating

    out.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(ROOT / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTOS)}")
    return sorted((out / "protocol" / "proto").glob("*_pb2*.py*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    for p in generate(ap.parse_args().out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
