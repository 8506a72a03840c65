"""Bench: seconds per deployment round beyond the clients' compute, without and with node workers.

Runs the real local deployment (``deploy.launcher``: SuperLink with TLS and node auth, N
SuperNodes with subprocess isolation, registry, inference services; ``flwr run``) twice on the
same short stream, in one process and one machine state:

* ``subprocess`` — ``--no-workers``: Flower starts a fresh ClientApp process for every message,
  which imports torch, loads the base model and reads the node's data each time;
* ``worker`` — the default: each node's long-lived worker (edge/worker.py) keeps them in memory
  and the ClientApp only forwards.

Per exchange (a probe/training round's send-and-receive, and an evaluation round's), the cloud
records the wall seconds it took (``rounds[].exchange_s`` / ``evaluate_exchange_s`` in
server_result.json and metrics.json, measured in cloud/downlink.py); every node logs the
seconds of its local work per message (``app.timing-log``: ``<state>/timing.jsonl``,
edge/handler.py). Overhead of an exchange = its wall seconds − the slowest node's local work
in it; overhead of a server round = the sum over its exchanges. Writes JSON: per mode
{"rounds", "overhead_s_mean", "overhead_s_max", "first_round_overhead_s", "exchange_s_mean",
"compute_s_mean", "wall_s", "per_round": [...]}, and "speedup" (overhead without / with
workers). Target: mean overhead with workers ≤ 3 s per round.

    .venv/bin/python bench/deploy_round.py --out runs/bench/deploy_round.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import finish  # noqa: E402

# A short stream on the default model: two tasks (vision, audio), a briefly pretrained base
# (cached), little local work per round, so the overhead is not lost in the compute.
SCENARIO: dict[str, Any] = {
    "data.tasks": "color,beats", "data.train-per-task": 300, "data.test-per-task": 100,
    "data.pretrain-size": 4000, "data.pretrain-heldout": 160, "pretrain.steps": 800,
    "pretrain.target": 0.0, "train.eval-batch-size": 50,
    "federation.dirichlet-alpha": 100.0, "federation.no-audio-fraction": 0.0,
    "federation.rounds-per-task": 2, "federation.local-epochs": 1.0,
    "federation.local-steps": 10, "federation.router-local-epochs": 10,
    "federation.min-samples": 8, "federation.min-clients": 2, "federation.round-timeout": 120.0,
}
MODES = ("subprocess", "worker")


def node_timings(clients: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in sorted(clients.glob("client-*/_state/timing.jsonl")):
        node = f.parent.parent.name
        rows += [{**json.loads(line), "node": node} for line in f.read_text().splitlines() if line]
    return rows


def overheads(rounds: list[dict[str, Any]], timing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per server round: its exchanges' wall seconds, the slowest node's compute in each, and the
    difference (the overhead)."""
    out = []
    for r in rounds:
        row: dict[str, Any] = {"round": r["round"], "phase": r["phase"], "task": r["task"]}
        parts = [("exchange", r.get("exchange_s"), {"probe", "train"})]
        if "evaluate_exchange_s" in r:
            parts.append(("evaluate", r["evaluate_exchange_s"], {"evaluate"}))
        total = 0.0
        for name, wall, phases in parts:
            comp = [t["compute_s"] for t in timing if t["round"] == r["round"] and t["phase"] in phases]
            slowest = max(comp, default=0.0)
            row[f"{name}_s"] = wall
            row[f"{name}_compute_s"] = round(slowest, 3)
            total += float(wall or 0.0) - slowest
        row["overhead_s"] = round(total, 3)
        out.append(row)
    return out


def run_mode(mode: str, out: Path, cfg, nodes: int, timeout: float) -> dict[str, Any]:
    from deploy import launcher as L

    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    dep = L.up(out, nodes, cfg, run=False, workers=mode == "worker")
    try:
        L.submit(dep, {"app.timing-log": True})
        status = L.wait(dep, timeout=timeout)
    finally:
        L.down(out)
    wall = time.perf_counter() - t0
    metrics = out / "cloud" / "server_result.json"  # what a deployed ServerApp writes
    if not metrics.is_file():
        raise SystemExit(f"{mode}: the run wrote no server_result.json (status {status}); see {out / 'logs'}")
    m = json.loads(metrics.read_text())
    timing = node_timings(out / "run" / "clients")
    per = overheads(m["rounds"], timing)
    oh = [p["overhead_s"] for p in per]
    where = sorted({t["where"] for t in timing})
    return {"status": status, "wall_s": round(wall, 1), "rounds": len(per),
            "overhead_s_mean": round(statistics.mean(oh), 2) if oh else None,
            "overhead_s_max": round(max(oh), 2) if oh else None,
            "first_round_overhead_s": oh[0] if oh else None,
            "exchange_s_mean": round(statistics.mean(p["exchange_s"] for p in per), 2) if per else None,
            "compute_s_mean": round(statistics.mean(t["compute_s"] for t in timing), 3) if timing else None,
            "messages": len(timing), "handled_in": where,
            "avg": m.get("avg"), "last": m.get("last"), "per_round": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "deploy-round")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: subprocess,worker")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides KEY=VALUE")
    args = ap.parse_args()
    from protocol.config import parse_config

    extra = dict(kv.split("=", 1) for kv in args.set)
    cfg = parse_config({**SCENARIO, **extra})
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {bad}; use {','.join(MODES)}")
    res: dict[str, Any] = {"nodes": args.nodes, "scenario": {**SCENARIO, **extra}}
    for mode in modes:
        res[mode] = run_mode(mode, args.work / mode, cfg, args.nodes, args.timeout)
        print(f"{mode}: overhead {res[mode]['overhead_s_mean']} s/round (max "
              f"{res[mode]['overhead_s_max']}), exchange {res[mode]['exchange_s_mean']} s, "
              f"{res[mode]['wall_s']} s in all", flush=True)
    targets: dict[str, tuple[Any, str, Any]] = {}
    for mode in modes:
        targets[f"{mode}_completed"] = (res[mode]["status"], "==", "finished:completed")
    if "worker" in res:
        targets["overhead_s_per_round_with_workers"] = (res["worker"]["overhead_s_mean"], "<=", 3.0)
        targets["every_message_in_the_worker"] = (res["worker"]["handled_in"], "==", ["worker"])
    if "worker" in res and "subprocess" in res and res["worker"]["overhead_s_mean"]:
        res["speedup"] = round(res["subprocess"]["overhead_s_mean"] / res["worker"]["overhead_s_mean"], 2)
    finish(res, args.out, targets)


if __name__ == "__main__":
    main()
