"""The ``fedmole`` command: parses arguments and calls the packages' functions, nothing more.

Exit codes: 0 success · 2 bad usage or config (the message names the key and value) ·
3 bad data or checkpoint (the message names the file) · 1 anything unexpected (a bug: report it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="FedMoLE: federated continual learning of multimodal LoRA experts.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file (conf/*.toml)")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config key, e.g. --set train.steps-per-task=100")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")]
StreamOpt = Annotated[Path | None, typer.Option(
    "--stream", help="A task stream file (conf/streams/*.toml; = --set data.stream=FILE): "
                     "your tasks in the field's LLaVA-style format instead of the embedded "
                     "benchmark")]

EXIT_USAGE, EXIT_DATA = 2, 3


def _fail(code: int, msg: str) -> typer.Exit:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _config(config: Path | None, overrides: list[str] | None, stream: Path | None = None):
    from protocol.config import load_config, parse_overrides

    flat: dict[str, str] = {"data.stream": str(stream)} if stream is not None else {}
    return load_config(config, {**flat, **parse_overrides(overrides or [])})


def _guard(fn):
    """Map the error families to the documented exit codes."""
    from mole.backbone import CheckpointError
    from protocol.config import ConfigError
    from protocol.llava_format import DataError
    from protocol.manifest import ManifestError

    try:
        return fn()
    except ConfigError as e:
        raise _fail(EXIT_USAGE, str(e)) from None
    except (ManifestError, DataError, CheckpointError, FileNotFoundError) as e:
        raise _fail(EXIT_DATA, str(e)) from None


@app.command()
def train(
    method: Annotated[str, typer.Option(help="seq-lora | replay-lora | joint | dmole")] = "seq-lora",
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("runs/train"),
    replay: Annotated[bool, typer.Option("--replay", help="dmole: add the replay buffer")] = False,
    stream: StreamOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Centralized continual run over the task stream; writes metrics.json, report.md, plot."""
    from simulation.centralized import run_centralized
    from simulation.dmole import run_dmole
    from simulation.methods import METHODS
    from simulation.report import comparison_table

    known = [*METHODS, "dmole"]
    if method not in known:
        raise _fail(EXIT_USAGE, f"unknown --method {method!r}; known: {', '.join(known)}")
    if replay and method != "dmole":
        raise _fail(EXIT_USAGE, "--replay goes with --method dmole (use --method replay-lora)")
    cfg = _guard(lambda: _config(config, set_, stream))
    if method == "dmole":
        m = _guard(lambda: run_dmole(cfg, out, replay=replay, progress=not quiet))
    else:
        m = _guard(lambda: run_centralized(cfg, method, out, progress=not quiet))
    typer.echo(comparison_table([m]))
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("runs/demo"),
    methods: Annotated[str, typer.Option(
        help="Comma-separated federated methods (dmole-replay, dmole, fedavg-replay-lora, "
             "fedavg-seq-lora)")] = "dmole-replay",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The main job: the default federated scenario end to end, a summary table and reports."""
    from protocol.config import FEDERATED_METHODS
    from simulation.federated import run_federated
    from simulation.reference import compare_lines, load_reference
    from simulation.report import comparison_table

    names = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in names if m not in FEDERATED_METHODS]
    if bad:
        raise _fail(EXIT_USAGE, f"unknown methods {bad}; known: {', '.join(FEDERATED_METHODS)}")
    rows = []
    for name in names:
        typer.echo(f"== federated {name} ==")
        cfg = _guard(lambda n=name: _config(config, [*(set_ or []), f"federation.method={n}"]))
        rows.append(_guard(lambda c=cfg, n=name: run_federated(c, out / n, progress=not quiet)))
    table = comparison_table(rows)
    (out / "summary.md").write_text(table + "\n")
    typer.echo(table)
    ref = load_reference()
    for row in rows:
        typer.echo("\n".join(compare_lines(row, ref, default_config=config is None and not set_)))
    typer.echo(f"reports: {', '.join(str(out / n / 'report.md') for n in names)}")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("runs/fed"),
    method: Annotated[str | None, typer.Option(
        help="dmole-replay (default), dmole, fedavg-replay-lora or fedavg-seq-lora")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT's checkpoint")] = False,
    stream: StreamOpt = None,
    registry_dir: Annotated[Path | None, typer.Option(
        help="Publish a signed inference bundle here after each task")] = None,
    signing_key: Annotated[Path, typer.Option(help="Private key for those bundles")] = Path(
        "keys/bundle.key"),
    quiet: QuietOpt = False,
) -> None:
    """A federated run through Flower's simulation engine (scenario from federation.*)."""
    from simulation.federated import run_federated
    from simulation.report import comparison_table

    overrides = list(set_ or [])
    if method is not None:
        overrides.append(f"federation.method={method}")
    cfg = _guard(lambda: _config(config, overrides, stream))
    if registry_dir is not None and not signing_key.is_file():
        raise _fail(EXIT_USAGE, f"--signing-key {signing_key} does not exist; create one with "
                                "`fedmole keys`")
    m = _guard(lambda: run_federated(cfg, out, resume=resume, progress=not quiet,
                                     registry_dir=registry_dir,
                                     signing_key=signing_key if registry_dir else None))
    typer.echo(comparison_table([m]))
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or their metrics.json)")],
    out: Annotated[Path | None, typer.Option(help="Also write the table to this file")] = None,
) -> None:
    """One comparison table (AVG, Last, BWT, …) over finished runs' metrics.json."""
    from simulation.report import comparison_table, load_metrics

    rows = [_guard(lambda r=r: load_metrics(r)) for r in runs]
    try:
        table = comparison_table(rows)
    except ValueError as e:
        raise _fail(EXIT_DATA, str(e)) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    typer.echo(table)


