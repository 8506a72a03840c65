"""Bench: a federated run of many clients (--clients, 100 by default) at 10% per round, whole stream.

Runs ``fedmole simulate`` (Flower's simulation engine, Ray backend, the default model and
stream) with ``federation.clients = 100`` and ``federation.fraction = 0.1`` in a child process,
and samples the resident memory of the whole process tree (the CLI, Ray's raylet/GCS and its
ClientApp actors) every 0.5 s from /proc. Records wall time, peak tree RSS, and the run's own
figures (AVG, Last, BWT, bytes up per client round).

Writes JSON: {"clients", "fraction", "wall_s", "peak_tree_rss_mb", "avg", "last", "bwt",
"bytes_up_per_client_round", "rounds", "server_s_per_round_mean", "server_s_per_round_max",
"ok"} (the server's seconds per round: between two rounds, what is not the clients' exchange).

    .venv/bin/python bench/simulation_scale.py --out runs/bench/simulation_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import finish  # noqa: E402


def tree_rss_mb(root: int) -> float:
    """Resident MB of ``root`` and all its descendants now."""
    from deploy.launcher import descendants

    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in [root, *descendants(root)]:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total / 2**20


def server_seconds(rounds: list[dict]) -> list[float]:
    """The cloud's own seconds per server round (sampling, packing, validation, aggregation,
    allocation, checkpoint): the time between two rounds' records minus the exchanges in
    between, which are the clients' (cloud/downlink.py measures them)."""
    out = []
    for prev, cur in zip(rounds, rounds[1:], strict=False):
        if "exchange_s" not in cur:
            continue
        gap = cur["time"] - prev["time"] - cur["exchange_s"] - prev.get("evaluate_exchange_s", 0.0)
        out.append(max(0.0, gap))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench" / "fed-100")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides KEY=VALUE")
    args = ap.parse_args()
    cmd = [str(Path(sys.executable).parent / "fedmole"), "simulate", "--quiet", "--out", str(args.run_dir),
           "--set", f"federation.clients={args.clients}", "--set", f"federation.fraction={args.fraction}",
           *[x for kv in args.set for x in ("--set", kv)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    result = {"clients": args.clients, "fraction": args.fraction, "wall_s": round(wall, 1),
              "peak_tree_rss_mb": round(peak, 1), "returncode": rc,
              "command": " ".join(cmd)}
    metrics = args.run_dir / "metrics.json"
    if rc == 0 and metrics.is_file():
        m = json.loads(metrics.read_text())
        result.update({k: m[k] for k in ("avg", "last", "bwt")})
        result["bytes_up_per_client_round"] = m["comm"]["bytes_up_per_client_round"]
        result["rounds"] = len(m["rounds"])
        server = server_seconds(m["rounds"])
        if server:
            result["server_s_per_round_mean"] = round(sum(server) / len(server), 3)
            result["server_s_per_round_max"] = round(max(server), 3)
    finish(result, args.out, {"returncode": (rc, "==", 0),
                              "rounds": (result.get("rounds"), ">=", 1)})


if __name__ == "__main__":
    main()
