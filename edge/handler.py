"""One round message on a node, as a pure function of (content, node config, run config).

The ClientApp (:mod:`edge.client_app`) calls :func:`handle` in its own process, or forwards the
message to the node's long-lived worker (:mod:`edge.worker`), which calls the very same
function; either way the model and the local data come from :mod:`edge.runtime`'s process-wide
caches, so a process that handles many messages loads them once.

Where the client's data lives: node config ``data-dir`` (a deployed SuperNode), else
``app.clients-dir``/client-<partition-id> (a simulation's virtual node). Its persistent state
(the replay buffer, the global state received: edge.state_cache) goes to node config
``state-dir``, else ``<data-dir>/_state``. With run config ``app.timing-log`` (or node config
``timing-log``, a path) the node appends one JSON line per message to ``<state>/timing.jsonl``
(or that path): phase, round, seconds of local work and of the whole handling
(bench/deploy_round.py reads it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from edge import local
from edge.runtime import edge_model, local_data
from edge.state_cache import DIR as CACHE_DIR
from edge.state_cache import DiskGroupCache
from protocol.app_config import AppConfig, split_run_config
from protocol.instructions import Instruction, unpack_state
from protocol.state_sync import MissingState, encode_need_state, fill

TIMING_LOG = "timing.jsonl"


def client_for(node: Mapping[str, Any], run_config: Mapping[str, Any]
               ) -> tuple[local.Client, AppConfig]:
    """The node's client (its config, data, state folder and the process's model) and the run's
    app keys."""
    cfg, appcfg = split_run_config(dict(run_config))
    torch.set_num_threads(appcfg.client_threads)
    if not cfg.model.base_path:
        raise ValueError("run config `model.base-path` is empty: the ClientApp needs the base "
                         "checkpoint the cloud distributes (fedmole simulate sets it)")
    if "data-dir" in node:
        data_dir = Path(str(node["data-dir"]))
    elif appcfg.clients_dir and "partition-id" in node:
        # The layout simulation.scenario.materialize writes.
        data_dir = Path(appcfg.clients_dir) / f"client-{int(node['partition-id']):02d}"
    else:
        raise ValueError("no client data folder: set node config `data-dir`, or run config "
                         "`app.clients-dir` in a simulation")
    state_dir = Path(str(node.get("state-dir", data_dir / "_state")))
    attack = str(node.get("attack", ""))
    if attack not in local.ATTACKS:
        raise ValueError(f"node config `attack` {attack!r}: use one of {local.ATTACKS} (fault "
                         "injection for tests; leave it unset on a real node)")
    em = edge_model(cfg, Path(cfg.model.base_path))
    return local.Client(cfg, local_data(data_dir, cfg.data.tasks, cfg.data.on_error), state_dir,
                        em, attack), appcfg


def handle(content: RecordDict, node: Mapping[str, Any], run_config: Mapping[str, Any],
           where: str = "clientapp") -> RecordDict:
    """The reply content to one round message (probe, train or evaluate); ``where`` names the
    process kind for the timing log (``clientapp`` or ``worker``)."""
    t0 = time.perf_counter()
    client, appcfg = client_for(node, run_config)
    try:  # the delta-only downlink: what the cloud left out is in the node's cache
        content = fill(content, DiskGroupCache(client.state_dir / CACHE_DIR))
    except MissingState as e:  # a lost or reset cache: the cloud re-sends the whole state
        return encode_need_state(e.groups)
    ins = Instruction.from_record(content["config"])
    arrays = content["arrays"]
    if not isinstance(arrays, ArrayRecord):
        raise TypeError(f"the round's 'arrays' must be an ArrayRecord, got {type(arrays).__name__}")
    experts, routers = unpack_state(arrays)
    with client.em.lock:
        t1 = time.perf_counter()
        if ins.phase == "probe":
            reply = local.probe(client, ins, routers)
        elif ins.phase == "train":
            reply = local.train(client, ins, experts, routers)
        else:
            reply = local.evaluate(client, ins, experts, routers)
        t2 = time.perf_counter()
    if "timing-log" in node or appcfg.timing_log:
        path = Path(str(node["timing-log"])) if "timing-log" in node else client.state_dir / TIMING_LOG
        _log_timing(path, {
            "round": ins.global_round, "phase": ins.phase, "task": ins.task, "where": where,
            "pid": os.getpid(), "compute_s": round(t2 - t1, 4), "handle_s": round(t2 - t0, 4),
            "end": round(time.time(), 3)})
    return reply


def _log_timing(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per message; O_APPEND keeps lines whole
        f.write(json.dumps(row) + "\n")
