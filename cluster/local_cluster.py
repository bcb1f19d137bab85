"""A Ray cluster of several nodes on this one machine, token auth on: a head and N worker nodes.

    python cluster/local_cluster.py up --workers 1      # prints the client environment below
    eval "$(python cluster/local_cluster.py env)"       # RAY_AUTH_MODE, token path, job address
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/demo.yaml
    python cluster/local_cluster.py down                # stops exactly what `up` started

Each node is its own `ray start --block` process, in its own session and on its own free ports,
so other Ray instances on the machine are left alone; `down` signals those processes by id
(`ray stop` would stop every Ray instance of this user). The token is a fresh random one in
DIR/auth_token, handed to every node and client through RAY_AUTH_TOKEN_PATH with
RAY_AUTH_MODE=token. Worker node i carries one unit of the custom resource `node_<i>`, so work
can be pinned to it (`@ray.remote(resources={"node_1": 1})`). Ray runs from the Python that runs
this script (its bin/ray), and that bin folder leads PATH on the nodes, so a job's `python` is
the same one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
DEFAULT_DIR = Path(tempfile.gettempdir()) / "maskdistill-cluster"  # short: Ray's socket paths
STATE_FILE = "state.json"
# Ports every node opens; each gets a free one so that several nodes share this machine.
NODE_PORTS = (
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
)
HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")


@dataclass(frozen=True)
class LocalCluster:
    """What `up` started and what a client needs to reach it."""

    root: str
    gcs_address: str  # host:port, what ray.init(address=...) and `ray start --address` take
    dashboard: str  # http://127.0.0.1:PORT: the job server (`ray job submit --address`)
    token_path: str
    pids: list[int]  # one `ray start --block` per node, head first

    def client_env(self) -> dict[str, str]:
        """The variables a client of this cluster sets: auth mode, token, job server address."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_API_SERVER_ADDRESS": self.dashboard,
        }


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _port_flags(names: Sequence[str]) -> list[str]:
    return [f"{name}={port}" for name, port in zip(names, _free_ports(len(names)), strict=True)]


def _node_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # `down` stops at once
    }
    return env


def _start_node(args: list[str], *, env: dict[str, str], log: Path) -> int:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process.pid


def _get_json(url: str, token: str) -> object | None:
    """GET url with the bearer token; None while nothing answers 200 there."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _alive_nodes(dashboard: str, token: str) -> int:
    """How many nodes the GCS reports alive (state API, through the dashboard)."""
    reply = _get_json(f"{dashboard}/api/v0/nodes?limit=1000", token)
    if not isinstance(reply, dict) or not reply.get("result"):
        return 0
    rows = reply["data"]["result"]["result"]
    return sum(1 for row in rows if row.get("state") == "ALIVE")


def _wait(
    what: str, ready: Callable[[], bool], *, pids: list[int], logs: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not all(_running(pid) for pid in pids):
            raise RuntimeError(f"a node exited while waiting for {what}; see {logs}/*.log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s; see {logs}/*.log")
        time.sleep(1)


def _running(pid: int) -> bool:
    """Whether the process lives (reaping it first when it is a child of this process)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def up(
    *,
    root: Path = DEFAULT_DIR,
    workers: int = 1,
    head_cpus: int = 2,
    worker_cpus: int = 1,
    object_store_bytes: int = 300_000_000,
    timeout: float = 120.0,
) -> LocalCluster:
    """Start a head and `workers` worker nodes; return once the job server and every node are up.

    The state (pids, addresses, token path) goes to root/state.json for `down`.
    """
    if (root / STATE_FILE).exists():
        raise FileExistsError(f"{root / STATE_FILE}: a cluster is already up there; run `down`")
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    token_path = root / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = _node_env(token_path)
    ports = _free_ports(len(HEAD_PORTS) + len(NODE_PORTS))  # one draw: no port handed out twice
    head = dict(zip(HEAD_PORTS, ports, strict=False))
    gcs_port, dashboard_port = head["--port"], head["--dashboard-port"]
    head_args = [
        "--head",
        *(f"{name}={port}" for name, port in zip((*HEAD_PORTS, *NODE_PORTS), ports, strict=True)),
        "--include-dashboard=true",  # the job server lives in the dashboard
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={root / 'ray'}",
        f"--num-cpus={head_cpus}",
        f"--object-store-memory={object_store_bytes}",
        "--min-worker-port=0",  # worker processes on OS-chosen ports: no clash between nodes
        "--max-worker-port=0",
    ]
    pids = [_start_node(head_args, env=env, log=root / "head.log")]
    cluster = LocalCluster(
        root=str(root),
        gcs_address=f"127.0.0.1:{gcs_port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        token_path=str(token_path),
        pids=pids,
    )
    _save(cluster)
    try:
        _wait(
            "the job server",
            lambda: _get_json(f"{cluster.dashboard}/api/jobs/", token) is not None,
            pids=pids,
            logs=root,
            timeout=timeout,
        )
        for i in range(1, workers + 1):
            worker_args = [
                f"--address={cluster.gcs_address}",
                f"--num-cpus={worker_cpus}",
                f"--resources={json.dumps({f'node_{i}': 1})}",
                f"--object-store-memory={object_store_bytes}",
                "--min-worker-port=0",
                "--max-worker-port=0",
                *_port_flags(NODE_PORTS),
            ]
            pids.append(_start_node(worker_args, env=env, log=root / f"worker_{i}.log"))
            _save(cluster)
        _wait(
            f"{workers + 1} alive nodes",
            lambda: _alive_nodes(cluster.dashboard, token) == workers + 1,
            pids=pids,
            logs=root,
            timeout=timeout,
        )
    except BaseException:
        down(root=root)
        raise
    return cluster


def down(*, root: Path = DEFAULT_DIR, timeout: float = 60.0) -> None:
    """SIGTERM each node `up` started (each stops its own Ray processes), SIGKILL what is left."""
    state = root / STATE_FILE
    if not state.exists():
        raise FileNotFoundError(f"{state}: no cluster was started there")
    cluster = _load(root)
    for pid in reversed(cluster.pids):  # workers first, then the head
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in cluster.pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in cluster.pids:
        _signal_group(pid, signal.SIGKILL)  # each node's session: its raylet, GCS, workers
    state.unlink()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group `pid` leads (each node was started in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _save(cluster: LocalCluster) -> None:
    path = Path(cluster.root) / STATE_FILE
    path.write_text(json.dumps(asdict(cluster), indent=1))


def _load(root: Path) -> LocalCluster:
    return LocalCluster(**json.loads((root / STATE_FILE).read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("up", "down", "env"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state, token and logs")
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    parser.add_argument("--head-cpus", type=int, default=2)
    parser.add_argument("--worker-cpus", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "down":
        down(root=args.dir)
        return 0
    if args.command == "up":
        cluster = up(
            root=args.dir,
            workers=args.workers,
            head_cpus=args.head_cpus,
            worker_cpus=args.worker_cpus,
        )
    else:
        cluster = _load(args.dir)
    for key, value in cluster.client_env().items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
