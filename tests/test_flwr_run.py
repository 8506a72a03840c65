"""`flwr run .`: the real Flower app (pyproject [tool.flwr.app]) as a local simulation.

A SuperLink is started here (its PID known, 127.0.0.1, free ports, FLWR_HOME in tmp, no runtime
dependency installation, no telemetry), `flwr run . --stream` sends the app to it, the run's
status is read with `flwr ls` (flwr run exits 0 even when the run fails), the ServerApp's
outputs are checked, and every process group the SuperLink spawned is stopped by PID.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from deploy.launcher import stop_pid
from protocol.app_config import AppConfig
from protocol.config import RunConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_pyproject_app_config_declares_every_key_with_its_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    expected = {**RunConfig().to_flat(), **AppConfig().to_flat()}
    expected = {k: ",".join(v) if isinstance(v, list) else v for k, v in expected.items()}
    assert declared == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_flwr_run_dot_runs_the_apps_in_a_local_simulation(tmp_path, tiny_cfg):
    from simulation.federated import prepare

    cfg = parse_config({"data.cache-dir": str(tmp_path / "cache"), "federation.clients": 3,
                        "federation.rounds-per-task": 1, "federation.local-steps": 2,
                        "federation.no-audio-fraction": 0.34, "federation.router-local-epochs": 3,
                        "data.tasks": "color,pitch"}, base=tiny_cfg)
    out = tmp_path / "run"
    cfg, _, _ = prepare(cfg, out, progress=False)
    app = AppConfig(out_dir=str(out), clients_dir=str(out / "clients"))
    flat = {**cfg.to_flat(), **app.to_flat()}
    overrides = tmp_path / "run-config.toml"
    overrides.write_text("".join(
        f'"{k}" = {json.dumps(",".join(v) if isinstance(v, list) else v)}\n' for k, v in flat.items()))

    home, http, ctl = tmp_path / "flwr-home", _free_port(), _free_port()
    (home / "local-superlink").mkdir(parents=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{http}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_ADDRESS": "local",
           "OMP_NUM_THREADS": "1"}
    log = home / "local-superlink" / "superlink.log"
    link = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{ctl}", "--host", "127.0.0.1", "--port", str(http),
         "--log-file", str(log)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=0.5).status == 200:
                    break
            except OSError:
                pass
            assert link.poll() is None, f"the SuperLink exited; see {log}"
            assert time.time() < deadline, "the SuperLink did not come up in 60 s"
            time.sleep(0.3)

        def flwr(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=900)

        r = flwr("run", ".", "--run-config", str(overrides), "--federation-config",
                 "num-supernodes=3 client-resources-num-cpus=1", "--stream")
        started = [ln for ln in r.stdout.splitlines() if "Successfully started run" in ln]
        assert started, f"flwr run did not start a run:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        run_id = started[0].split()[-1]
        status = json.loads(flwr("ls", "--run-id", run_id, "--format", "json").stdout)["runs"][0]
        assert status["status"] == "finished:completed", (status, log.read_text()[-3000:])
    finally:
        stop_pid(link.pid, grace=20)  # its process group and every descendant's, by PID
    result = json.loads((out / "server_result.json").read_text())
    assert result["method"] == "dmole-replay" and result["round"] == 4  # 2 tasks × (probe + 1)
    assert set(result["acc_matrix"]) == {"0", "1"} and result["rejected"] == {}
    assert result["comm_summary"]["bytes_up"] > 0
    assert (out / "checkpoint.safetensors").is_file()
