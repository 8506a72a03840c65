"""Bench: methods over pretraining seeds × run seeds — the spread a user should expect.

A result on the generated stream depends on the base it starts from (the pretraining seed, and
the machine that pretrained it) and on the run's own seed (batch order, expert init, the
federated split). One run says little; this bench runs every ``--methods`` entry for
``--pretrain-seeds`` M bases × ``--seeds`` N run seeds, each as its own ``fedmole`` child
process, and writes mean / std / min / max of AVG, Last and BWT per method, the per-task final
scores, and each base's identity and held-out row:

    .venv/bin/python bench/seeds.py --out runs/bench/seeds.json \\
        [--methods seq-lora,dmole,dmole-oracle,fed-dmole-replay] [--seeds 3] [--pretrain-seeds 3] \\
        [--work runs/seeds] [--reference conf/reference.json] [--set KEY=VALUE ...]

Runs land in ``WORK/METHOD/p{M}-s{N}/`` and a finished one (its metrics.json) is not run
again, so an interrupted bench resumes where it stopped. ``--resume-from FILE.json`` (an earlier
``--out``, partial ones included, e.g. ``--no-run`` at the end of a machine's session) takes that
bench's finished runs as done, for a bench split over machines whose ``runs/`` do not carry over;
each base pretrained again here must have the weights digest recorded there, or the bench stops
(exit 2) rather than mix runs on two bases in one spread. ``--reference FILE`` also writes the
per-method intervals that ``fedmole demo`` prints beside its own result.

Targets (checked for the methods present; exit 3 when one is missed): std of AVG ≤ 2.5 for
``dmole`` and the federated D-MoLE methods; ``dmole`` ≥ ``seq-lora`` + 20 AVG and + 30 Last
(means); federated D-MoLE mean AVG ≥ ``dmole-oracle`` mean − 5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import finish  # noqa: E402
from protocol.config import ConfigError, load_config, parse_overrides  # noqa: E402


@dataclass(frozen=True)
class Method:
    """How one method of the table is run: the CLI verb, its arguments and its seed key."""

    verb: str  # "train" (centralized) or "simulate" (federated)
    args: tuple[str, ...]
    seed_keys: tuple[str, ...]  # config keys that take the run seed


_CENTRAL = ("train.seed",)
_FED = ("federation.seed", "train.seed")
METHODS: dict[str, Method] = {
    "seq-lora": Method("train", ("--method", "seq-lora"), _CENTRAL),
    "replay-lora": Method("train", ("--method", "replay-lora"), _CENTRAL),
    "joint": Method("train", ("--method", "joint"), _CENTRAL),
    "dmole": Method("train", ("--method", "dmole"), _CENTRAL),
    "dmole-replay": Method("train", ("--method", "dmole", "--replay"), _CENTRAL),
    "dmole-oracle": Method("train", ("--method", "dmole", "--set", "dmole.router=oracle"), _CENTRAL),
    "fed-dmole-replay": Method("simulate", ("--method", "dmole-replay"), _FED),
    "fed-dmole": Method("simulate", ("--method", "dmole"), _FED),
    # The federated run with the true task as its route: the gap to fed-dmole-replay is the
    # federated router's cost, the gap to dmole-oracle is what federated training costs.
    "fed-dmole-replay-oracle": Method("simulate", ("--method", "dmole-replay", "--set",
                                                   "dmole.router=oracle"), _FED),
    "fed-seq-lora": Method("simulate", ("--method", "fedavg-seq-lora"), _FED),
    "fed-replay-lora": Method("simulate", ("--method", "fedavg-replay-lora"), _FED),
}
FEDERATED_DMOLE = ("fed-dmole-replay", "fed-dmole")  # the methods the bars are on
ROUTERLESS = ("seq-lora", "replay-lora", "joint")  # centralized methods without a router
FIGURES = ("avg", "last", "bwt")
# (method, reference) pairs whose per-task gap the bench reports when both ran.
GAPS = (("fed-dmole-replay", "dmole-oracle"), ("fed-dmole", "dmole-oracle"),
        ("fed-dmole-replay", "fed-dmole-replay-oracle"), ("fed-dmole", "fed-dmole-replay-oracle"),
        ("fed-dmole-replay-oracle", "dmole-oracle"))


def run_dir(work: Path, method: str, pseed: int, seed: int) -> Path:
    return work / method / f"p{pseed}-s{seed}"


def command(method: str, out: Path, pseed: int, seed: int, config: Path | None,
            sets: Sequence[str]) -> list[str]:
    m = METHODS[method]
    cmd = [str(Path(sys.executable).parent / "fedmole"), m.verb, *m.args, "--out", str(out), "--quiet"]
    if config is not None:
        cmd += ["--config", str(config)]
    # The run's folder is named after its seeds: user --set values come first and the seeds last,
    # so the folder never lies about what ran in it.
    for kv in (*sets, f"pretrain.seed={pseed}", *(f"{k}={seed}" for k in m.seed_keys)):
        cmd += ["--set", kv]
    return cmd


def spread(values: Sequence[float]) -> dict[str, float | int]:
    vals = [float(v) for v in values]
    return {"n": len(vals), "mean": round(statistics.fmean(vals), 2),
            "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0,
            "min": round(min(vals), 2), "max": round(max(vals), 2)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: spread of AVG/Last/BWT over all runs, per base, and of each task's final score."""
    out: dict[str, Any] = {}
    for method, rows in runs.items():
        if not rows:
            continue
        entry: dict[str, Any] = {fig: spread([r[fig] for r in rows]) for fig in FIGURES}
        tasks = rows[0]["tasks"]
        entry["final_per_task"] = {t: spread([r["final"][i] for r in rows if r["final"][i] is not None])
                                   for i, t in enumerate(tasks)
                                   if any(r["final"][i] is not None for r in rows)}
        # Each task's accuracy right after its own training (the matrix diagonal): plasticity.
        entry["diag_per_task"] = {t: spread([r["diag"][i] for r in rows])
                                  for i, t in enumerate(tasks) if all(r.get("diag") for r in rows)}
        by_base: dict[int, list[float]] = {}
        for r in rows:
            by_base.setdefault(r["pretrain_seed"], []).append(r["avg"])
        entry["avg_by_base"] = {str(p): spread(v) for p, v in sorted(by_base.items())}
        routed = [r["router"] for r in rows if r.get("router") is not None]
        if routed:
            entry["router_accuracy"] = spread(routed)
        walls = [r["wall_s"] for r in rows if r.get("wall_s") is not None]
        if walls:
            entry["wall_s"] = spread(walls)
        entry["runs"] = [{k: r.get(k) for k in ("pretrain_seed", "seed", "avg", "last", "bwt",
                                                "router", "dir")} for r in rows]
        out[method] = entry
    return out


