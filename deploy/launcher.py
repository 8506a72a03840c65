"""``fedmole deploy up/wait/down``: the docker-compose topology as local processes on 127.0.0.1.

``up`` prepares everything under OUT and starts, each in its own session with its log in
OUT/logs/<name>.log:

1. OUT/pki — a CA, the SuperLink's TLS certificate, one EC identity per SuperNode
   (deploy/pki.py), and the Ed25519 key pair that signs inference bundles;
2. OUT/run/clients/client-NN — each node's data folder (the scenario's split, docs/design.md §3);
3. the SuperLink (TLS, SuperNode auth, subprocess isolation), then registers every node's
   public key with ``flwr supernode register``, then N node workers (each listening on a Unix
   socket in its node's state folder), N SuperNodes, the bundle registry and one inference
   service per node (deploy/topology.py has the command lines);
4. the run: ``flwr run . local`` with the run config (cloud state in OUT/cloud, bundles published
   into OUT/registry).

Every PID is recorded in OUT/deploy.json as soon as it exists; ``down`` stops exactly those
processes and their descendants (process groups by PID, never by name) and is safe to call
twice. Ports are free ones picked at ``up``. No runtime dependency installation anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy import topology as topo
from deploy.pki import make_node_key, make_tls
from protocol.app_config import AppConfig
from protocol.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STATE = "deploy.json"


class DeployError(RuntimeError):
    """A process did not come up, or a flwr command failed; the message names the log."""


@dataclass
class Deployment:
    out: Path
    nodes: int
    ports: dict[str, Any]
    pids: dict[str, int] = field(default_factory=dict)
    run_id: str = ""
    # node number → fault injection (edge.local.ATTACKS) its SuperNode runs with
    attacks: dict[str, str] = field(default_factory=dict)
    workers: bool = True  # a long-lived worker per node (deploy/topology.py)

    def save(self) -> None:
        d = asdict(self)
        d["out"] = str(self.out)
        tmp = self.out / f".{STATE}.tmp"
        tmp.write_text(json.dumps(d, indent=1))
        os.replace(tmp, self.out / STATE)

    @classmethod
    def load(cls, out: Path) -> Deployment:
        f = Path(out) / STATE
        if not f.is_file():
            raise DeployError(f"no deployment in {str(out)!r} ({STATE} missing)")
        d = json.loads(f.read_text())
        return cls(Path(d["out"]), int(d["nodes"]), d["ports"], {k: int(v) for k, v in
                                                                 d["pids"].items()}, d["run_id"],
                   {str(k): str(v) for k, v in d.get("attacks", {}).items()},
                   bool(d.get("workers", True)))

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(out: Path, name: str) -> dict[str, str]:
    """Each process its own FLWR_HOME (FAB installs must not race); no telemetry, no installs;
    Flower's app launcher polls for a message's task every 0.2 s instead of every 1 s (each
    round message waits for it, on the SuperNodes and on the SuperLink)."""
    home = out / "flwr-home" / name
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def start(dep: Deployment, name: str, argv: list[str]) -> int:
    """Start ``argv`` in a new session (its own process group), log to OUT/logs, record the PID."""
    dep.log(name).parent.mkdir(parents=True, exist_ok=True)
    exe = BIN / argv[0]
    with open(dep.log(name), "ab") as logf:
        proc = subprocess.Popen([str(exe) if exe.exists() else argv[0], *argv[1:]], cwd=ROOT,
                                env=environment(dep.out, name), stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    dep.pids[name] = proc.pid
    dep.save()
    return proc.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_port(port: int, pid: int, log: Path, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive(pid):
            raise DeployError(f"process {pid} exited before listening on {port}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see {log}")


def flwr(dep: Deployment, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=environment(dep.out, "cli"),
                          capture_output=True, text=True, timeout=timeout)


def layout(out: Path) -> topo.Layout:
    return topo.Layout(pki=out / "pki", registry=out / "registry", nodes=out / "run" / "clients",
                       bundles=out / "bundles", logs=out / "logs", state=out / "superlink")


def topology_of(dep: Deployment) -> topo.Topology:
    p = dep.ports
    ports = topo.Ports(fleet=p["fleet"], control=p["control"], health=p["health"],
                       registry=p["registry"], serve=tuple(p["serve"]),
                       clientapp=tuple(p["clientapp"]))
    return topo.Topology(dep.nodes, layout(dep.out), ports, workers=dep.workers)


RUN_CONFIG = "run-config.toml"


def write_run_config(dep: Deployment, cfg: RunConfig, extra: dict[str, Any] | None = None,
                     name: str = RUN_CONFIG) -> Path:
    """The run config ``flwr run`` sends: every key, with the deployment's paths."""
    app = AppConfig(out_dir=str(dep.out / "cloud"), registry_dir=str(dep.out / "registry"),
                    signing_key=str(dep.out / "pki" / "bundle.key"))
    flat = {**cfg.to_flat(), **app.to_flat(), **(extra or {})}
    path = dep.out / name
    path.write_text("".join(f'"{k}" = {json.dumps(",".join(v) if isinstance(v, list) else v)}\n'
                            for k, v in flat.items()))
    return path


