"""A pipeline killed mid-stage (the whole process group, Ray included) resumes where it was."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jobs.test_pipeline import _args, _stage_lines

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _pipeline(run_dir: Path) -> subprocess.Popen[str]:
    # more segmenter epochs than the other tests, so that it is still training after a checkpoint
    command = [
        sys.executable,
        "-m",
        "jobs.pipeline",
        *_args(run_dir, "--set", "segmenter.epochs=6"),
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_a_pipeline_killed_while_training_the_segmenter_resumes_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    checkpoints = tmp_path / "segmenter" / "checkpoints"
    first = _pipeline(tmp_path)
    try:
        deadline = time.monotonic() + 480
        while not any(checkpoints.glob("iter_*.pt")):  # the first of 3 epochs (test_pipeline)
            assert first.poll() is None, "the pipeline ended before the segmenter checkpointed"
            assert time.monotonic() < deadline, "no segmenter checkpoint within 8 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "segmenter" / "manifest.json").exists()
    second = _pipeline(tmp_path)
    output, _ = second.communicate(timeout=480)
    assert second.returncode == 0, output[-3000:]
    lines = _stage_lines(output)
    assert lines["segmenter"] == "ran" and lines["evaluate"] == "ran"
    assert all(lines[s] == "reused" for s in ("data", "mine", "cluster", "detector", "distill"))
    log = [
        json.loads(line) for line in (tmp_path / "segmenter" / "log.jsonl").read_text().splitlines()
    ]
    resumed = [r["iteration"] for r in log if r.get("event") == "resumed"]
    assert resumed and resumed[-1] > 0
