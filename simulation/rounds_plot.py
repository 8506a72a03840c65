"""``rounds.png``: a federated run's accuracy and communication over server rounds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_rounds(path: Path, method: str, rounds: Sequence[dict[str, Any]],
                acc: Sequence[Sequence[float]]) -> Path:
    """Top: mean accuracy over the tasks seen so far, at each task's evaluation round.
    Bottom: cumulative MB up and down after every round."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    # The task of each round is named in the log; the last train round of task t evaluates row t.
    by_task: dict[str, int] = {}
    for r in rounds:
        if r.get("phase") == "train":
            by_task[r["task"]] = r["round"]
    xs = list(by_task.values())[: len(acc)]
    ys = [float(np.nanmean(row[: t + 1])) for t, row in enumerate(acc)][: len(xs)]
    ax1.plot(xs, ys, marker="o")
    ax1.set_ylabel("mean acc. over seen tasks (%)")
    ax1.set_title(f"{method}: accuracy and communication per round")
    ax1.grid(alpha=0.3)
    r_x = [r["round"] for r in rounds]
    ax2.plot(r_x, [r["bytes_up"] / 1e6 for r in rounds], label="up")
    ax2.plot(r_x, [r["bytes_down"] / 1e6 for r in rounds], label="down")
    ax2.set_ylabel("cumulative MB")
    ax2.set_xlabel("server round")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
