"""The reference intervals a run is compared with (``conf/reference.json``, from bench/seeds.py).

Results on the generated stream move with the base and the seed, so a single figure in the
README cannot tell a user whether their run is healthy. bench/seeds.py measures each method over
pretraining seeds × run seeds; this module reads what it wrote and says where a run lands.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parents[1] / "conf" / "reference.json"
FIGURES = (("avg", "AVG"), ("last", "Last"), ("bwt", "BWT"))


def load_reference(path: Path = REFERENCE) -> dict[str, Any] | None:
    """The reference file, or None when there is none (a checkout without measured spreads)."""
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def interval(s: Mapping[str, float]) -> tuple[float, float]:
    """The band a healthy run falls in: mean ± 2 std, widened to the observed min and max."""
    return (min(s["min"], s["mean"] - 2 * s["std"]), max(s["max"], s["mean"] + 2 * s["std"]))


def compare_lines(metrics: Mapping[str, Any], ref: Mapping[str, Any] | None,
                  default_config: bool) -> list[str]:
    """Lines for the terminal: the run's AVG/Last/BWT beside the reference interval, and a plain
    statement when the run falls outside it."""
    method = str(metrics.get("method"))
    if ref is None or method not in ref.get("methods", {}):
        return [f"{method}: no reference interval for this method (run bench/seeds.py to make one)"]
    r = ref["methods"][method]
    n, m = ref.get("seeds", "?"), ref.get("pretrain_seeds", "?")
    lines = [f"{method} against the reference (bench/seeds.py: {n} seeds × {m} pretraining seeds, "
             "built-in defaults):"]
    outside = []
    for key, name in FIGURES:
        if key not in r or metrics.get(key) is None:
            continue
        lo, hi = interval(r[key])
        got = float(metrics[key])
        inside = lo <= got <= hi
        if not inside:
            outside.append(name)
        lines.append(f"  {name:4s} {got:6.1f}   reference {r[key]['mean']:.1f} ± {r[key]['std']:.1f} "
                     f"(interval {lo:.1f} … {hi:.1f})  {'inside' if inside else 'OUTSIDE'}")
    if not default_config:
        lines.append("  (this run is not on the built-in defaults, so the reference is only a guide)")
    elif outside:
        lines.append(f"  {', '.join(outside)} fell outside the reference interval: compare this "
                     "run's base (report.md, section Base: held-out row, weights sha256, machine) "
                     "with the README's reference bases before trusting a method comparison.")
    return lines
