"""End-to-end: the centralized continual runner and the CLI on the tiny stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.config import parse_config
from simulation.centralized import run_centralized

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {"method", "tasks", "acc_matrix", "avg", "last", "bwt", "forgetting", "bytes_up",
            "bytes_down", "wall_s", "config"}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_cfg):
    cache = tmp_path_factory.mktemp("cache")
    return parse_config({"data.cache-dir": str(cache)}, base=tiny_cfg)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["seq-lora", "replay-lora", "joint"])
def test_each_method_writes_the_contract_outputs(cfg, method, tmp_path):
    out = tmp_path / method
    m = run_centralized(cfg, method, out, progress=False)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert CONTRACT <= set(on_disk)
    assert on_disk["method"] == method and on_disk["tasks"] == list(cfg.data.tasks)
    t = len(cfg.data.tasks)
    assert len(on_disk["acc_matrix"]) == t and all(len(r) == t for r in on_disk["acc_matrix"])
    assert on_disk["avg"] == pytest.approx(m["avg"])
    assert len(on_disk["zero_shot"]) == t
    assert (out / "accuracy_matrix.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "zero-shot" in report.lower()
    # One PEFT adapter folder per task.
    folders = sorted((out / "experts").iterdir())
    assert len(folders) == t
    for f in folders:
        assert (f / "shared" / "adapter_config.json").is_file()
        assert (f / "shared" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_base_is_pretrained_once_and_cached(cfg, tmp_path):
    from simulation.base import ensure_base
    from simulation.benchmark import ensure_benchmark

    root = ensure_benchmark(cfg.data)
    a = ensure_base(cfg, root, progress=False)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    b = ensure_base(cfg, root, progress=False)
    assert a == b and (b / "model.safetensors").stat().st_mtime_ns == mtime
    info = json.loads((a / "fedmole_base.json").read_text())
    assert info["final_loss"] < info["first_loss"]  # the base learned something


@pytest.mark.slow
def test_the_base_does_not_depend_on_the_callers_thread_count(cfg):
    """pretrain.threads pins torch's threads while pretraining: a bench that runs with one
    thread and a demo with two get the same base under the same key (and the caller's own
    setting is restored)."""
    import torch

    from simulation.base import pretrain_base
    from simulation.benchmark import ensure_benchmark

    root = ensure_benchmark(cfg.data)
    before = torch.get_num_threads()
    weights, infos = [], []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            model, _, info = pretrain_base(cfg, root, progress=False)
            assert torch.get_num_threads() == threads  # restored
            weights.append({k: v.clone() for k, v in model.state_dict().items()})
            infos.append(info)
    finally:
        torch.set_num_threads(before)
    assert all(i["machine"]["threads"] == cfg.pretrain.threads for i in infos)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "fedmole_cli.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_train_runs_and_bad_input_exits_2(cfg, tmp_path):
    conf = str(ROOT / "conf" / "tiny.toml")
    cache = f"data.cache-dir={cfg.data.cache_dir}"
    ok = _cli("train", "--method", "replay-lora", "--config", conf, "--set", cache, "--quiet",
              "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "replay-lora" in ok.stdout and (tmp_path / "r" / "metrics.json").is_file()

    bad = _cli("train", "--config", conf, "--set", "replay.buffer-size=-3", "--out",
               str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2
    assert "`replay.buffer-size` must be > 0, got -3" in bad.stderr
    assert not (tmp_path / "x" / "metrics.json").exists()

    unknown = _cli("train", "--method", "ewc", "--config", conf, cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown --method 'ewc'" in unknown.stderr