def prepare(out: Path, nodes: int, cfg: RunConfig, progress: bool = False) -> tuple[Deployment, RunConfig]:
    """Keys, certificates, data folders and ports; starts nothing."""
    import dataclasses

    from protocol.bundle import generate_keypair
    from simulation.federated import prepare as prepare_data

    out = Path(out).resolve()
    if (out / STATE).is_file() and any(alive(p) for p in Deployment.load(out).pids.values()):
        raise DeployError(f"a deployment is still running in {str(out)!r}; "
                          f"`fedmole deploy down --out {out}` first")
    out.mkdir(parents=True, exist_ok=True)
    pki = out / "pki"
    make_tls(pki, ("127.0.0.1", "localhost", "superlink"))
    for i in range(1, nodes + 1):
        make_node_key(pki, f"node-{i}")
    if not (pki / "bundle.key").is_file():
        generate_keypair(pki / "bundle.key", pki / "bundle.pub")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, clients=nodes))
    cfg, _, _ = prepare_data(cfg, out / "run", progress)
    ports = {"fleet": free_port(), "control": free_port(), "health": free_port(), "registry": free_port(),
             "serve": [free_port() for _ in range(nodes)],
             "clientapp": [free_port() for _ in range(nodes)]}
    home = out / "flwr-home" / "cli"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{ports["control"]}"\nroot-certificates = "{pki / "ca.crt"}"\n')
    dep = Deployment(out, nodes, ports)
    dep.save()
    write_run_config(dep, cfg)  # with the prepared base path and node count
    return dep, cfg


def start_superlink(dep: Deployment) -> None:
    t = topology_of(dep)
    if t.layout.state is not None:
        t.layout.state.mkdir(parents=True, exist_ok=True)
    pid = start(dep, "superlink", topo.superlink(t))
    for port in (dep.ports["control"], dep.ports["fleet"]):
        wait_port(port, pid, dep.log("superlink"))


def register(dep: Deployment, public_key: Path) -> None:
    r = flwr(dep, "supernode", "register", str(public_key), "local")
    if r.returncode != 0:
        raise DeployError(f"`flwr supernode register {public_key}` failed: {r.stdout[-500:]} "
                          f"{r.stderr[-500:]}")


def wait_socket(path: Path, pid: int, log: Path, timeout: float = 180.0) -> None:
    """Until something accepts connections on the Unix socket ``path`` (a node worker)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive(pid):
            raise DeployError(f"process {pid} exited before listening on {path}; see {log}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.3)
    raise DeployError(f"nothing listens on {path} after {timeout:.0f} s; see {log}")


def start_worker(dep: Deployment, i: int) -> int:
    """Node ``i``'s long-lived worker, once it listens."""
    t = topology_of(dep)
    pid = start(dep, f"worker-{i}", topo.worker(t, i))
    wait_socket(topo.worker_socket(t, i), pid, dep.log(f"worker-{i}"))
    return pid


def start_node(dep: Deployment, i: int) -> int:
    return start(dep, f"supernode-{i}", topo.supernode(topology_of(dep), i,
                                                       attack=dep.attacks.get(str(i), "")))


def restart_node(dep: Deployment, i: int, timeout: float = 240.0, settle: float = 20.0,
                 attack: str | None = None) -> int:
    """Start SuperNode ``i`` again until it stays up (what compose's ``restart: on-failure`` does).

    A node killed without saying goodbye stays "online" on the SuperLink until its heartbeats
    lapse (flwr 1.39: 2 × 30 s); until then the SuperLink refuses to activate the same identity
    again and the new process exits (code 305). So: retry every few seconds."""
    if attack is not None:  # the node comes back (not) malicious
        dep.attacks = {k: v for k, v in {**dep.attacks, str(i): attack}.items() if v}
        dep.save()
    deadline = time.time() + timeout
    while True:
        pid = start_node(dep, i)
        t_end = time.time() + settle
        while time.time() < t_end and alive(pid):
            time.sleep(0.5)
        if alive(pid):
            return pid
        if time.time() > deadline:
            raise DeployError(f"supernode-{i} did not rejoin in {timeout:.0f} s; "
                              f"see {dep.log(f'supernode-{i}')}")
        time.sleep(5)


