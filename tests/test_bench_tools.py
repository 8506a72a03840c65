"""The benches' shared ending (targets → JSON + exit status), the seeds bench and the reference
intervals `fedmole demo` prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import seeds
from bench.targets import MISSED, check, finish
from simulation.reference import compare_lines, interval

ROOT = Path(__file__).resolve().parents[1]


def test_check_marks_missing_values_as_missed():
    t = check({"a": (0.995, ">=", 0.99), "b": (None, ">=", 1), "c": (float("nan"), "<=", 1),
               "d": (3, "<=", 2), "e": (0, "==", 0)})
    assert {k: v["met"] for k, v in t.items()} == {"a": True, "b": False, "c": False, "d": False,
                                                  "e": True}
    with pytest.raises(ValueError, match="op must be one of"):
        check({"x": (1, ">", 0)})


def test_finish_writes_targets_and_exits_3_on_a_miss(tmp_path, capsys):
    out = tmp_path / "b.json"
    finish({"x": 1.0}, out, {"x": (1.0, ">=", 0.5)})  # met: returns, no exit
    assert json.loads(out.read_text())["ok"] is True
    with pytest.raises(SystemExit) as e:
        finish({"x": 0.1}, out, {"x": (0.1, ">=", 0.5)})
    assert e.value.code == MISSED
    written = json.loads(out.read_text())
    assert written["ok"] is False and written["targets"]["x"] == {"value": 0.1, "op": ">=",
                                                                  "bound": 0.5, "met": False}
    assert "missed x" in capsys.readouterr().err


def _run(p: int, s: int, avg: float, last: float, bwt: float) -> dict:
    return {"pretrain_seed": p, "seed": s, "avg": avg, "last": last, "bwt": bwt, "dir": f"p{p}-s{s}",
            "tasks": ["a", "b"], "final": [last, None if s else last], "diag": [avg, avg]}


def test_seeds_summary_and_the_issue_bars():
    runs = {"seq-lora": [_run(0, 0, 15, 5, -40), _run(1, 0, 17, 7, -36)],
            "dmole": [_run(0, 0, 50, 45, 0), _run(1, 0, 54, 47, -1)],
            "dmole-oracle": [_run(0, 0, 55, 50, 0), _run(1, 0, 57, 52, 0)],
            "fed-dmole-replay": [_run(0, 0, 48, 44, -1), _run(1, 0, 56, 50, 0)]}
    summary = seeds.summarize(runs)
    d = summary["dmole"]
    assert d["avg"] == {"n": 2, "mean": 52.0, "std": 2.83, "min": 50.0, "max": 54.0}
    assert d["avg_by_base"]["1"]["mean"] == 54.0
    assert d["final_per_task"]["b"]["n"] == 2 and d["final_per_task"]["a"]["mean"] == 46.0
    t = {k: check({k: v})[k]["met"] for k, v in seeds.targets(summary).items()}
    assert t == {"dmole_avg_std": False,  # 2.83 > 2.5
                 "fed-dmole-replay_avg_std": False,  # 5.66
                 "dmole_minus_seq_lora_avg": True,  # 36
                 "dmole_minus_seq_lora_last": True,  # 40
                 "fed-dmole-replay_minus_oracle_avg": True}  # -4
    ref = seeds.reference(summary, 1, 2, {})
    assert set(ref["methods"]) == {"seq-lora", "dmole", "dmole-oracle", "fed-dmole-replay"}


def test_resume_from_takes_only_the_runs_the_changed_keys_do_not_reach(tmp_path, capsys):
    """--resume-from across a --set that differs in federation.* keys takes every centralized
    run; in dmole.router-* keys too, only those that never read the autoencoder router."""
    sets = ["pretrain.seed=0", "federation.local-steps=43"]
    records = {m: [_run(0, 0, 50, 40, 0)] for m in ("seq-lora", "dmole", "dmole-oracle",
                                                    "fed-dmole-replay")}
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"config": "built-in defaults", "set": sets, "records": records,
                                "bases": {"0": {"weights_sha256": "ab"}}}))

    def taken(new_sets, off=False):
        rows, _ = seeds._imported(prev, "built-in defaults", new_sets, coactivation_off=off)
        return sorted({m for m, _, _ in rows})

    assert taken(sets) == ["dmole", "dmole-oracle", "fed-dmole-replay", "seq-lora"]
    assert taken([*sets, "federation.fraction=0.5"]) == ["dmole", "dmole-oracle", "seq-lora"]
    router = [*sets, "federation.fraction=0.5", "dmole.router-quantile=0.99"]
    assert taken(router) == ["seq-lora"]  # τ picks co-activation partners: oracle runs too
    assert taken(router, off=True) == ["dmole-oracle", "seq-lora"]
    assert "seq-lora, replay-lora, joint, dmole-oracle runs are taken" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # another key: nothing can be taken
        taken([*sets, "train.lr=1e-3"])
    assert "dmole.router-* keys may differ" in capsys.readouterr().err


def test_seeds_gap_splits_the_loss_into_learning_and_keeping():
    runs = {"dmole-oracle": [_run(0, 0, 60, 50, 0)], "fed-dmole-replay": [_run(0, 0, 52, 40, 0)],
            "fed-dmole-replay-oracle": [_run(0, 0, 55, 48, 0)]}
    summary = seeds.summarize(runs)
    # task a: learnt 8 points worse (52 vs 60 right after training), ended 10 worse (40 vs 50).
    assert seeds.gap(summary, "fed-dmole-replay", "dmole-oracle")["a"] == {
        "learn": -8.0, "keep": -2.0, "final": -10.0}
    assert seeds.gap(summary, "fed-dmole", "dmole-oracle") is None
    # The oracle variant keeps its own name in the reference: it must not shadow the plain run.
    ref = seeds.reference(summary, 1, 1, {})
    assert set(ref["methods"]) == {"dmole-oracle", "fed-dmole-replay", "fed-dmole-replay-oracle"}


def test_seeds_command_names_the_seeds_last_so_the_folder_is_true():
    cmd = seeds.command("fed-dmole-replay", Path("o"), 2, 1, None, ["federation.seed=7"])
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets == ["federation.seed=7", "pretrain.seed=2", "federation.seed=1", "train.seed=1"]
    assert cmd[1:4] == ["simulate", "--method", "dmole-replay"]


def test_reference_lines_say_plainly_when_a_run_is_outside():
    ref = {"seeds": 3, "pretrain_seeds": 3, "methods": {"fed-dmole-replay": {
        "avg": {"n": 9, "mean": 45.0, "std": 2.0, "min": 42.0, "max": 47.5},
        "last": {"n": 9, "mean": 40.0, "std": 1.0, "min": 39.0, "max": 41.0},
        "bwt": {"n": 9, "mean": -0.5, "std": 0.4, "min": -1.2, "max": 0.0}}}}
    assert interval(ref["methods"]["fed-dmole-replay"]["avg"]) == (41.0, 49.0)
    inside = compare_lines({"method": "fed-dmole-replay", "avg": 44.0, "last": 40.5, "bwt": -0.2},
                           ref, default_config=True)
    assert "OUTSIDE" not in "\n".join(inside) and inside[1].strip().startswith("AVG")
    out = compare_lines({"method": "fed-dmole-replay", "avg": 34.3, "last": 39.8, "bwt": -0.4},
                        ref, default_config=True)
    text = "\n".join(out)
    assert "AVG    34.3" in text and "OUTSIDE" in text and "fell outside the reference interval" in text
    other = compare_lines({"method": "fed-dmole", "avg": 1.0}, ref, default_config=True)
    assert "no reference interval" in other[0]


@pytest.mark.slow
def test_seeds_bench_runs_resumes_and_writes_spreads(tmp_path):
    out, work = tmp_path / "seeds.json", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "seeds.py"), "--out", str(out), "--work", str(work),
           "--methods", "seq-lora", "--seeds", "2", "--pretrain-seeds", "1",
           "--config", str(ROOT / "conf" / "tiny.toml"), "--set", f"data.cache-dir={tmp_path / 'cache'}",
           "--reference", str(tmp_path / "ref.json")]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["summary"]["seq-lora"]["avg"]["n"] == 2
    assert {r["seed"] for r in res["summary"]["seq-lora"]["runs"]} == {0, 1}
    assert res["bases"]["0"]["weights_sha256"]
    seeds_seen = {json.loads((work / "seq-lora" / f"p0-s{s}" / "metrics.json").read_text())
                  ["config"]["train.seed"] for s in (0, 1)}
    assert seeds_seen == {0, 1}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "pretrain-seed" not in again.stdout  # nothing re-run
    assert json.loads((tmp_path / "ref.json").read_text())["methods"]["seq-lora"]["avg"]["n"] == 2

    # Another machine (a fresh --work): the runs come from the JSON, nothing is run again ...
    moved = [*cmd[:cmd.index("--work") + 1], str(tmp_path / "work2"), *cmd[cmd.index("--work") + 2:]]
    resumed = subprocess.run([*moved, "--resume-from", str(out), "--out", str(tmp_path / "r.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "pretrain-seed" not in resumed.stdout, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == res["summary"]
    # ... and a run it does make, on a base whose digest is not the recorded one, stops the bench
    res["bases"]["0"]["weights_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(res))
    i = moved.index("--seeds")
    third = [*moved[:i + 1], "3", *moved[i + 2:], "--resume-from", str(tmp_path / "other.json")]
    mixed = subprocess.run(third, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 2 and "were made on 000000000000" in mixed.stderr, mixed.stderr[-2000:]
    # and a JSON of other settings is refused before anything runs
    other = subprocess.run([*moved, "--set", "train.lr=1e-3", "--resume-from", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "give the same" in other.stderr, other.stderr[-2000:]
    # but one that differs in federation.* keys only gives its centralized runs (nothing re-run)
    fed_only = subprocess.run([*moved, "--set", "federation.rounds-per-task=12", "--resume-from",
                               str(out), "--out", str(tmp_path / "f.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fed_only.returncode == 0 and "pretrain-seed" not in fed_only.stdout, fed_only.stderr[-2000:]
    assert "differs in ['federation.rounds-per-task'] only" in fed_only.stderr
    assert json.loads((tmp_path / "f.json").read_text())["summary"] == res["summary"]


@pytest.mark.slow
def test_router_fit_bench_compares_the_federated_and_centralized_fits(tmp_path):
    out = tmp_path / "router.json"
    cmd = [sys.executable, str(ROOT / "bench" / "router_fit.py"), "--out", str(out),
           "--config", str(ROOT / "conf" / "tiny.toml"), "--set", f"data.cache-dir={tmp_path / 'cache'}",
           "--fits", "2x10", "--quantiles", "0.99"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 3), run.stdout[-2000:] + run.stderr[-3000:]  # 3: a missed target
    res = json.loads(out.read_text())
    names = [v["name"] for v in res["variants"]]
    assert names == ["central@0.95", "fed 1x300@0.95", "fed 2x10@0.95",
                     "central@0.99", "fed 1x300@0.99", "fed 2x10@0.99"]
    by = {v["name"]: v for v in res["variants"]}
    assert by["central@0.95"]["accuracy"] >= 90  # the tiny stream's tasks are told apart
    for v in res["variants"]:  # every test sample is routed right, to the base, or wrong
        assert v["accuracy"] + v["to_base"] + v["misrouted"] == pytest.approx(100, abs=0.05)
        assert set(v["per_task"]) == set(res["test_samples"])
    # a higher quantile admits more: never more samples sent to the base model
    assert by["central@0.99"]["to_base"] <= by["central@0.95"]["to_base"]
    assert res["gap_to_central"] == pytest.approx(
        by["central@0.95"]["accuracy"] - by["fed 1x300@0.95"]["accuracy"], abs=0.01)
    assert res["ok"] == (res["gap_to_central"] <= 2.0) and run.returncode == (0 if res["ok"] else 3)
