"""FedMoLE's Flower ServerApp: read the run config, run the task loop, write the run's result.

The task loop is the one every run uses (``mole.task_loop.run_tasks``); here a task's
``learn`` is its Flower rounds (``Strategy.start`` over the task's probe and training rounds,
the strategy saying what each round means) and its scores are the evaluation round's.

The cloud holds the foundation model (``model.base-path``): it reads the candidate modules and
their shapes from it (plan and aggregation need them), never trains it here. Results: the
checkpoint (every round, :mod:`protocol.state`) and ``server_result.json`` at the end (accuracy
matrix, communication, rejections, per-round log) in ``app.out-dir``; ``fedmole simulate`` turns
them into ``metrics.json`` and the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cloud import comm
from cloud.robust import dp_report
from cloud.strategy import FedMoleStrategy, StopRun
from mole.backbone import load_backbone
from mole.families.base import require_edge_bundle
from mole.modality import modality_map, module_dims
from mole.peft_export import write_plan_experts
from mole.router import DEFAULT_BLOCKS
from mole.task_loop import run_tasks
from protocol.app_config import AppConfig, split_run_config
from protocol.config import RunConfig
from protocol.state import CHECKPOINT, GlobalState, load_checkpoint

RESULT = "server_result.json"
PEFT_DIR = "peft"  # OUT/peft/<task>: the experts as PEFT adapters (mole.peft_export)
log = logging.getLogger(__name__)


ACC = "acc"  # the cloud's row value of a task: its primary metric, as the clients scored it


def rounds_per_task(strategy: FedMoleStrategy) -> int:
    return strategy.total_rounds // len(strategy.tasks)


def learn_task(strategy: FedMoleStrategy, grid: Grid, t: int, timeout: float) -> dict[str, Any]:
    """Task t of the continual loop (mole.task_loop.run_tasks), federated: its probe and
    training rounds on Flower's own round loop (``Strategy.start``), from wherever the global
    state stands (a resumed run starts inside a task, or past it). The task's last round
    evaluates every client; every round is checkpointed and, after the evaluation, published
    (``on_round_end``)."""
    per = rounds_per_task(strategy)
    done, end = strategy.state.round, (t + 1) * per
    if done < end:
        strategy.offset = done  # Flower numbers this call's rounds from 1
        strategy.result = strategy.start(grid, strategy.global_arrays(), num_rounds=end - done,
                                         timeout=timeout, evaluate_fn=strategy.on_round_end)
    return {"task": strategy.tasks[t], "rounds": end - max(done, t * per)}


def task_score(strategy: FedMoleStrategy, task: str, seen: list[str]) -> dict[str, float]:
    """Task ``task``'s scores after the last task of ``seen``: the evaluation round's
    count-weighted primary metric (NaN where no client held or scored it) and every metric."""
    t, i = len(seen) - 1, strategy.tasks.index(task)
    row = strategy.state.acc_matrix.get(t)
    detail = strategy.state.task_scores.get(t, {}).get(task, {})
    return {**detail, ACC: float("nan") if row is None else row[i]}


def run_server(grid: Grid, cfg: RunConfig, app: AppConfig, timeout: float | None = None) -> GlobalState:
    if not cfg.model.base_path:
        raise ValueError("run config `model.base-path` is empty: the cloud needs its base checkpoint")
    if not app.out_dir:
        raise ValueError("run config `app.out-dir` is empty: the cloud needs a folder for its state")
    out = Path(app.out_dir)
    t0 = time.perf_counter()
    model, _ = load_backbone(cfg.model.base_path)
    if app.registry_dir:  # a bundle per task: refuse a base it cannot be built for, up front
        require_edge_bundle(model, cfg.model.base_path)
    mmap = modality_map(model)
    state = None
    if app.resume and (out / CHECKPOINT).is_file():
        state = load_checkpoint(out)
        log.info("resuming %s from round %d", state.method, state.round)
    strategy = FedMoleStrategy(
        cfg, mmap, module_dims(model, list(mmap)), state=state,
        router_dim=model.hidden_size * len(DEFAULT_BLOCKS),
        full_model_bytes=4 * sum(p.numel() for p in model.parameters()), checkpoint_dir=out)
    del model
    strategy.stop_after_round = app.stop_after_round
    if app.registry_dir:
        from cloud.publish import publish_task

        def publisher(state: GlobalState, task_index: int, task: str) -> str:
            return publish_task(cfg, state, task_index, task, Path(app.registry_dir),
                                Path(app.signing_key)).name

        strategy.publisher = publisher
    wait = cfg.federation.round_timeout if timeout is None else timeout
    try:
        run_tasks(f"fed-{strategy.method}", strategy.tasks, lambda t, task: learn_task(
            strategy, grid, t, wait), lambda task, seen: task_score(strategy, task, seen),
            lambda t, task: None, lambda task: ACC, progress=False)
    except StopRun as e:
        log.warning("%s", e)
        return strategy.state
    # Every global expert as a stock PEFT adapter OUT/peft/<task> (a Seq-LoRA run's one adapter
    # as OUT/peft/shared), loadable with PeftModel.from_pretrained(<the base's HF class>, folder).
    write_plan_experts(cfg.model.base_path, strategy.state.experts, strategy.state.plan,
                       cfg.lora.alpha, out / PEFT_DIR)
    write_result(strategy.state, out, time.perf_counter() - t0, cfg.federation.dp_delta)
    return strategy.state


def write_result(state: GlobalState, out: Path, wall_s: float, dp_delta: float = 1e-5) -> Path:
    meta: dict[str, Any] = state.meta()
    meta["comm_summary"] = comm.summary(state.comm)
    meta["dp"] = dp_report(state.rounds, dp_delta)
    meta["server_wall_s"] = round(wall_s, 1)
    path = out / RESULT
    tmp = path.with_name(f".{RESULT}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1, default=lambda x: None).replace("NaN", "null") + "\n")
    os.replace(tmp, path)
    return path


def make_server_app(run_config: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` (flat keys) stands in for Flower's when given (run_simulation
    passes none), else the app reads ``context.run_config`` (``flwr run``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, appcfg = split_run_config(dict(run_config if run_config is not None else context.run_config))
        run_server(grid, cfg, appcfg)

    return server


app = make_server_app()
