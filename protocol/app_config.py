"""Flower's run config → (RunConfig, AppConfig), parsed once per process.

``[tool.flwr.app.config]`` (and ``flwr run --run-config``) carry every RunConfig key
(``lora.rank``, ``federation.rounds-per-task`` …) plus a few ``app.*`` keys that are not
hyperparameters but where this run lives::

    app.out-dir         run folder: checkpoint, metrics.json, report (ServerApp)
    app.clients-dir     materialized client folders client-NN/ (simulation: a ClientApp reads
                        client-<partition-id>; a deployed SuperNode sets node config `data-dir`)
    app.client-threads  torch threads per ClientApp (1: clients share the cores, one each)
    app.resume          continue from app.out-dir's checkpoint
    app.stop-after-round  fault injection for tests: the server stops (as if killed) once this
                        global round is checkpointed; 0 = never
    app.registry-dir    publish a signed inference bundle into this bundle-registry folder after
                        each task (cloud/publish.py); empty = don't
    app.signing-key     the Ed25519 private key that signs those bundles (`fedmole keys`)
    app.timing-log      each node appends a line per message (phase, round, seconds of local
                        work and of the whole handling) to <state-dir>/timing.jsonl
                        (bench/deploy_round.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from protocol.config import ConfigError, RunConfig, parse_config

APP_PREFIX = "app."


@dataclass(frozen=True)
class AppConfig:
    out_dir: str = ""
    clients_dir: str = ""
    client_threads: int = 1
    resume: bool = False
    stop_after_round: int = 0
    registry_dir: str = ""
    signing_key: str = ""
    timing_log: bool = False

    def to_flat(self) -> dict[str, Any]:
        return {APP_PREFIX + f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def split_run_config(flat: Mapping[str, Any]) -> tuple[RunConfig, AppConfig]:
    run = {k: v for k, v in flat.items() if not k.startswith(APP_PREFIX)}
    app: dict[str, Any] = {}
    known = {f.name: f.type for f in fields(AppConfig)}
    for k, v in flat.items():
        if not k.startswith(APP_PREFIX):
            continue
        name = k[len(APP_PREFIX):].replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown config key `{k}`; app keys: "
                              f"{', '.join(AppConfig().to_flat())}")
        want = {"str": str, "int": int, "bool": bool}[str(known[name])]
        if want is bool and isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        if want is int and isinstance(v, str) and v.lstrip("-").isdigit():
            v = int(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"`{k}` must be {want.__name__}, got {v!r}")
        app[name] = v
    cfg = AppConfig(**app)
    if cfg.client_threads < 1:
        raise ConfigError(f"`app.client-threads` must be >= 1, got {cfg.client_threads}")
    if cfg.registry_dir and not cfg.signing_key:
        raise ConfigError("`app.registry-dir` is set but `app.signing-key` is empty: bundles must "
                          "be signed; create a key with `fedmole keys` and pass its bundle.key")
    if cfg.signing_key and not Path(cfg.signing_key).is_file():
        raise ConfigError(f"`app.signing-key` {cfg.signing_key!r} is not a file; create one with "
                          "`fedmole keys`")
    return parse_config(run), cfg
