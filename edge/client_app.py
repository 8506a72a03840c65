"""FedMoLE's Flower ClientApp: hand the round's message to :func:`edge.handler.handle`, reply.

With node config ``worker`` (a Unix socket path), the message goes to the node's long-lived
worker (:mod:`edge.worker`), which keeps the model and the data in memory between messages;
this module then imports neither torch nor the model, so the process Flower starts for each
message is cheap. A worker that is not (yet) there, or that died, costs speed, not the round:
the message is handled here, with a warning. Without ``worker``, it is handled here.

Where the data and the node's state live: :mod:`edge.handler`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from protocol.wire_pack import pack_record, unpack_record

log = logging.getLogger("fedmole.client")


def _handle(msg: Message, context: Context, run_config: dict[str, Any] | None = None) -> Message:
    node = dict(context.node_config)
    rc = dict(run_config if run_config is not None else context.run_config)
    # The cloud packs each ArrayRecord into one wire object (protocol.wire_pack); so do replies.
    content = unpack_record(msg.content)
    if "worker" in node:
        from edge.worker import WorkerUnavailable, forward

        try:
            reply = forward(Path(str(node["worker"])), content, node, rc)
            return Message(content=pack_record(reply), reply_to=msg)
        except WorkerUnavailable as e:
            log.warning("%s; handling the message in the ClientApp process instead", e)
    from edge.handler import handle

    return Message(content=pack_record(handle(content, node, rc)), reply_to=msg)


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