@app.command()
def data(
    out: Annotated[Path | None, typer.Option(help="Write here instead of the cache")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Generate the embedded benchmark (docs/design.md §3 on-disk format) and print its folder."""
    from simulation.benchmark import ensure_benchmark, generate_benchmark

    cfg = _guard(lambda: _config(config, set_))
    path = generate_benchmark(out, cfg.data) if out else ensure_benchmark(cfg.data)
    typer.echo(str(path))


@app.command()
def pretrain(config: ConfigOpt = None, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Pretrain (or find in the cache) the base model and print its checkpoint folder."""
    from simulation.base import describe_base, ensure_base
    from simulation.data import open_tasks

    cfg = _guard(lambda: _config(config, set_))
    path = _guard(lambda: ensure_base(cfg, open_tasks(cfg), progress=not quiet))
    typer.echo(describe_base(path), err=True)
    typer.echo(str(path))


# -- edge inference and the bundle registry ------------------------------------------------

KeyOpt = Annotated[Path, typer.Option(help="Ed25519 private key that signs bundles")]
PubOpt = Annotated[Path, typer.Option(help="Ed25519 public key bundles must be signed with")]


def _bundle_guard(fn):
    """Bundle and export errors are bad data (3); key files that exist already are usage (2)."""
    from mole.export import ExportError
    from protocol.bundle import BundleError

    try:
        return _guard(fn)
    except (BundleError, ExportError) as e:
        raise _fail(EXIT_DATA, str(e)) from None
    except FileExistsError as e:
        raise _fail(EXIT_USAGE, str(e)) from None


@app.command()
def keys(
    out: Annotated[Path, typer.Option(help="Folder for bundle.key + bundle.pub")] = Path("keys"),
    overwrite: Annotated[bool, typer.Option(help="Replace existing keys")] = False,
) -> None:
    """Generate the Ed25519 key pair the cloud signs bundles with (private key mode 0600)."""
    from protocol.bundle import generate_keypair

    _bundle_guard(lambda: generate_keypair(out / "bundle.key", out / "bundle.pub",
                                           overwrite=overwrite))
    typer.echo(f"{out / 'bundle.key'}\n{out / 'bundle.pub'}")


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="A federated D-MoLE run folder (fedmole simulate --out)")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write (replaced)")],
    signing_key: KeyOpt = Path("keys/bundle.key"),
    base: Annotated[Path | None, typer.Option(help="Base checkpoint, if it moved")] = None,
    bundle_id: Annotated[str | None, typer.Option(help="Default: round-NNNNN")] = None,
    peft: Annotated[bool, typer.Option(
        "--peft", help="Write the run's experts as PEFT adapters (OUT/<task>) of the base's own "
                       "Hugging Face class instead of a bundle")] = False,
) -> None:
    """Export a run's global model to a signed bundle (fp32 + int8 ONNX, tokenizer, manifest),
    or with --peft its experts as adapters for PeftModel.from_pretrained."""
    from mole.export import export_bundle, load_run

    if peft:
        from mole.export import export_peft

        for folder in _bundle_guard(lambda: export_peft(run, out, base)):
            typer.echo(str(folder))
        return
    if not signing_key.is_file():
        raise _fail(EXIT_USAGE, f"--signing-key {signing_key} does not exist; create one with "
                                "`fedmole keys`")
    path = _bundle_guard(lambda: export_bundle(load_run(run, base), out, signing_key, bundle_id))
    typer.echo(str(path))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """The edge inference service: --bundle DIR --port N [--trusted-key PUB] [--registry HOST:PORT]
    (all options: python -m edge.serve --help)."""
    from edge.serve import main as serve_main

    raise typer.Exit(_bundle_guard(lambda: serve_main(list(ctx.args))))


