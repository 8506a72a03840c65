"""The embedded benchmark: a generated, deterministic continual multimodal instruction stream.

``ensure_benchmark(cfg.data)`` returns a cached folder with ``stream.json``, ``pretrain/`` and one
folder per task in the manifest format of :mod:`protocol.manifest`.
"""

from simulation.benchmark.generate import (
    GENERATOR_VERSION,
    benchmark_key,
    cache_root,
    ensure_benchmark,
    generate_benchmark,
    stable_index,
    stream_rng,
)
from simulation.benchmark.shapes import COLORS, SHAPES, Obj, render
from simulation.benchmark.tasks import (
    PRETRAIN,
    TASKS,
    TaskSpec,
    check_tasks,
    digits_pools,
    get_task,
    list_tasks,
    task_metrics,
)

__all__ = [
    "COLORS",
    "GENERATOR_VERSION",
    "PRETRAIN",
    "SHAPES",
    "TASKS",
    "Obj",
    "TaskSpec",
    "benchmark_key",
    "cache_root",
    "check_tasks",
    "digits_pools",
    "ensure_benchmark",
    "generate_benchmark",
    "get_task",
    "list_tasks",
    "render",
    "stable_index",
    "stream_rng",
    "task_metrics",
]
