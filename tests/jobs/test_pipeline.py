import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs import pipeline
from maskdistill import cli, console
from maskdistill.rundir import RunDir, read_manifest
from tests.jobs.conftest import DEMO, TINY
from tests.jobs.test_train_detector import DETECTOR
from tests.jobs.test_train_segmenter import SEGMENTER

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

OVERRIDES = (
    *TINY,
    *DETECTOR,
    *SEGMENTER,
    "segmenter.epochs=1",
    "detector.resources.num_workers=1",
    "segmenter.resources.num_workers=1",
    "evaluation.resources.num_gpus=0",
    "evaluation.linear_probe=false",
)
REPO = Path(__file__).resolve().parents[2]
# Ray's own lines that the console of a run without --verbose must not show
RAY_LINES = ("Started a local Ray instance", "streaming_executor", "core_worker")


# Every resource setting of the stages above, changed: a rerun reuses every stage.
OTHER_RESOURCES = (
    "mining.resources.concurrency=2",
    "mining.resources.num_cpus=0.5",
    "mining.resources.batch_size=2",
    "detector.resources.num_workers=2",
    "detector.resources.loader_workers=3",
    "detector.resources.max_failures=5",
    "detector.resources.log_every=1",
    "pseudo_labels.resources.concurrency=2",
    "pseudo_labels.resources.batch_size=1",
    "segmenter.resources.num_workers=2",
    "segmenter.resources.cpus_per_worker=0.5",
    "evaluation.resources.batch_size=1",
    "evaluation.resources.num_cpus=0.5",
)


def _stage_lines(output: str) -> dict[str, str]:
    """Stage -> ran/reused from the summary table at the end of the output (Table 1 follows it,
    after a blank line)."""
    table = output[output.rindex("stage ") :].split("\n\n")[0].splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in table if line.strip()}


def _args(run_dir: Path, *extra: str) -> list[str]:
    args = ["--config", str(DEMO), *extra]
    for item in (*OVERRIDES, f"run_dir={run_dir}"):
        args += ["--set", item]
    return args


def _demo_console(run_dir: Path) -> str:
    """What `python -m jobs.demo` prints (stdout and stderr) in a process of its own, with a
    Ray of its own, as a person running `make demo` sees it."""
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are capped
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.demo", *_args(run_dir)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=400,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-5000:]
    return done.stdout


def test_the_demo_console_is_short_then_the_pipeline_reuses_and_reruns_from_a_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _demo_console(tmp_path)
    # off: backbone.weights is random, self_training.rounds 0
    stages = [s for s in pipeline.NAMES if s not in ("pretrain", "refine")]
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert "\r" not in out, "no tqdm redraws in a file"
    for number, name in enumerate(stages, start=1):
        assert f"== stage {number}/7: {name} ==" in out
        assert f"== {name}: done in " in out
    assert _stage_lines(out) == dict.fromkeys(stages, "ran")
    assert "| method | mIoU (%) |" in out and "+ DeepLab-v3" in out  # Table 1
    assert "service answer for one held-out image" in out
    for internal in RAY_LINES:
        assert internal not in out, internal
    for line in lines:  # no worker output, no Ray or Serve log records (they carry a time)
        assert "pid=" not in line and "(raylet)" not in line, line
        assert not re.search(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d", line), line
    log = (tmp_path / "logs" / console.LOG_FILE).read_text()
    for internal in RAY_LINES:
        assert internal in log, internal
    assert (tmp_path / "logs" / "ray").is_symlink(), "a link to the Ray session's logs"
    assert (tmp_path / "config.yaml").exists()
    assert (tmp_path / "evaluate" / "metrics.json").exists()
    assert pipeline.main(_args(tmp_path)) == 0
    assert _stage_lines(capsys.readouterr().out) == dict.fromkeys(stages, "reused")
    resized = [arg for item in OTHER_RESOURCES for arg in ("--set", item)]
    assert pipeline.main(_args(tmp_path, *resized)) == 0
    assert _stage_lines(capsys.readouterr().out) == dict.fromkeys(stages, "reused")
    assert cli.main(["status", str(tmp_path), "--set", "mining.top_k=0.3"]) == 0
    states = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert states == {"data": "done", **dict.fromkeys(stages[1:], "stale")}
    run = RunDir(str(tmp_path))
    cluster_started = read_manifest(run, "cluster").started_at  # type: ignore[union-attr]
    assert pipeline.main(_args(tmp_path, "--from", "segmenter")) == 0
    lines = _stage_lines(capsys.readouterr().out)
    assert lines["segmenter"] == "ran" and lines["evaluate"] == "ran"
    assert lines["distill"] == "reused"
    assert read_manifest(run, "cluster").started_at == cluster_started  # type: ignore[union-attr]
    assert pipeline.main(_args(tmp_path, "--only", "evaluate", "--force")) == 0
    assert _stage_lines(capsys.readouterr().out)["evaluate"] == "ran"


def test_only_refuses_when_an_earlier_stage_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="stage 'data' is missing"):
        pipeline.main(_args(tmp_path, "--only", "cluster"))