def up(out: Path, nodes: int, cfg: RunConfig, run: bool = True, progress: bool = False,
       run_config_extra: dict[str, Any] | None = None,
       attacks: dict[int, str] | None = None, workers: bool = True) -> Deployment:
    """Everything of the topology as processes; ``attacks`` (node → edge.local.ATTACKS) makes
    those SuperNodes malicious (fault-injection runs); ``workers`` starts a long-lived worker
    per node that its ClientApps forward to (deploy/topology.py)."""
    from edge.local import ATTACKS

    for i, a in (attacks or {}).items():
        if not 1 <= i <= nodes or a not in ATTACKS:
            raise DeployError(f"attack {i}={a!r}: the node must be in 1..{nodes} and the attack "
                              f"one of {', '.join(x for x in ATTACKS if x)}")
    dep, cfg = prepare(out, nodes, cfg, progress)
    dep.attacks = {str(i): a for i, a in (attacks or {}).items() if a}
    dep.workers = workers
    dep.save()
    try:
        t = topology_of(dep)
        start_superlink(dep)
        for i in range(1, nodes + 1):
            register(dep, dep.out / "pki" / f"node-{i}.pub")
        if workers:
            for i in range(1, nodes + 1):
                start_worker(dep, i)
        for i in range(1, nodes + 1):
            start_node(dep, i)
        start(dep, "registry", topo.registry(t))
        wait_port(dep.ports["registry"], dep.pids["registry"], dep.log("registry"))
        for i in range(1, nodes + 1):
            start(dep, f"serve-{i}", topo.serve(t, i))
        if run:
            submit(dep, run_config_extra)
    except BaseException:
        down(dep.out)
        raise
    return dep


def run_config_with(dep: Deployment, extra: dict[str, Any]) -> Path:
    """The prepared run config with ``extra`` replacing its keys (TOML refuses a key twice)."""
    flat = {**tomllib.loads((dep.out / RUN_CONFIG).read_text()), **extra}
    path = dep.out / "run-config.extra.toml"
    path.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in flat.items()))
    return path


def submit(dep: Deployment, extra: dict[str, Any] | None = None) -> str:
    """``flwr run . local`` with the deployment's run config (+ ``extra`` keys); the run id."""
    path = run_config_with(dep, extra) if extra else dep.out / RUN_CONFIG
    r = flwr(dep, "run", ".", "local", "--run-config", str(path), timeout=300)
    started = [ln for ln in r.stdout.splitlines() if "Successfully started run" in ln]
    if not started:
        raise DeployError(f"flwr run did not start a run:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    dep.run_id = started[0].split()[-1]
    dep.save()
    return dep.run_id


def run_status(dep: Deployment) -> str:
    r = flwr(dep, "ls", "--run-id", dep.run_id, "--format", "json")
    try:
        return str(json.loads(r.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError) as e:
        raise DeployError(f"flwr ls gave no status for run {dep.run_id}: {r.stdout[-500:]} "
                          f"{r.stderr[-500:]}") from e


def run_log(dep: Deployment) -> str:
    """The run's log as the SuperLink kept it (the ServerApp's output)."""
    r = flwr(dep, "log", dep.run_id, "local", "--show", timeout=60)
    return r.stdout + r.stderr


def wait(dep: Deployment, timeout: float = 1800.0, poll: float = 3.0) -> str:
    """Block until the run is finished; returns its status (e.g. ``finished:completed``). The
    run's log is saved to OUT/logs/run.log either way."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run_status(dep)
        if status.startswith("finished"):
            dep.log("run").write_text(run_log(dep))
            return status
        if not alive(dep.pids.get("superlink", 0)):
            raise DeployError(f"the SuperLink died; see {dep.log('superlink')}")
        time.sleep(poll)
    raise DeployError(f"run {dep.run_id} not finished after {timeout:.0f} s")


# -- stopping ------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, stack = _children(), [], [pid]
    while stack:
        for k in kids.get(stack.pop(), []):
            out.append(k)
            stack.append(k)
    return out


def stop_pid(pid: int, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop ``pid``'s process group and those of all its descendants (SIGKILL after ``grace``)."""
    procs = [pid, *descendants(pid)]
    groups = set()
    for p in procs:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in procs):
        time.sleep(0.2)
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:  # reap our own children so they do not linger as zombies
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass


def down(out: Path) -> list[str]:
    """Stop every process the deployment in ``out`` started; returns their names."""
    dep = Deployment.load(out)
    order = ([n for n in dep.pids if n.startswith("serve-")] + ["registry"]
             + [n for n in dep.pids if n.startswith("supernode")]
             + [n for n in dep.pids if n.startswith("worker-")] + ["superlink"])
    stopped = []
    for name in [n for n in order if n in dep.pids] + [n for n in dep.pids if n not in order]:
        pid = dep.pids[name]
        if alive(pid) or descendants(pid):
            stop_pid(pid)
            stopped.append(name)
    return stopped
