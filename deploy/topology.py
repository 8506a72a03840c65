"""The deployment's processes and their command lines — one definition for both launchers.

``fedmole deploy up`` (deploy/launcher.py) runs these on 127.0.0.1 with free ports;
docker-compose.yml runs the same commands in containers, with service names for hosts and the
container paths of its volumes (tests/test_compose.py checks the two agree). The processes:

* ``superlink`` — Flower's SuperLink: TLS on every API (certificates from deploy/pki.py),
  ``--enable-supernode-auth`` (only registered node keys may connect), subprocess isolation
  (it starts each run's ServerApp itself), no runtime dependency installation;
* ``registry`` — the bundle registry (cloud/registry.py) over the folder the ServerApp publishes
  signed bundles into;
* ``worker-N`` — node N's long-lived worker (edge/worker.py): the model and the data stay in
  memory between round messages; the SuperNode's ClientApps forward to it over a Unix socket in
  the node's state folder (node config ``worker``), so a round does not re-import torch and
  reload the model (``workers=False``: every message handled in the ClientApp process);
* ``supernode-N`` — a Flower SuperNode with its own data folder (node config ``data-dir``; the
  ClientApp keeps its replay buffer under it) and its own EC identity;
* ``serve-N`` — that edge's inference service (edge/serve.py), following the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Ports:
    fleet: int = 9092  # SuperNodes → SuperLink (gRPC, TLS)
    # The SuperLink's HTTP API (HTTPS here): the Control API the flwr CLI talks to, and the
    # runtime API of the ServerApp processes it starts (flwr 1.39 serves both on --port).
    control: int = 9093
    health: int = 9095
    registry: int = 50052
    serve: tuple[int, ...] = ()  # one inference port per node
    clientapp: tuple[int, ...] = ()  # each SuperNode's runtime API for its ClientApps


@dataclass(frozen=True)
class Layout:
    """Paths as the processes see them (host paths locally, volume paths in containers)."""

    pki: Path  # ca.crt, superlink.crt/.key, node-N/.pub, bundle.key/.pub
    registry: Path
    nodes: Path  # the materialised client folders: client-00/ is node-1's data, …
    bundles: Path  # per-node bundle downloads: bundles/node-N
    logs: Path | None = None
    state: Path | None = None  # the SuperLink's database (node registrations, runs)


@dataclass(frozen=True)
class Topology:
    nodes: int
    layout: Layout
    ports: Ports = field(default_factory=Ports)
    bind: str = "127.0.0.1"  # where servers listen
    superlink_host: str = "127.0.0.1"  # how others reach the SuperLink
    registry_host: str = "127.0.0.1"
    workers: bool = True  # a long-lived worker per node (see worker())

    def node_names(self) -> list[str]:
        return [f"node-{i}" for i in range(1, self.nodes + 1)]


def superlink(t: Topology) -> list[str]:
    pki, p = t.layout.pki, t.ports
    cmd = ["flower-superlink",
           "--ssl-ca-certfile", str(pki / "ca.crt"),
           "--ssl-certfile", str(pki / "superlink.crt"),
           "--ssl-keyfile", str(pki / "superlink.key"),
           "--enable-supernode-auth",
           "--isolation", "subprocess",
           "--disable-runtime-dependency-installation",
           "--fleet-api-address", f"{t.bind}:{p.fleet}",
           "--host", t.bind, "--port", str(p.control),
           "--health-server-address", f"{t.bind}:{p.health}"]
    if t.layout.state is not None:  # registered keys and runs survive a SuperLink restart
        cmd += ["--database", str(t.layout.state / "superlink.db")]
    if t.layout.logs is not None:
        cmd += ["--log-file", str(t.layout.logs / "superlink.flwr.log")]
    return cmd


def supernode(t: Topology, i: int, data_dir: Path | None = None, key: Path | None = None,
              port: int | None = None, attack: str = "") -> list[str]:
    """SuperNode ``i`` (1-based); ``key`` overrides its identity (an unregistered one in tests);
    ``attack`` makes it a malicious node (fault injection, edge.local.ATTACKS)."""
    name = f"node-{i}"
    data = data_dir or node_data(t, i)
    conf = f"data-dir=\"{data}\""
    if t.workers:
        conf += f" worker=\"{worker_socket(t, i)}\""
    if attack:
        conf += f" attack=\"{attack}\""
    return ["flower-supernode",
            "--superlink", f"{t.superlink_host}:{t.ports.fleet}",
            "--root-certificates", str(t.layout.pki / "ca.crt"),
            "--auth-supernode-private-key", str(key or t.layout.pki / name),
            "--node-config", conf,
            "--isolation", "subprocess",
            "--host", t.bind, "--port", str(port or t.ports.clientapp[i - 1])]


def node_data(t: Topology, i: int) -> Path:
    """Node ``i``'s data folder (its ClientApp keeps its state under ``_state/``)."""
    return t.layout.nodes / f"client-{i - 1:02d}"


def worker_socket(t: Topology, i: int) -> Path:
    """Where node ``i``'s worker listens: in the node's own state folder."""
    return node_data(t, i) / "_state" / "worker.sock"


def worker(t: Topology, i: int) -> list[str]:
    """Node ``i``'s long-lived worker (it runs beside the SuperNode, on the same files)."""
    return ["fedmole", "worker", "--socket", str(worker_socket(t, i))]


def registry(t: Topology) -> list[str]:
    return ["fedmole", "registry", "--root", str(t.layout.registry),
            "--trusted-key", str(t.layout.pki / "bundle.pub"),
            "--host", t.bind, "--port", str(t.ports.registry)]


def serve(t: Topology, i: int) -> list[str]:
    return ["fedmole", "serve", "--port", str(t.ports.serve[i - 1]), "--host", t.bind,
            "--trusted-key", str(t.layout.pki / "bundle.pub"),
            "--registry", f"{t.registry_host}:{t.ports.registry}",
            "--bundles-dir", str(t.layout.bundles / f"node-{i}")]


def commands(t: Topology) -> dict[str, list[str]]:
    """Every long-running process of the deployment, by name."""
    out = {"superlink": superlink(t), "registry": registry(t)}
    for i in range(1, t.nodes + 1):
        if t.workers:
            out[f"worker-{i}"] = worker(t, i)
        out[f"supernode-{i}"] = supernode(t, i)
        out[f"serve-{i}"] = serve(t, i)
    return out
