"""The run's data: one stream of tasks in the field's format, built-in or the user's.

``data.stream`` empty → the built-in benchmark, generated and cached (simulation.benchmark),
read through its ``stream.toml``; otherwise the user's stream file (``data.stream-root`` says
where its data lies). Either way the tasks are :class:`~protocol.stream.TaskData` — records
indexed, pixels read on demand — so the centralized runs, the federated split and the edge
clients all read data the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mole.scoring import known_metrics
from protocol.config import ConfigError, RunConfig
from protocol.llava_format import DataError
from protocol.stream import TaskData, TaskStream, load_stream, open_task
from simulation.benchmark import ensure_benchmark
from simulation.benchmark.generate import STREAM_TOML

log = logging.getLogger(__name__)


def open_stream(cfg: RunConfig) -> TaskStream:
    """The run's tasks (``data.tasks`` of the stream, in the stream's order)."""
    if cfg.data.stream:
        stream = load_stream(cfg.data.stream, known_metrics(), root=cfg.data.stream_root or None)
    else:
        stream = load_stream(ensure_benchmark(cfg.data) / STREAM_TOML, known_metrics())
    got = stream.select(cfg.data.tasks)
    if got.names != list(cfg.data.tasks):
        raise ConfigError(f"`data.tasks` = {list(cfg.data.tasks)} must follow the stream's order "
                          f"({', '.join(got.names)}): a continual run learns tasks in the order "
                          f"the stream file {str(stream.source)!r} gives")
    return got


def open_tasks(cfg: RunConfig, stream: TaskStream | None = None) -> dict[str, TaskData]:
    """Every task of the run, indexed (bad records per ``data.on-error``)."""
    stream = stream or open_stream(cfg)
    out: dict[str, TaskData] = {}
    for t in stream.tasks:
        try:
            out[t.name] = open_task(t, cfg.data.on_error)
        except DataError as e:
            raise DataError(f"{e} (set `data.on-error = \"skip\"` to drop bad records and count "
                            "them in metrics.json)" if cfg.data.on_error == "fail" else str(e)
                            ) from e
        d = out[t.name]
        for msg in d.train.skipped + d.test.skipped:
            log.warning("skipped a bad record: %s", msg)
        if d.train.renamed + d.test.renamed:
            log.warning("task %r: %d records reuse an earlier record's id in their file; kept "
                        "as id#2, id#3, …", t.name, d.train.renamed + d.test.renamed)
    return out


def data_summary(stream: TaskStream, data: dict[str, TaskData], default_tokens: int) -> dict:
    """What metrics.json records of the data (`data`): the stream, each task's sizes, metrics
    and generation length, and the records dropped under `data.on-error = "skip"`."""
    return {
        "stream": str(stream.source), "name": stream.name,
        "tasks": {t: {"train": len(d.train), "test": len(d.test),
                      "metrics": list(d.spec.metrics), "primary": d.spec.primary,
                      "max_new_tokens": d.spec.max_new_tokens or default_tokens,
                      "modalities": d.modalities(), "skipped": d.skipped,
                      # ids used again in a file, kept as "id#k"
                      "renamed_ids": d.train.renamed + d.test.renamed}
                  for t, d in data.items()},
        "skipped": sum(d.skipped for d in data.values()),
        # The first reasons, for the report (the log has them all).
        "skipped_records": [m for d in data.values() for m in d.train.skipped + d.test.skipped
                            ][:50],
    }


def builtin_root(cfg: RunConfig) -> Path:
    """The built-in benchmark's folder (its pretraining split is the own base's data)."""
    return ensure_benchmark(cfg.data)