def gap(summary: dict[str, Any], method: str, ref: str) -> dict[str, Any] | None:
    """Where ``method`` loses points against ``ref``, per task (means over runs): ``learn`` is
    the difference right after the task's own training (under-trained experts), ``keep`` the
    difference in what was lost since (router misses, interference), ``final`` their sum."""
    if method not in summary or ref not in summary:
        return None
    a, b = summary[method], summary[ref]
    out: dict[str, Any] = {}
    for t in a.get("diag_per_task", {}):
        if t not in b.get("diag_per_task", {}) or t not in a["final_per_task"]:
            continue
        learn = a["diag_per_task"][t]["mean"] - b["diag_per_task"][t]["mean"]
        final = a["final_per_task"][t]["mean"] - b["final_per_task"][t]["mean"]
        out[t] = {"learn": round(learn, 2), "keep": round(final - learn, 2),
                  "final": round(final, 2)}
    return out


def targets(summary: dict[str, Any]) -> dict[str, tuple[Any, str, Any]]:
    t: dict[str, tuple[Any, str, Any]] = {}
    for m in ("dmole", *FEDERATED_DMOLE):
        if m in summary and summary[m]["avg"]["n"] > 1:
            t[f"{m}_avg_std"] = (summary[m]["avg"]["std"], "<=", 2.5)
    if "dmole" in summary and "seq-lora" in summary:
        d, s = summary["dmole"], summary["seq-lora"]
        t["dmole_minus_seq_lora_avg"] = (round(d["avg"]["mean"] - s["avg"]["mean"], 2), ">=", 20.0)
        t["dmole_minus_seq_lora_last"] = (round(d["last"]["mean"] - s["last"]["mean"], 2), ">=", 30.0)
    if "dmole-oracle" in summary:
        for m in FEDERATED_DMOLE:
            if m in summary:
                gap = summary[m]["avg"]["mean"] - summary["dmole-oracle"]["avg"]["mean"]
                t[f"{m}_minus_oracle_avg"] = (round(gap, 2), ">=", -5.0)
    return t


