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
import functools
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
NODE_TRIES = 3  # starts of one node, each on fresh ports, before `up` gives up


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


class NodeExited(RuntimeError):
    """A node's `ray start --block` process ended while `up` waited for it."""

    def __init__(self, what: str, pid: int, log: Path) -> None:
        self.pid = pid
        self.log = log
        super().__init__(f"a node exited while waiting for {what}; {log}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    """The last lines of a node's log, for the error a CI run shows (its files are gone after)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(unreadable: {err})"


def _wait(what: str, ready: Callable[[], bool], *, logs: dict[int, Path], timeout: float) -> None:
    """Poll `ready` each second; NodeExited names the node that ended, with its log's tail."""
    deadline = time.monotonic() + timeout
    while not ready():
        for pid, log in logs.items():
            if not _running(pid):
                raise NodeExited(what, pid, log)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} not ready after {timeout:.0f} s; see {', '.join(map(str, logs.values()))}"
            )
        time.sleep(1)


def _launch(
    name: str,
    make_args: Callable[[], list[str]],
    ready: Callable[[list[str]], bool],
    *,
    env: dict[str, str],
    root: Path,
    logs: dict[int, Path],
    on_start: Callable[[list[str]], None],
    timeout: float,
) -> list[str]:
    """Start one node and wait until `ready(args)`; return its arguments.

    Free ports are drawn, released, then bound by Ray: another process can take one in between,
    and the node exits at start. Such a node is started again on fresh ports, NODE_TRIES times
    at most; any other node's exit, or the last try's, is an error.
    """
    for attempt in range(1, NODE_TRIES + 1):
        args = make_args()
        log = root / (f"{name}.log" if attempt == 1 else f"{name}.try{attempt}.log")
        pid = _start_node(args, env=env, log=log)
        logs[pid] = log
        on_start(args)
        try:
            _wait(name, functools.partial(ready, args), logs=logs, timeout=timeout)
            return args
        except NodeExited as exited:
            if exited.pid != pid or attempt == NODE_TRIES:
                raise
            print(f"{exited}\nstarting {name} again on fresh ports", file=sys.stderr)
            _signal_group(pid, signal.SIGKILL)
            del logs[pid]
            on_start(args)
    raise AssertionError("unreachable")


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
    logs: dict[int, Path] = {}  # pid of each node's `ray start --block` -> its log, head first

    def head_flags() -> list[str]:
        return [
            "--head",
            *_port_flags((*HEAD_PORTS, *NODE_PORTS)),  # one draw: no port handed out twice
            "--include-dashboard=true",  # the job server lives in the dashboard
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={root / 'ray'}",
            f"--num-cpus={head_cpus}",
            f"--object-store-memory={object_store_bytes}",
            "--min-worker-port=0",  # worker processes on OS-chosen ports: no clash between nodes
            "--max-worker-port=0",
        ]

    def job_server_up(args: list[str]) -> bool:
        dashboard = _cluster(root, args, token_path, []).dashboard
        return _get_json(f"{dashboard}/api/jobs/", token) is not None

    def save(head_args: list[str]) -> None:
        _save(_cluster(root, head_args, token_path, list(logs)))

    try:
        head_args = _launch(
            "head",
            head_flags,
            job_server_up,
            env=env,
            root=root,
            logs=logs,
            on_start=save,
            timeout=timeout,
        )
        cluster = _cluster(root, head_args, token_path, list(logs))
        for i in range(1, workers + 1):

            def worker_flags(i: int = i) -> list[str]:
                return [
                    f"--address={cluster.gcs_address}",
                    f"--num-cpus={worker_cpus}",
                    f"--resources={json.dumps({f'node_{i}': 1})}",
                    f"--object-store-memory={object_store_bytes}",
                    "--min-worker-port=0",
                    "--max-worker-port=0",
                    *_port_flags(NODE_PORTS),
                ]

            _launch(
                f"worker_{i}",
                worker_flags,
                functools.partial(_nodes_alive, cluster, token, i + 1),
                env=env,
                root=root,
                logs=logs,
                on_start=lambda _args: save(head_args),
                timeout=timeout,
            )
    except BaseException:
        if (root / STATE_FILE).exists():
            down(root=root)
        raise
    return _cluster(root, head_args, token_path, list(logs))


def _nodes_alive(cluster: LocalCluster, token: str, count: int, _args: list[str]) -> bool:
    return _alive_nodes(cluster.dashboard, token) >= count


def _cluster(root: Path, head_args: list[str], token_path: Path, pids: list[int]) -> LocalCluster:
    """The cluster whose head was started with `head_args` (its ports are read back from them)."""
    flags = dict(arg.split("=", 1) for arg in head_args if "=" in arg)
    return LocalCluster(
        root=str(root),
        gcs_address=f"127.0.0.1:{flags['--port']}",
        dashboard=f"http://127.0.0.1:{flags['--dashboard-port']}",
        token_path=str(token_path),
        pids=pids,
    )


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
