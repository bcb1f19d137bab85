"""`ray job submit` of the tiny pipeline to a local multi-node cluster with token auth.

`cluster/local_cluster.py up` starts the head (2 CPUs, the job server) and one worker node
(1 CPU, resource `node_1`), each a `ray start --block` of this .venv in its own session and on
its own ports, with RAY_AUTH_MODE=token and a fresh token file; the job CLI gets the environment
the script prints. The job's driver is pinned to the worker node, so it joins the cluster across
nodes. `down` stops exactly those processes by id (`ray stop` would stop every Ray instance of
this user on the machine, other test runs included).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskdistill.rundir import RunDir, read_manifest
from maskdistill.stages import needed
from tests.jobs.conftest import TINY, tiny_config
from tests.jobs.test_train_detector import DETECTOR
from tests.jobs.test_train_segmenter import SEGMENTER

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local_cluster.py"
# What the working-dir upload leaves out; Ray also honours .gitignore, this holds without it.
EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".*_cache"]
OVERRIDES = (
    *TINY,
    *DETECTOR,
    *SEGMENTER,
    "detector.resources.num_workers=1",
    "segmenter.resources.num_workers=1",
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The environment of a client of the running cluster (auth mode, token path, address)."""
    root = Path(tempfile.mkdtemp(prefix="rayjob"))  # short: Ray's socket paths live under it
    state = root / "c"
    try:
        command = [sys.executable, str(SCRIPT), "up", "--dir", str(state), "--workers", "1"]
        started = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-4000:]  # `up` stops its nodes on failure
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        for line in started.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        yield env
    finally:
        if (state / "state.json").exists():
            subprocess.run([sys.executable, str(SCRIPT), "down", "--dir", str(state)], timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _request(
    env: dict[str, str], path: str, token: str | None, *, method: str = "GET"
) -> tuple[int, object]:
    """A job-server request with the bearer token when given: (HTTP status, JSON or None)."""
    request = urllib.request.Request(env["RAY_API_SERVER_ADDRESS"] + path, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None


def _token(env: dict[str, str]) -> str:
    return Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()


def _wait_for_job(env: dict[str, str], job_id: str, *, timeout: float) -> tuple[dict, str]:
    """The job's final info and its logs; a job still running at the deadline is stopped."""
    deadline = time.monotonic() + timeout
    while True:
        _, job = _request(env, f"/api/jobs/{job_id}", _token(env))
        assert isinstance(job, dict)
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    if job["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        _request(env, f"/api/jobs/{job_id}/stop", _token(env), method="POST")
    return job, _job_logs(env, job_id)


def _job_logs(env: dict[str, str], job_id: str, *, attempts: int = 15) -> str:
    """The driver's logs; the job agent can answer empty for a moment after the job ends."""
    for _ in range(attempts):
        _, logs = _request(env, f"/api/jobs/{job_id}/logs", _token(env))
        if isinstance(logs, dict) and logs.get("logs"):
            return str(logs["logs"])
        time.sleep(2)
    return ""


def test_the_job_server_wants_the_token(cluster: dict[str, str]) -> None:
    assert cluster["RAY_AUTH_MODE"] == "token"
    assert _request(cluster, "/api/jobs/", token=None)[0] == 401
    assert _request(cluster, "/api/jobs/", token="not-the-token")[0] == 403
    assert _request(cluster, "/api/jobs/", token=_token(cluster))[0] == 200


def test_submitted_pipeline_succeeds_and_writes_every_stage(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    entrypoint = ["python", "-m", "jobs.pipeline", "--config", "configs/demo.yaml"]
    for item in (*OVERRIDES, f"run_dir={run_dir}"):
        entrypoint += ["--set", item]
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait"]
    submit += ["--submission-id", "tiny-pipeline", "--working-dir", str(REPO)]
    submit += ["--runtime-env-json", json.dumps({"excludes": EXCLUDES})]
    submit += ["--entrypoint-resources", json.dumps({"node_1": 1})]  # the driver off the head
    submitted = subprocess.run(
        [*submit, "--", *entrypoint], env=cluster, capture_output=True, text=True, timeout=120
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]

    job, logs = _wait_for_job(cluster, "tiny-pipeline", timeout=420)
    assert job["status"] == "SUCCEEDED", logs[-6000:]
    _, nodes = _request(cluster, "/api/v0/nodes?detail=true", _token(cluster))
    assert isinstance(nodes, dict)
    rows = nodes["data"]["result"]["result"]
    (worker,) = [n["node_id"] for n in rows if "node_1" in n["resources_total"]]
    assert job["driver_node_id"] == worker
    summary = [line.split()[:2] for line in logs.splitlines()]
    for stage in needed(tiny_config(run_dir, *OVERRIDES)):  # not pretrain, refine: both off
        assert [stage, "ran"] in summary, f"{stage} missing from the job's summary table"
        manifest = read_manifest(RunDir(str(run_dir)), stage)
        assert manifest is not None and manifest.outputs > 0, stage
    assert (run_dir / "segmenter" / "model.pt").exists()
