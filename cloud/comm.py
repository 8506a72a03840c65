"""Communication accounting: the bytes of every message the cloud sends and receives.

Counted per message from its payload: every array's raw bytes (as it travels: float32, fp16 or
int8 + scales), and for config/metric records the bytes of their JSON text. Array bytes are
attributed to a *part*: the modality of the expert's module (``vision``, ``language``,
``audio``), ``router`` (autoencoder weights and error histograms) or ``control`` (instructions,
scores, metrics). Flower's own framing (message ids, headers, gRPC) is not counted: the figure
is what FedMoLE chooses to send.

``client_rounds`` counts the probe/train replies that carried an update (skips and errors
excluded), so ``bytes_up_per_client_round`` = upload bytes / client_rounds is what one
participating client sends in one round on average; ``bytes_down_per_client_round`` divides
*every* byte sent down (evaluation messages and nodes without the task's data included) by the
same count. Down bytes are counted as the messages leave (cloud.downlink): after the delta.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, RecordDict

from protocol.compression import SCALE_SUFFIX


def _part(key: str, modality_of: Mapping[str, str]) -> str:
    """``<module>.lora_A[::scale]`` (reply) or ``expert/<task>/<module>.lora_A`` (sent) → modality."""
    if key.startswith("router/"):
        return "router"
    name = key.split("/", 2)[-1] if key.startswith("expert/") else key
    module = name.removesuffix(SCALE_SUFFIX).rsplit(".", 1)[0]
    return modality_of.get(module, "control")


def payload_bytes(content: RecordDict, modality_of: Mapping[str, str], router_record: str = "router"
                  ) -> dict[str, int]:
    """Bytes of one message's payload per part."""
    out: dict[str, int] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            for k in rec:
                part = "router" if name == router_record else _part(k, modality_of)
                out[part] = out.get(part, 0) + len(rec[k].data)
        else:
            out["control"] = out.get("control", 0) + len(json.dumps(dict(rec), default=str))
    return out


def new_comm(full_model_bytes_fp32: int) -> dict[str, Any]:
    return {"bytes_up": 0, "bytes_down": 0, "client_rounds": 0, "messages_down": 0,
            "full_model_bytes_fp32": int(full_model_bytes_fp32), "up": {}, "down": {}}


def add(comm: dict[str, Any], direction: str, parts: Mapping[str, int]) -> None:
    total = f"bytes_{direction}"
    for part, n in parts.items():
        comm[direction][part] = comm[direction].get(part, 0) + int(n)
        comm[total] += int(n)


def summary(comm: Mapping[str, Any]) -> dict[str, Any]:
    """The ``comm`` block of metrics.json (docs/design.md §3 + the federated issue)."""
    n = comm["client_rounds"]
    per = comm["bytes_up"] / n if n else 0.0
    down = comm["bytes_down"] / n if n else 0.0
    msgs = int(comm.get("messages_down", 0))  # absent in checkpoints older than the counter
    full = comm["full_model_bytes_fp32"]
    return {"bytes_up": comm["bytes_up"], "bytes_down": comm["bytes_down"],
            "bytes_up_per_client_round": round(per, 1),
            # every byte sent (probe, training and evaluation messages, to holders and to nodes
            # without the task's data) over the same client-rounds as the upload
            "bytes_down_per_client_round": round(down, 1),
            "down_over_up_per_client_round": round(down / per, 3) if per else None,
            "messages_down": msgs,
            "bytes_down_per_message": round(comm["bytes_down"] / msgs, 1) if msgs else None,
            "full_model_bytes_fp32": full,
            "up_per_client_round_over_full_model": round(per / full, 5) if full else None,
            "client_rounds": comm["client_rounds"],
            "per_modality": {"up": dict(comm["up"]), "down": dict(comm["down"])}}