@app.command()
def worker(
    socket: Annotated[Path, typer.Option(help="The Unix socket the node's ClientApp forwards to "
                                               "(its node config `worker`)")],
) -> None:
    """An edge node's long-lived worker: keeps the model and data in memory between rounds."""
    from edge.worker import main as worker_main

    raise typer.Exit(worker_main(["--socket", str(socket)]))


@app.command()
def registry(
    root: Annotated[Path, typer.Option(help="Folder of published bundles")] = Path("registry"),
    trusted_key: PubOpt = Path("keys/bundle.pub"),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 50052,
) -> None:
    """The cloud's bundle registry (gRPC): lists verified bundles, serves them in chunks."""
    from cloud.registry import run_registry

    typer.echo(f"registry of {root} on {host}:{port} (Ctrl-C stops it)")
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _bundle_guard(lambda: run_registry(root, trusted_key, host, port))


@app.command()
def publish(
    bundle: Annotated[Path, typer.Argument(help="A signed bundle folder")],
    root: Annotated[Path, typer.Option(help="The registry's folder")] = Path("registry"),
    trusted_key: PubOpt = Path("keys/bundle.pub"),
) -> None:
    """Verify a signed bundle and publish it into a registry folder (atomically)."""
    from cloud.registry import publish_cli

    m = _bundle_guard(lambda: publish_cli(bundle, root, trusted_key))
    typer.echo(f"published {m.bundle_id} (round {m.global_round})")


# -- local deployment ----------------------------------------------------------------------

deploy_app = typer.Typer(no_args_is_help=True, help="The deployment topology as local processes.")
app.add_typer(deploy_app, name="deploy")


def _deploy_guard(fn):
    from deploy.launcher import DeployError

    try:
        return _bundle_guard(fn)
    except DeployError as e:
        raise _fail(EXIT_DATA, str(e)) from None


@deploy_app.command("up")
def deploy_up(
    out: Annotated[Path, typer.Option(help="Deployment folder (keys, data, state, logs)")] = Path(
        "runs/deploy"),
    nodes: Annotated[int, typer.Option(help="SuperNodes (each with its inference service)")] = 3,
    run: Annotated[bool, typer.Option(help="Submit the run (flwr run) once everything is up")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    attack: Annotated[list[str] | None, typer.Option(
        help="Fault injection: NODE=ATTACK makes SuperNode NODE malicious (nan, scale100, mixed) "
             "or withholding (withhold: skips probes and training, still evaluates)")
    ] = None,
    workers: Annotated[bool, typer.Option(
        help="A long-lived worker per node keeps the model and data in memory between rounds "
             "(--no-workers: each message is handled in the process Flower starts for it)")] = True,
) -> None:
    """Start SuperLink (TLS, node auth), N node workers and SuperNodes, the registry, N
    inference services, and the run."""
    from deploy.launcher import up

    cfg = _guard(lambda: _config(config, set_))
    attacks: dict[int, str] = {}
    for a in attack or []:
        node, sep, kind = a.partition("=")
        if not sep or not node.strip().isdigit():
            raise _fail(EXIT_USAGE, f"--attack {a!r}: write NODE=ATTACK, e.g. 3=mixed")
        attacks[int(node)] = kind.strip()
    dep = _deploy_guard(lambda: up(out, nodes, cfg, run=run, attacks=attacks, workers=workers))
    typer.echo(f"up: {', '.join(f'{k}={v}' for k, v in dep.pids.items())}")
    typer.echo(f"run {dep.run_id or '(not submitted)'}; logs in {dep.out / 'logs'}; "
               f"inference on 127.0.0.1:{', '.join(map(str, dep.ports['serve']))}")


@deploy_app.command("wait")
def deploy_wait(
    out: Annotated[Path, typer.Option(help="Deployment folder")] = Path("runs/deploy"),
    timeout: Annotated[float, typer.Option(help="Seconds")] = 3600.0,
) -> None:
    """Block until the deployment's run has finished; print its status (exit 1 unless completed)."""
    from deploy.launcher import Deployment, wait

    status = _deploy_guard(lambda: wait(Deployment.load(out), timeout))
    typer.echo(status)
    if status != "finished:completed":
        raise typer.Exit(1)


@deploy_app.command("down")
def deploy_down(
    out: Annotated[Path, typer.Option(help="Deployment folder")] = Path("runs/deploy"),
) -> None:
    """Stop exactly the processes `deploy up` started (by PID, with their children)."""
    from deploy.launcher import down

    stopped = _deploy_guard(lambda: down(out))
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=os.environ.get("FEDMOLE_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
