"""Run outputs: ``metrics.json``, ``accuracy_matrix.png`` and ``report.md`` (docs/design.md §3).

Every run writes the three files into its output folder through :func:`write_run_outputs`;
the CLI reads them back with :func:`load_metrics` and prints :func:`comparison_table`.
``metrics.json`` is strict JSON (NaN is written as ``null``), is written atomically and last,
so its presence means the run's outputs are complete. Accuracies are percent; metrics are
stored at full precision and rounded only in the human-readable files.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulation import metrics as M

METRICS_FILE = "metrics.json"
MATRIX_PNG = "accuracy_matrix.png"
REPORT_MD = "report.md"

# Keys every metrics.json has (docs/design.md §3), plus the ones this module adds beside them.
CONTRACT_KEYS: tuple[str, ...] = (
    "method",
    "tasks",
    "acc_matrix",
    "avg",
    "last",
    "bwt",
    "forgetting",
    "bytes_up",
    "bytes_down",
    "wall_s",
    "config",
)
RESERVED_KEYS: tuple[str, ...] = (*CONTRACT_KEYS, "zero_shot", "fwt")

_MB = 1e6  # "MB" in reports is 10^6 bytes


# ----------------------------------------------------------------------------- JSON helpers


def _jsonable(obj: Any, where: str) -> Any:
    """Convert to strict-JSON-ready values: NaN/inf → None, numpy → Python, tuples → lists."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, int | bool):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, Sequence | set | frozenset):
        items = sorted(obj, key=str) if isinstance(obj, set | frozenset) else obj
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{where} is a {type(obj).__name__} ({obj!r}), which metrics.json cannot hold; "
        "pass numbers, strings, lists or dicts"
    )


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    # Not tempfile.mkstemp: its files are 0600; open(..., "xb") keeps the usual umask modes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


# ------------------------------------------------------------------------------ formatting


