"""``python -m deploy.init``: the one-shot ``init`` service of docker-compose.yml.

Idempotent (compose runs it on every ``up``): keys and certificates are created only when
missing, the data split is re-checked, not redone (simulation.scenario.materialize), and the run
config and the flwr CLI's connection are rewritten with the container paths of deploy/compose.py:

* /pki — CA + SuperLink certificate (for "superlink", 127.0.0.1 and localhost: flwr 1.39 dials
  its own SuperLink over 127.0.0.1 from the ServerApp process), node-N identities, bundle keys;
* /data-root/client-NN — each node's data folder (its own volume);
* /state/run-config.toml — every run-config key (base path in the /cache volume);
* /state/flwr-cli/config.toml — the flwr CLI's connection to the SuperLink (TLS, CA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from deploy import compose
from deploy.pki import make_node_key, make_tls
from protocol.app_config import AppConfig
from protocol.config import RunConfig, load_config, parse_overrides


def init(cfg: RunConfig, out: Path, nodes: int, pki: Path, data_root: Path,
         progress: bool = False) -> Path:
    from protocol.bundle import generate_keypair
    from simulation.base import ensure_base
    from simulation.data import open_tasks
    from simulation.scenario import materialize, split_stream

    if not (pki / "ca.crt").is_file():
        make_tls(pki, ("superlink", "127.0.0.1", "localhost"))
    for i in range(1, nodes + 1):
        if not (pki / f"node-{i}").is_file():
            make_node_key(pki, f"node-{i}")
    if not (pki / "bundle.key").is_file():
        generate_keypair(pki / "bundle.key", pki / "bundle.pub")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, clients=nodes))
    tasks = open_tasks(cfg)
    base = ensure_base(cfg, tasks, progress)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_path=str(base)))
    materialize(split_stream(tasks, cfg.federation), tasks, data_root)
    app = AppConfig(out_dir=str(compose.CLOUD_OUT), registry_dir=str(compose.REGISTRY),
                    signing_key=str(compose.SIGNING_KEY))
    flat = {**cfg.to_flat(), **app.to_flat()}
    out.mkdir(parents=True, exist_ok=True)
    run_config = out / compose.RUN_CONFIG.name
    run_config.write_text("".join(f'"{k}" = {json.dumps(",".join(v) if isinstance(v, list) else v)}\n'
                                  for k, v in flat.items()))
    home = out / compose.CLI_HOME.name
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(compose.cli_config(compose.container_topology(nodes)))
    return run_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.init", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=compose.STATE)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pki", type=Path, default=compose.PKI)
    ap.add_argument("--data-root", type=Path, default=compose.DATA_ROOT)
    ap.add_argument("--config", type=Path, default=None, help="TOML config (default: built-in)")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="KEY=VALUE override")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, parse_overrides(args.set_))
    print(init(cfg, args.out, args.nodes, args.pki, args.data_root, progress=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
