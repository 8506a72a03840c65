"""The embedded benchmark: a generated, deterministic continual multimodal instruction stream.

``ensure_benchmark(cfg.data)`` returns a cached folder with ``stream.json``, ``pretrain/`` and one
folder per task in the manifest format of :mod:`protocol.manifest`: images as ``.png``, audio as
mono 16-bit ``.wav`` at :data:`AUDIO_RATE` Hz, at most :data:`MAX_SECONDS` long.
"""

from simulation.benchmark.audio import AUDIO_RATE, MAX_SAMPLES, MAX_SECONDS
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
    AUDIO_TEXT,
    IMAGE_TEXT,
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
    "AUDIO_RATE",
    "AUDIO_TEXT",
    "COLORS",
    "GENERATOR_VERSION",
    "IMAGE_TEXT",
    "MAX_SAMPLES",
    "MAX_SECONDS",
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