def _fmt(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return str(value)
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A markdown table padded to column width, so it also reads well as plain text."""
    cols = [[_cell(h)] + [_cell(r[j]) for r in rows] for j, h in enumerate(header)]
    widths = [max(3, *(len(c) for c in col)) for col in cols]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else ("-" * (w + 2))
            for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    body = [line([c[k + 1] for c in cols]) for k in range(len(rows))]
    return "\n".join([line([c[0] for c in cols]), rule, *body])


# ------------------------------------------------------------------------------ the figure


def _plot_matrix(
    path: Path,
    method: str,
    tasks: Sequence[str],
    acc: M.Matrix,
    zero_shot: M.Matrix | None,
    summary: Mapping[str, float],
) -> None:
    """Heatmap of the accuracy matrix; cells above the diagonal are hatched grey (not trained)."""
    # Figure/FigureCanvasAgg directly, not pyplot: no global backend state, no open-figure leaks.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(tasks)
    rows = ([zero_shot] if zero_shot is not None else []) + [acc[t] for t in range(n)]
    labels = (["zero-shot"] if zero_shot is not None else []) + [
        f"after {t + 1}: {name}" for t, name in enumerate(tasks)
    ]
    offset = 1 if zero_shot is not None else 0
    data = np.vstack(rows)  # (offset + T, T)
    trained = np.ones_like(data, dtype=bool)
    for t in range(n):
        trained[offset + t, t + 1 :] = False  # i > t: not trained yet
    shown = np.ma.masked_where(~trained | ~np.isfinite(data), data)

    cmap = "viridis"
    norm = Normalize(vmin=0.0, vmax=100.0)
    fig = Figure(figsize=(max(5.0, 1.0 * n + 3.0), max(3.5, 0.6 * len(rows) + 2.0)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
    ax.set_facecolor("white")
    scalar_map = image.cmap
    for r in range(data.shape[0]):
        for c in range(n):
            value = float(data[r, c])
            if not trained[r, c]:
                ax.add_patch(
                    Rectangle(
                        (c - 0.5, r - 0.5),
                        1,
                        1,
                        facecolor="0.88",
                        edgecolor="0.6",
                        hatch="//",
                        linewidth=0.0,
                    )
                )
                color = "0.25"
            else:
                rgba = scalar_map(norm(value)) if math.isfinite(value) else (1.0, 1.0, 1.0, 1.0)
                red, green, blue = rgba[0], rgba[1], rgba[2]
                color = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            text = f"{value:.1f}" if math.isfinite(value) else "—"
            # untrained cells: a grey box behind the number keeps it legible over the hatching
            box = None if trained[r, c] else {"facecolor": "0.88", "edgecolor": "none", "pad": 1}
            ax.text(c, r, text, ha="center", va="center", color=color, fontsize=9, bbox=box)
    if zero_shot is not None:
        ax.axhline(0.5, color="black", linewidth=1.5)  # zero-shot row apart from the stages
    tilt = n > 4 or max(len(t) for t in tasks) > 8
    ax.set_xticks(
        range(n), labels=list(tasks), rotation=30 if tilt else 0, ha="right" if tilt else "center"
    )
    ax.set_yticks(range(len(rows)), labels=labels)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("model")
    ax.set_title(
        f"{method}: AVG {_fmt(summary['avg'], 1)} · Last {_fmt(summary['last'], 1)} · "
        f"BWT {_fmt(summary['bwt'], 1, signed=True)}",
        fontsize=11,
    )
    fig.colorbar(image, ax=ax, label="score (%)", fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------ the report


def _report_md(m: Mapping[str, Any], acc: M.Matrix, zero_shot: M.Matrix | None) -> str:
    tasks: list[str] = m["tasks"]
    n = len(tasks)
    out = [f"# Run report: {m['method']}", ""]
    out += [f"Tasks, in training order: {', '.join(f'`{t}`' for t in tasks)}.", ""]

    out += ["## Summary", ""]
    summary = [
        ("AVG (%)", _fmt(m["avg"])),
        ("Last (%)", _fmt(m["last"])),
        ("BWT (points)", _fmt(m["bwt"], signed=True)),
        ("Forgetting (points)", _fmt(m["forgetting"])),
        ("FWT (points)", _fmt(m["fwt"], signed=True)),
        ("Wall time (s)", _fmt(m["wall_s"], 1)),
        ("Uploaded (MB)", _fmt(m["bytes_up"] / _MB, 2)),
        ("Downloaded (MB)", _fmt(m["bytes_down"] / _MB, 2)),
    ]
    out += [_md_table(["Metric", "Value"], summary, [False, True]), ""]

    out += ["## Accuracy matrix", ""]
    out += [
        "Score (%) on each task (columns) after training through each task (rows). "
        "Italic: tasks not trained yet (used only for FWT); — : not measured.",
        "",
    ]
    header = ["", *tasks]
    rows: list[list[str]] = []
    if zero_shot is not None:
        rows.append(["zero-shot", *(_fmt(v) for v in zero_shot)])
    for t in range(n):
        cells = [_fmt(v) for v in acc[t]]
        cells = [c if i <= t or c == "—" else f"*{c}*" for i, c in enumerate(cells)]
        rows.append([f"after {t + 1}: {tasks[t]}", *cells])
    out += [_md_table(header, rows, [False] + [True] * n), ""]
    out += [f"![accuracy matrix]({MATRIX_PNG})", ""]

    task_scores = m.get("task_scores")
    if isinstance(task_scores, Mapping) and task_scores:
        names: list[str] = []
        for scores in task_scores.values():
            names += [k for k in scores if k not in names]
        score_rows = [
            [str(task), *(_fmt(scores.get(k)) for k in names)]
            for task, scores in task_scores.items()
        ]
        out += ["## Final scores per task", ""]
        out += [_md_table(["task", *names], score_rows, [False] + [True] * len(names)), ""]

    arrivals = m.get("modality_arrivals")
    if isinstance(arrivals, Sequence) and arrivals:
        out += ["## New modalities", ""]
        out += ["Points each earlier task lost between the step before a modality's first task "
                "and the end of the stream (positive = lost).", ""]
        for arr in arrivals:
            drops = arr.get("drops", {})
            out += [f"- `{arr['modality']}` arrives with `{arr['first_task']}`: "
                    + (", ".join(f"{t} {_fmt(d, 1, signed=True)}" for t, d in drops.items())
                       or "no earlier task")
                    + f" (max {_fmt(arr.get('max_drop'), 1)})"]
        out += [""]

    base = m.get("base")
    if isinstance(base, Mapping) and base:
        out += _base_section(base)

    notes = m.get("notes")
    if isinstance(notes, Sequence) and not isinstance(notes, str) and notes:
        out += ["## Notes", "", *(f"- {note}" for note in notes), ""]

    out += [
        "## Config",
        "",
        "```json",
        json.dumps(m["config"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(out)


def _base_section(base: Mapping[str, Any]) -> list[str]:
    """The base the run started from: which weights, how good, where they were made.

    Results on the generated stream move with the base (see the README's reproducibility
    section), so a report without its base is not comparable to any other."""
    out = ["## Base", ""]
    rows = [["path", f"`{base.get('path', '?')}`"]]
    for key, label in (("weights_sha256", "weights sha256"), ("data_sha256", "data sha256")):
        if base.get(key):
            rows.append([label, f"`{base[key]}`"])
    if "seed" in base:
        rows.append(["pretraining", f"seed {base['seed']}, {base.get('steps', '?')} steps"])
    machine = base.get("machine")
    if isinstance(machine, Mapping) and machine:
        rows.append(["pretrained on", f"{machine.get('cpu', '?')} ({machine.get('cpu_capability', '?')}, "
                     f"{machine.get('threads', '?')} threads), torch {machine.get('torch', '?')}"])
    out += [_md_table(["", "value"], rows, [False, False]), ""]
    held = base.get("heldout")
    if isinstance(held, Mapping) and held:
        met = base.get("target_met", True)
        out += [f"Held-out exact match (%) per pretraining template; the bar is a mean of "
                f"{_fmt(base.get('target'), 0)}%: " + ("met." if met else "**missed** — this base is "
                "weaker than the reference bases, so results are not comparable."), ""]
        names = list(held)
        out += [_md_table(names, [[_fmt(held[t]) for t in names]], [True] * len(names)), ""]
    zs = base.get("zero_shot")
    if isinstance(zs, Mapping) and zs:
        names = list(zs)
        out += ["Zero-shot exact match (%) of the base on the stream's test sets:", ""]
        out += [_md_table(names, [[_fmt(zs[t]) for t in names]], [True] * len(names)), ""]
    return out


# -------------------------------------------------------------------------------- public API


def write_run_outputs(
    out_dir: Path,
    *,
    method: str,
    tasks: list[str],
    acc_matrix: M.AccLike,
    zero_shot: list[float] | None,
    bytes_up: int,
    bytes_down: int,
    wall_s: float,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``accuracy_matrix.png`` and ``report.md`` into ``out_dir``.

    ``acc_matrix[t][i]`` is the score (percent) on task ``i`` after training through task
    ``t`` (NaN/None above the diagonal when not measured); ``zero_shot[i]`` the untrained base
    model's score on task ``i``. ``extra`` keys are merged at the top level of metrics.json
    (``task_scores``: task → metric → value, and ``notes``: list of str, are also rendered in
    the report); an ``extra`` key that collides with one this function writes raises
    ValueError. Returns the metrics dict as written (NaN as None).
    """
    acc = M.as_matrix(acc_matrix)
    n = acc.shape[0]
    if len(tasks) != n:
        raise ValueError(f"tasks has {len(tasks)} names but acc_matrix is {n}x{n}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be unique, got {tasks!r}")
    for name, value in (("bytes_up", bytes_up), ("bytes_down", bytes_down)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not math.isfinite(wall_s) or wall_s < 0:
        raise ValueError(f"wall_s must be a finite number >= 0, got {wall_s!r}")
    if not isinstance(config, Mapping):
        raise ValueError(
            f"config must be a dict of the run's settings, got {type(config).__name__}"
        )
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(
            f"extra must not overwrite metrics.json keys {clash}; rename them "
            f"(reserved: {', '.join(RESERVED_KEYS)})"
        )
    z = None if zero_shot is None else M.as_scores(zero_shot, n)
    summary = M.summarize(acc, z)

    record: dict[str, Any] = {
        "method": str(method),
        "tasks": [str(t) for t in tasks],
        "acc_matrix": [_nan_to_none(row) for row in acc.tolist()],
        "zero_shot": None if z is None else _nan_to_none(z.tolist()),
        **summary,
        "bytes_up": int(bytes_up),
        "bytes_down": int(bytes_down),
        "wall_s": float(wall_s),
        "config": config,
        **extra,
    }
    metrics = _jsonable(record, "metrics")
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_matrix(out_dir / MATRIX_PNG, method, metrics["tasks"], acc, z, summary)
    _atomic_write(out_dir / REPORT_MD, _report_md(metrics, acc, z).encode("utf-8"))
    _atomic_write(out_dir / METRICS_FILE, text.encode("utf-8"))  # last: marks the run complete
    return metrics


def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run's ``metrics.json`` (``path`` may be the file or the run's output folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{p}: no such metrics file; did the run finish? (write_run_outputs writes it last)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a JSON object, got {type(data).__name__}")
    return data


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """One line per run: method, AVG, Last, BWT, Forgetting, wall s, MB up (1 decimal).

    A run's ``label`` (e.g. a D-MoLE ablation) names its line instead of ``method``; when any
    run reports a router accuracy (``dmole.router_accuracy``), a "router %" column is added.
    """
    columns = [
        ("method", "method"),
        ("AVG", "avg"),
        ("Last", "last"),
        ("BWT", "bwt"),
        ("Forgetting", "forgetting"),
        ("wall s", "wall_s"),
        ("MB up", "bytes_up"),
    ]
    routed = any(isinstance(r.get("dmole"), Mapping) and "router_accuracy" in r["dmole"]
                 for r in rows)
    body: list[list[str]] = []
    for k, row in enumerate(rows):
        missing = [key for _, key in columns if key not in row]
        if missing:
            raise ValueError(
                f"run {k} ({row.get('method', '?')}) lacks metrics.json keys {missing}"
            )
        up = row["bytes_up"]
        line = [
            str(row.get("label") or row["method"]),
            _fmt(row["avg"], 1),
            _fmt(row["last"], 1),
            _fmt(row["bwt"], 1, signed=True),
            _fmt(row["forgetting"], 1),
            _fmt(row["wall_s"], 1),
            _fmt(None if up is None else up / _MB, 1),
        ]
        if routed:
            d = row.get("dmole")
            line.append(_fmt(d.get("router_accuracy") if isinstance(d, Mapping) else None, 1))
        body.append(line)
    header = [h for h, _ in columns] + (["router %"] if routed else [])
    return _md_table(header, body, [False] + [True] * (len(header) - 1))
