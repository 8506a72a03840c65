"""A federated run on one machine through Flower's simulation engine (``fedmole simulate``).

1. The cloud's side of set-up: the benchmark and the pretrained base (cached), then the scenario —
   the Dirichlet/modality split of ``federation.*`` materialized as one data folder per client
   under ``OUT/clients/client-NN`` (the edge's on-disk format, docs/design.md §3).
2. ``flwr.simulation.run_simulation`` with the real ServerApp (:mod:`cloud.server_app`) and
   ClientApp (:mod:`edge.client_app`): ``federation.clients`` virtual SuperNodes on the Ray
   backend, one CPU per ClientApp actor and ``app.client-threads`` torch threads each. The apps
   get the run config directly (run_simulation has no run-config channel); ``flwr run .`` gives
   the same keys through ``[tool.flwr.app.config]``.
3. ``OUT/server_result.json`` → ``metrics.json``, ``accuracy_matrix.png``, ``report.md`` and
   ``rounds.png`` (accuracy and bytes per round).

``--resume`` continues from ``OUT/checkpoint.safetensors`` (the clients' replay buffers live in
their folders, so they continue too).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocol.app_config import AppConfig
from protocol.config import ConfigError, RunConfig
from simulation.base import base_summary, ensure_base
from simulation.data import data_summary, open_stream, open_tasks
from simulation.metrics import modality_arrivals
from simulation.report import write_run_outputs
from simulation.rounds_plot import plot_rounds
from simulation.scenario import materialize, split_stream

log = logging.getLogger(__name__)


def prepare(cfg: RunConfig, out: Path, progress: bool = True
            ) -> tuple[RunConfig, Any, dict[str, Any]]:
    """Stream (built-in or the user's), base and client folders; returns the config with
    ``model.base-path`` set, the partition and the data summary for metrics.json."""
    stream = open_stream(cfg)
    tasks = open_tasks(cfg, stream)
    base = ensure_base(cfg, tasks, progress)
    # The base is now a checkpoint folder; `model.lm` (what built it) goes with that, as a
    # config naming both is refused (the checkpoint brings its own LM).
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_path=str(base), lm=""))
    partition = split_stream(tasks, cfg.federation)
    materialize(partition, tasks, out / "clients")
    return cfg, partition, data_summary(stream, tasks, cfg.train.max_new_tokens)


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    import torch

    cores = os.cpu_count() or 1
    share = cfg.federation.client_gpus
    gpus = torch.cuda.device_count()
    if share > 0 and not gpus:
        raise ConfigError(f"`federation.client-gpus` = {share} asks Ray for a GPU share per "
                          "client, but torch sees no CUDA device; set it to 0 on this machine")
    return {"client_resources": {"num_cpus": 1, "num_gpus": float(share)},
            "init_args": {"num_cpus": min(cores, cfg.federation.clients),
                          "num_gpus": gpus if share > 0 else 0,
                          "include_dashboard": False, "log_to_driver": True,
                          "logging_level": "error"}}


def run_federated(cfg: RunConfig, out: Path, resume: bool = False, progress: bool = True,
                  stop_after_round: int = 0, registry_dir: Path | None = None,
                  signing_key: Path | None = None) -> dict | None:
    """Run the scenario; None when ``stop_after_round`` ended it early (resume to finish).
    With ``registry_dir`` the cloud publishes a bundle signed by ``signing_key`` after each task."""
    from flwr.simulation import run_simulation

    from cloud.server_app import RESULT, make_server_app
    from edge.client_app import make_client_app

    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for stale in ("checkpoint.safetensors", RESULT):
            (out / stale).unlink(missing_ok=True)
    cfg, partition, data = prepare(cfg, out, progress)
    app = AppConfig(out_dir=str(out), clients_dir=str(out / "clients"), client_threads=1,
                    resume=resume, stop_after_round=stop_after_round,
                    registry_dir=str(Path(registry_dir).resolve()) if registry_dir else "",
                    signing_key=str(Path(signing_key).resolve()) if signing_key else "")
    flat = {**cfg.to_flat(), **app.to_flat()}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False  # flwr has its own handler; the root one would print it twice
    if not progress:
        flwr_log.setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(make_server_app(flat), make_client_app(flat), num_supernodes=cfg.federation.clients,
                   backend_config=backend_config(cfg))  # type: ignore[arg-type]
    result_path = out / RESULT
    if stop_after_round and not result_path.is_file():
        return None
    if not result_path.is_file():
        raise RuntimeError(f"the simulation ended without {str(result_path)!r}; see the log above")
    return write_outputs(cfg, out, json.loads(result_path.read_text()), partition,
                         time.perf_counter() - t0, data)


def write_outputs(cfg: RunConfig, out: Path, result: dict, partition: Any, wall_s: float,
                  data: dict[str, Any] | None = None) -> dict:
    tasks = list(cfg.data.tasks)
    rows = result["acc_matrix"]
    acc = [[float("nan") if x is None else x for x in rows[str(t)]] for t in range(len(tasks))
           if str(t) in rows]
    if len(acc) != len(tasks):
        raise RuntimeError(f"the run evaluated {len(acc)} of {len(tasks)} tasks; resume it with --resume")
    method = result["method"]
    summary = result["comm_summary"]
    mods: dict[str, Sequence[str]] = {t: sorted(partition.task_modalities[t]) for t in tasks}
    plot_rounds(out / "rounds.png", method, result["rounds"], acc)
    router_acc = result.get("router_acc", {})
    extra = {
        "label": f"fed-{method}",
        "comm": summary,
        "federation": {"clients": cfg.federation.clients, "fraction": cfg.federation.fraction,
                       "dirichlet_alpha": cfg.federation.dirichlet_alpha,
                       "no_audio_fraction": cfg.federation.no_audio_fraction,
                       "rounds_per_task": cfg.federation.rounds_per_task,
                       "local_steps": cfg.federation.local_steps,
                       "compression": cfg.federation.compression,
                       "partition": partition.task_counts()},
        "rejected": result["rejected"],
        "rejected_by_node": result.get("rejected_by_node", {}),
        "aggregation": {"centers": list(cfg.federation.aggregation), "dp": result.get("dp")},
        "rounds": result["rounds"],
        "dmole": {"plan_experts": {t: _per_modality(result["plan"], t) for t in result["plan"]["tasks"]},
                  "partners": result["partners"], "thresholds": result["thresholds"],
                  "router_accuracy": router_acc.get(str(len(tasks) - 1))},
        "server_wall_s": result.get("server_wall_s"),
        # Every metric of every task after the last task (row t of acc_matrix holds the primary)
        "task_scores": result.get("task_scores", {}).get(str(len(tasks) - 1), {}),
        "task_scores_by_row": result.get("task_scores", {}),
        "base": base_summary(Path(cfg.model.base_path)),
        "data": data,
        "notes": [
            f"Federated {method}: {cfg.federation.clients} clients (fraction "
            f"{cfg.federation.fraction}), Dirichlet alpha {cfg.federation.dirichlet_alpha}, "
            f"{cfg.federation.no_audio_fraction:.0%} without audio, "
            f"{cfg.federation.rounds_per_task} rounds × {cfg.federation.local_steps} local steps "
            "per task; accuracies are test-count-weighted over the clients holding each task.",
            f"Upload per client and round: {summary['bytes_up_per_client_round'] / 1e3:.1f} kB = "
            f"{100 * (summary['up_per_client_round_over_full_model'] or 0):.2f}% of the fp32 model.",
        ],
    }
    extra["modality_arrivals"] = modality_arrivals(tasks, acc, mods)
    return write_run_outputs(out, method=f"fed-{method}", tasks=tasks, acc_matrix=acc, zero_shot=None,
                             bytes_up=int(summary["bytes_up"]), bytes_down=int(summary["bytes_down"]),
                             wall_s=wall_s, config=cfg.to_flat(), extra=extra)


def _per_modality(plan: dict, task: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in plan["experts"]:
        if e["task"] == task:
            out[e["modality"]] = out.get(e["modality"], 0) + 1
    return out