def reference(summary: dict[str, Any], seeds: int, pseeds: int, bases: dict[str, Any]) -> dict:
    """What `fedmole demo` reads: per method label, the interval of AVG/Last/BWT."""
    # A plain federated run's metrics.json names its method "fed-<federation.method>"; a variant
    # (extra --set) keeps the bench's name so that it never shadows the plain one.
    label = {m: ("fed-" + METHODS[m].args[1])
             if METHODS[m].verb == "simulate" and len(METHODS[m].args) == 2 else m for m in summary}
    return {"source": "bench/seeds.py", "seeds": seeds, "pretrain_seeds": pseeds,
            "bases": {p: {k: b.get(k) for k in ("weights_sha256", "heldout", "machine")}
                      for p, b in bases.items()},
            "methods": {label[m]: {fig: summary[m][fig] for fig in FIGURES} for m in summary}}


def _stop(msg: str) -> NoReturn:
    """Bad input (not a bug): say what and exit 2."""
    print(f"seeds.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _set_keys(sets: Sequence[str]) -> dict[str, str]:
    """``--set`` entries as key → value (the last one wins, as in the CLI)."""
    return {k.strip(): v.strip() for k, _, v in (kv.partition("=") for kv in sets)}


def _imported(path: Path | None, config: str, sets: list[str], coactivation_off: bool = False
              ) -> tuple[dict[tuple[str, int, int], dict[str, Any]], dict[str, Any]]:
    """An earlier bench's finished runs, by (method, pretraining seed, run seed), and its bases;
    only from a bench of the same ``--config`` and ``--set`` (or its runs measure another thing).
    Where the two ``--set`` differ only in ``federation.*`` keys, which a centralized run never
    reads, its centralized runs are taken and its federated ones are not. Where they also differ
    in the autoencoder router's keys (``dmole.router-*``), only the centralized runs that route
    without it are taken: the baselines, and the oracle-routed ones when ``coactivation_off``
    (with co-activation on, τ also picks each task's partner, which trains with it)."""
    if path is None:
        return {}, {}
    try:
        prev = json.loads(path.read_text())
        rows = {(m, int(r["pretrain_seed"]), int(r["seed"])): {**r, "imported_from": str(path)}
                for m, rs in prev["records"].items() for r in rs}
        bases = dict(prev["bases"])
        mine, theirs = _set_keys(sets), _set_keys(prev["set"])
        differ = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
        same = prev["config"] == config and not differ
        router = {k for k in differ if k.startswith("dmole.router-")}
        central_only = prev["config"] == config and bool(differ) and all(
            k.startswith("federation.") or k in router for k in differ)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        _stop(f"--resume-from {path}: not a bench/seeds.py result with per-run records "
              f"({type(e).__name__}: {e}); give the --out of a run of this bench")
    if central_only:
        unrouted = ROUTERLESS + (("dmole-oracle",) if coactivation_off else ())
        rows = {k: r for k, r in rows.items()
                if k[0] in METHODS and METHODS[k[0]].verb == "train"
                and (not router or k[0] in unrouted)}
        taken = "its centralized runs" if not router else f"its {', '.join(unrouted)} runs"
        print(f"seeds.py: --resume-from {path} differs in {sorted(differ)} only: {taken} are "
              "taken, the others run again", file=sys.stderr)
    elif not same:
        _stop(f"--resume-from {path}: its runs were made with --config {prev['config']} --set "
              f"{prev['set']}, this bench has --config {config} --set {sets}; give the same "
              "(only federation.* and dmole.router-* keys may differ: the centralized runs "
              "that do not read them are then taken)")
    missing = sorted({str(p) for _, p, _ in rows} - set(bases))
    if missing:
        _stop(f"--resume-from {path}: runs on bases {missing} but no digest of them")
    return rows, bases


def _same_base(known: dict[str, Any], pseed: int, base: dict[str, Any], path: Path | None) -> None:
    """Stop (exit 2) when a base pretrained here is not the one the imported runs were made on:
    a spread over two different bases of one seed is not the spread this bench reports."""
    want = (known.get(str(pseed)) or {}).get("weights_sha256")
    got = base.get("weights_sha256")
    if want and got != want:
        _stop(f"the base of pretraining seed {pseed} here has weights {str(got)[:12]}…, the runs "
              f"imported from {path} were made on {want[:12]}… (another machine's kernels or "
              "threads: README, 'The base'); rerun those runs here instead of --resume-from")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="seq-lora,dmole,dmole-oracle,fed-dmole-replay",
                    help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=3, help="run seeds per base (N)")
    ap.add_argument("--pretrain-seeds", type=int, default=3, help="pretraining seeds (M)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "seeds")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reference", type=Path, default=None,
                    help="also write the intervals `fedmole demo` prints (e.g. conf/reference.json)")
    ap.add_argument("--no-run", action="store_true",
                    help="run nothing: summarize the finished runs under --work (a partial bench)")
    ap.add_argument("--resume-from", type=Path, default=None, metavar="FILE.json",
                    help="an earlier bench's --out: its finished runs are taken as done")
    ap.add_argument("--order", choices=("base-first", "seed-first"), default="seed-first",
                    help="seed-first: every method and base at seed 0 before any at seed 1, so a "
                         "partial bench already spans the bases")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods {unknown} unknown; known: {', '.join(METHODS)}")
    if args.seeds < 1 or args.pretrain_seeds < 1:
        ap.error("--seeds and --pretrain-seeds must be >= 1")

    grid = [(p, s) for s in range(args.seeds) for p in range(args.pretrain_seeds)]
    if args.order == "base-first":
        grid.sort()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    bases: dict[str, Any] = {}
    failed: list[str] = []
    config_label = str(args.config) if args.config else "built-in defaults"
    try:  # parsed once here too: a bad key stops the bench before any run
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as e:
        _stop(f"--config / --set: {e}")
    imported, known_bases = _imported(args.resume_from, config_label, args.set,
                                      coactivation_off=cfg.dmole.coactivate_share == 0)
    t0 = time.perf_counter()
    for pseed, seed in grid:
        for method in methods:
            out = run_dir(args.work, method, pseed, seed)
            mp = out / "metrics.json"
            if not mp.is_file() and (method, pseed, seed) in imported:
                runs[method].append(imported[method, pseed, seed])
                bases.setdefault(str(pseed), known_bases[str(pseed)])
                continue
            if not mp.is_file() and args.no_run:
                failed.append(f"{method} p{pseed} s{seed} (not run: --no-run)")
                continue
            if not mp.is_file():
                cmd = command(method, out, pseed, seed, args.config, args.set)
                print(f"[{time.perf_counter() - t0:7.0f} s] {method} pretrain-seed {pseed} seed {seed}",
                      flush=True)
                rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
                if rc != 0 or not mp.is_file():
                    failed.append(f"{method} p{pseed} s{seed} (exit {rc})")
                    continue
            m = json.loads(mp.read_text())
            final = m["acc_matrix"][-1]
            router = (m.get("dmole") or {}).get("router_accuracy")
            diag = [m["acc_matrix"][i][i] for i in range(len(m["tasks"]))]
            runs[method].append({"pretrain_seed": pseed, "seed": seed, "dir": str(out),
                                 "tasks": m["tasks"], "final": final, "diag": diag,
                                 "router": router,
                                 "wall_s": m.get("wall_s"), **{fig: m[fig] for fig in FIGURES}})
            if "base" in m:
                _same_base(known_bases, pseed, m["base"], args.resume_from)
                bases.setdefault(str(pseed), m["base"])
    summary = summarize(runs)
    res: dict[str, Any] = {
        "methods": methods, "seeds": args.seeds, "pretrain_seeds": args.pretrain_seeds,
        "config": config_label, "set": args.set,
        "wall_s": round(time.perf_counter() - t0, 1), "failed": failed,
        "bases": {p: {k: b.get(k) for k in ("weights_sha256", "steps", "heldout", "zero_shot",
                                            "target_met", "machine")} for p, b in bases.items()},
        "summary": summary,
        # every run's row as summarize() reads it: what --resume-from takes up on another machine
        "records": runs,
    }
    gaps = {f"{m}_vs_{r}": g for m, r in GAPS if (g := gap(summary, m, r)) is not None}
    if gaps:
        res["gap_per_task"] = gaps
    held = [b["heldout"] for b in bases.values() if b.get("heldout")]
    if len(held) > 1:
        res["heldout_range_by_template"] = {
            t: round(max(h[t] for h in held) - min(h[t] for h in held), 2) for t in held[0]}
    if args.reference is not None:
        args.reference.parent.mkdir(parents=True, exist_ok=True)
        args.reference.write_text(json.dumps(reference(summary, args.seeds, args.pretrain_seeds, bases),
                                             indent=2) + "\n")
    for method, e in summary.items():
        print(f"{method:18s} AVG {e['avg']['mean']:5.1f} ± {e['avg']['std']:4.1f}  "
              f"Last {e['last']['mean']:5.1f} ± {e['last']['std']:4.1f}  "
              f"BWT {e['bwt']['mean']:+5.1f} ± {e['bwt']['std']:4.1f}  (n={e['avg']['n']})")
    checks = targets(summary)
    checks["runs_failed"] = (len(failed), "<=", 0)
    finish(res, args.out, checks)


if __name__ == "__main__":
    main()
