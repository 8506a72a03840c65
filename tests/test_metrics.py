"""Continual-learning metrics (simulation.metrics) and run outputs (simulation.report)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from simulation import metrics as M
from simulation.report import (
    CONTRACT_KEYS,
    comparison_table,
    load_metrics,
    write_run_outputs,
)

# a[t][i]: score on task i after training through task t (T = 3). The upper triangle holds the
# scores on tasks not trained yet (used for FWT); z is the zero-shot base model.
ACC = [
    [80.0, 20.0, 10.0],
    [88.0, 90.0, 40.0],
    [60.0, 85.0, 70.0],
]
ZERO_SHOT = [10.0, 15.0, 25.0]
# By hand:
#   Last       = (60 + 85 + 70) / 3                       = 215 / 3      = 71.6667
#   AVG        = (80 + (88 + 90) / 2 + 215 / 3) / 3       = (80 + 89 + 71.6667) / 3 = 80.2222
#   BWT        = ((60 - 80) + (85 - 90)) / 2              = (-20 - 5) / 2 = -12.5
#   Forgetting = ((max(80, 88) - 60) + (max(90) - 85)) / 2 = (28 + 5) / 2  = 16.5
#   FWT        = ((a[0][1] - z1) + (a[1][2] - z2)) / 2    = ((20 - 15) + (40 - 25)) / 2 = 10.0
EXPECTED = {
    "last": 215 / 3,
    "avg": (80 + 89 + 215 / 3) / 3,
    "bwt": -12.5,
    "forgetting": 16.5,
    "fwt": 10.0,
}


def test_metrics_by_hand() -> None:
    assert M.last(ACC) == pytest.approx(71.6667, abs=1e-4)
    assert M.avg(ACC) == pytest.approx(80.2222, abs=1e-4)
    assert M.bwt(ACC) == pytest.approx(-12.5)
    assert M.forgetting(ACC) == pytest.approx(16.5)
    assert M.fwt(ACC, ZERO_SHOT) == pytest.approx(10.0)
    assert M.summarize(np.array(ACC), ZERO_SHOT) == pytest.approx(EXPECTED)


def test_upper_triangle_optional() -> None:
    lower = [[80.0, None, None], [88.0, 90.0, math.nan], [60.0, 85.0, 70.0]]
    s = M.summarize(lower, ZERO_SHOT)
    assert {k: s[k] for k in ("avg", "last", "bwt", "forgetting")} == pytest.approx(
        {k: EXPECTED[k] for k in ("avg", "last", "bwt", "forgetting")}
    )
    assert math.isnan(s["fwt"])  # a[1][2] missing: no partial mean
    assert math.isnan(M.fwt(ACC, None))


def test_single_task() -> None:
    s = M.summarize([[55.0]], [5.0])
    assert s["last"] == s["avg"] == 55.0
    assert s["bwt"] == 0.0 and s["forgetting"] == 0.0
    assert math.isnan(s["fwt"])


@pytest.mark.parametrize(
    ("acc", "zero_shot", "match"),
    [
        ([[50.0, 1.0], [60.0]], None, r"square.*row 1 has 1"),
        ([[50.0, 1.0, 2.0]], None, r"square.*row 0 has 3"),
        ([], None, "empty"),
        ([[50.0, None], [60.0, math.nan]], None, r"acc\[1\]\[1\].*row 1, column 1"),
        ([[50.0, None], [math.inf, 40.0]], None, r"acc\[1\]\[0\]"),
        ([[50.0, None], [120.0, 40.0]], None, r"acc\[1\]\[0\] = 120\.0.*\[0, 100\]"),
        ([[50.0, -1.0], [60.0, 40.0]], None, r"acc\[0\]\[1\] = -1\.0"),
        ([[50.0, "x"], [60.0, 40.0]], None, r"acc\[0\]\[1\] must be a number"),
        (
            [[50.0, 1.0], [60.0, 40.0]],
            [1.0],
            r"zero_shot has 1 scores, expected one per task \(2\)",
        ),
        ([[50.0, 1.0], [60.0, 40.0]], [1.0, 101.0], r"zero_shot\[1\] = 101\.0"),
    ],
)
def test_validation(acc: list, zero_shot: list | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.summarize(acc, zero_shot)


@pytest.mark.parametrize(
    ("pred", "ref", "f1"),
    [
        ("red", "red", 1.0),
        ("Red  circle", "red circle", 1.0),
        ("a red circle", "red square", 0.4),  # P = 1/3, R = 1/2 → 2PR/(P+R) = 0.4
        ("3 3", "3", 2 / 3),  # multiset: one common token; P = 1/2, R = 1
        ("blue", "red", 0.0),
        ("", "", 1.0),
        ("  ", "", 1.0),
        ("", "red", 0.0),
        ("red", "", 0.0),
    ],
)
def test_token_f1(pred: str, ref: str, f1: float) -> None:
    assert M.token_f1(pred, ref) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("pred", "ref", "same"),
    [
        ("red circle", "red circle", True),
        ("  Red Circle\n", "red circle", True),
        ("red \t circle", "red circle", True),
        ("", "", True),
        ("red", "red circle", False),
        ("-3", "3", False),
        ("redcircle", "red circle", False),
    ],
)
def test_exact_match(pred: str, ref: str, same: bool) -> None:
    assert M.exact_match(pred, ref) is same


# ----------------------------------------------------------------------------- run outputs

TASKS = ["color", "count", "ground"]


def _write(tmp_path, **overrides):  # type: ignore[no-untyped-def]
    kwargs = dict(
        method="fedmole",
        tasks=TASKS,
        acc_matrix=[[80.0, 20.0, math.nan], [88.0, 90.0, 40.0], [60.0, 85.0, 70.0]],
        zero_shot=ZERO_SHOT,
        bytes_up=12_345_678,
        bytes_down=2_000_000,
        wall_s=12.5,
        config={"lora.rank": 8, "data.tasks": ("color", "count", "ground")},
        extra={
            "task_scores": {"color": {"em": 60.0, "f1": 0.71}, "ground": {"iou": 0.5}},
            "notes": ["one seed only"],
        },
    )
    kwargs.update(overrides)
    return write_run_outputs(tmp_path / "run", **kwargs)


def _reject_constant(name: str) -> None:
    raise AssertionError(f"non-strict JSON constant {name} in metrics.json")


def test_write_run_outputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    returned = _write(tmp_path)
    out = tmp_path / "run"
    for name in ("metrics.json", "accuracy_matrix.png", "report.md"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    text = (out / "metrics.json").read_text()
    m = json.loads(text, parse_constant=_reject_constant)
    assert m == returned
    assert set(CONTRACT_KEYS) | {"zero_shot", "fwt", "task_scores", "notes"} <= set(m)
    assert m["method"] == "fedmole" and m["tasks"] == TASKS
    assert m["acc_matrix"][0] == [80.0, 20.0, None]  # NaN → null
    assert m["zero_shot"] == ZERO_SHOT
    assert m["fwt"] == pytest.approx(10.0)  # needs a[0][1] and a[1][2] only, not a[0][2]
    for key in ("avg", "last", "bwt", "forgetting"):
        assert m[key] == pytest.approx(EXPECTED[key])
    assert (m["bytes_up"], m["bytes_down"], m["wall_s"]) == (12_345_678, 2_000_000, 12.5)
    assert m["config"] == {"lora.rank": 8, "data.tasks": ["color", "count", "ground"]}
    assert load_metrics(out) == m == load_metrics(out / "metrics.json")

    png = (out / "accuracy_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    report = (out / "report.md").read_text()
    assert "# Run report: fedmole" in report
    assert "![accuracy matrix](accuracy_matrix.png)" in report
    zero_row = next(line for line in report.splitlines() if line.startswith("| zero-shot"))
    assert "10.00" in zero_row and "25.00" in zero_row
    assert report.index("| zero-shot") < report.index("| after 1: color")
    assert "*40.00*" in report  # above the diagonal: shown, marked as not trained yet
    assert "12.35" in report  # MB up
    assert "## Final scores per task" in report and "0.71" in report
    assert "- one seed only" in report


def test_fwt_null_when_incomplete(tmp_path) -> None:  # type: ignore[no-untyped-def]
    acc = [[80.0, 20.0, 10.0], [88.0, 90.0, None], [60.0, 85.0, 70.0]]
    m = _write(tmp_path, acc_matrix=acc, extra=None)
    assert m["fwt"] is None and m["acc_matrix"][1][2] is None
    assert "## Notes" not in (tmp_path / "run" / "report.md").read_text()


def test_without_zero_shot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = _write(tmp_path, zero_shot=None)
    assert m["zero_shot"] is None and m["fwt"] is None
    assert "zero-shot" not in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("key", ["avg", "method", "fwt", "zero_shot"])
def test_extra_cannot_overwrite_contract(tmp_path, key: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=key):
        _write(tmp_path, extra={key: 1.0})
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"tasks": ["a", "b"]}, "tasks has 2 names"),
        ({"bytes_up": -1}, "bytes_up must be an int >= 0, got -1"),
        ({"wall_s": math.nan}, "wall_s"),
    ],
)
def test_write_run_outputs_validation(tmp_path, overrides: dict, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        _write(tmp_path, **overrides)


def test_load_metrics_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nowhere" / "metrics.json"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_metrics(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        load_metrics(bad)


def test_comparison_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = _write(tmp_path)
    b = dict(a, method="finetune", avg=41.27, bwt=-30.04, forgetting=None, bytes_up=0)
    lines = comparison_table([a, b]).splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["method", "AVG", "Last", "BWT", "Forgetting", "wall s", "MB up"]
    fed = [c.strip() for c in lines[2].strip("|").split("|")]
    assert fed == ["fedmole", "80.2", "71.7", "-12.5", "16.5", "12.5", "12.3"]
    fin = [c.strip() for c in lines[3].strip("|").split("|")]
    assert fin == ["finetune", "41.3", "71.7", "-30.0", "—", "12.5", "0.0"]
    assert len({len(line) for line in lines}) == 1  # padded: reads as plain text too
    with pytest.raises(ValueError, match="bytes_up"):
        comparison_table([{k: v for k, v in a.items() if k != "bytes_up"}])


def test_modality_arrivals_measure_what_earlier_tasks_lose():
    from simulation.metrics import modality_arrivals

    acc = [[50, 0, 0, 0], [40, 60, 0, 0], [40, 55, 70, 0], [38, 56, 60, 80]]
    mods = {"a": ["image", "text"], "b": ["text"], "c": ["audio", "text"], "d": ["audio", "text"]}
    out = modality_arrivals(["a", "b", "c", "d"], acc, mods)
    # audio arrives at c (index 2): a and b are compared with row 1 (just before) and row 3 (end).
    assert out == [{"modality": "audio", "first_task": "c", "before_step": 1,
                    "drops": {"a": 2.0, "b": 4.0}, "max_drop": 4.0}]
    assert modality_arrivals(["a", "b"], [[50, 0], [40, 60]], mods) == []  # image came first


def test_comparison_table_labels_ablations_and_adds_router_accuracy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = _write(tmp_path)
    ab = dict(a, method="dmole", label="dmole (router=none)", dmole={"router_accuracy": None})
    full = dict(a, method="dmole", dmole={"router_accuracy": 97.25})
    lines = comparison_table([full, ab, a]).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")][-1] == "router %"
    assert [c.strip() for c in lines[2].strip("|").split("|")][::7] == ["dmole", "97.2"]
    assert [c.strip() for c in lines[3].strip("|").split("|")][::7] == ["dmole (router=none)", "—"]
    assert [c.strip() for c in lines[4].strip("|").split("|")][::7] == ["fedmole", "—"]


def test_compare_command_reads_runs_and_rejects_a_missing_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from fedmole_cli import app

    _write(tmp_path / "r1")
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "r1" / "run"), "--out", str(tmp_path / "t.md")])
    assert res.exit_code == 0 and "fedmole" in res.output
    assert (tmp_path / "t.md").read_text().startswith("| method")
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "missing")])
    assert res.exit_code == 3


def test_an_unknown_task_name_is_a_usage_error_not_a_traceback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from fedmole_cli import EXIT_USAGE, app

    for cmd in (["simulate"], ["train", "--method", "dmole"]):
        res = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "run"), "--set", "data.tasks=colour",
                                       "--set", f"data.cache-dir={tmp_path / 'cache'}", "-q"])
        assert res.exit_code == EXIT_USAGE, res.output
        assert "unknown task 'colour'" in res.output and "known tasks: color" in res.output
        assert not (tmp_path / "run" / "metrics.json").exists()
