"""The end of every bench: write the JSON with its targets, and exit non-zero when one is missed.

A bench's figures are only useful to a script (CI, a release check) if the script can tell a
pass from a miss without parsing the JSON, so each bench states its own targets here and
``finish`` writes them into the JSON (``targets``: name → {value, op, bound, met}; ``ok``) and
exits with ``MISSED`` when any is missed. Exit code 1 stays what Python gives an uncaught
exception: a bug, not a missed target.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MISSED = 3  # exit status when the bench ran but missed a target

_OPS = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, "==": lambda v, b: v == b}


def check(targets: Mapping[str, tuple[Any, str, Any]]) -> dict[str, dict[str, Any]]:
    """``targets``: name → (measured value, op, bound); a value of None or NaN is a miss."""
    out: dict[str, dict[str, Any]] = {}
    for name, (value, op, bound) in targets.items():
        if op not in _OPS:
            raise ValueError(f"target {name!r}: op must be one of {sorted(_OPS)}, got {op!r}")
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        out[name] = {"value": value, "op": op, "bound": bound,
                     "met": bool(not missing and _OPS[op](value, bound))}
    return out


def finish(res: dict[str, Any], out: Path, targets: Mapping[str, tuple[Any, str, Any]]) -> None:
    """Add ``targets`` and ``ok`` to ``res``, write it to ``out``, print a summary, and exit
    with MISSED (3) when a target is missed (0 otherwise)."""
    res["targets"] = check(targets)
    res["ok"] = all(t["met"] for t in res["targets"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict | list)}, indent=2))
    for name, t in res["targets"].items():
        print(f"  {'met   ' if t['met'] else 'MISSED'} {name}: {t['value']} {t['op']} {t['bound']}")
    if not res["ok"]:
        missed = [n for n, t in res["targets"].items() if not t["met"]]
        print(f"{Path(sys.argv[0]).name}: missed {', '.join(missed)} (written to {out})",
              file=sys.stderr)
        sys.exit(MISSED)
