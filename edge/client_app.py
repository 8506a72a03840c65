"""FedMoLE's Flower ClientApp: decode the round's message, call :mod:`edge.local`, reply.

Where the client's data lives: node config ``data-dir`` (a deployed SuperNode), else
``app.clients-dir``/client-<partition-id> (a simulation's virtual node). Its persistent state
(the replay buffer, the global state received: edge.state_cache) goes to node config
``state-dir``, else ``<data-dir>/_state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from edge import local
from edge.runtime import edge_model, local_data
from protocol.app_config import split_run_config
from edge.state_cache import DIR as CACHE_DIR
from edge.state_cache import DiskGroupCache
from protocol.instructions import Instruction, unpack_state
from protocol.state_sync import MissingState, encode_need_state, fill


def _client(context: Context, run_config: dict[str, Any] | None) -> local.Client:
    cfg, appcfg = split_run_config(dict(run_config if run_config is not None else context.run_config))
    torch.set_num_threads(appcfg.client_threads)
    if not cfg.model.base_path:
        raise ValueError("run config `model.base-path` is empty: the ClientApp needs the base "
                         "checkpoint the cloud distributes (fedmole simulate sets it)")
    node = context.node_config
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
    return local.Client(cfg, local_data(data_dir, cfg.data.tasks, cfg.data.on_error), state_dir, em, attack)


def _handle(msg: Message, context: Context, run_config: dict[str, Any] | None = None) -> Message:
    client = _client(context, run_config)
    try:  # the delta-only downlink: what the cloud left out is in the node's cache
        content = fill(msg.content, DiskGroupCache(client.state_dir / CACHE_DIR))
    except MissingState as e:  # a lost or reset cache: the cloud re-sends the whole state
        return Message(content=encode_need_state(e.groups), reply_to=msg)
    ins = Instruction.from_record(content["config"])
    arrays = content["arrays"]
    if not isinstance(arrays, ArrayRecord):
        raise TypeError(f"the round's 'arrays' must be an ArrayRecord, got {type(arrays).__name__}")
    experts, routers = unpack_state(arrays)
    with client.em.lock:
        if ins.phase == "probe":
            content = local.probe(client, ins, routers)
        elif ins.phase == "train":
            content = local.train(client, ins, experts, routers)
        else:
            content = local.evaluate(client, ins, experts, routers)
    return Message(content=content, reply_to=msg)


def make_client_app(run_config: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` (flat keys) stands in for Flower's when given (run_simulation
    passes none), else each message's ``context.run_config`` is used (``flwr run``)."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return _handle(msg, context, run_config)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _handle(msg, context, run_config)

    return client


app = make_client_app()
