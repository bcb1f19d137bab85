from pathlib import Path

import pytest

from jobs import pipeline
from maskdistill import cli
from maskdistill.rundir import RunDir, read_manifest
from tests.jobs.conftest import DEMO, TINY
from tests.jobs.test_train_detector import DETECTOR
from tests.jobs.test_train_segmenter import SEGMENTER

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

OVERRIDES = (
    *TINY,
    *DETECTOR,
    *SEGMENTER,
    "detector.resources.num_workers=1",
    "segmenter.resources.num_workers=1",
    "evaluation.resources.num_gpus=0",
    "evaluation.linear_probe=false",
)


# Every resource setting of the stages above, changed: a rerun reuses every stage.
OTHER_RESOURCES = (
    "mining.resources.concurrency=2",
    "mining.resources.num_cpus=0.5",
    "mining.resources.batch_size=2",
    "detector.resources.num_workers=2",
    "detector.resources.loader_threads=3",
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
    """Stage -> ran/reused from the summary table at the end of the output."""
    table = output[output.rindex("stage ") :].splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in table if line.strip()}


def _args(run_dir: Path, *extra: str) -> list[str]:
    args = ["--config", str(DEMO), *extra]
    for item in (*OVERRIDES, f"run_dir={run_dir}"):
        args += ["--set", item]
    return args


def test_pipeline_runs_every_stage_then_reuses_them_and_reruns_from_a_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pipeline.main(_args(tmp_path)) == 0
    stages = [s for s in pipeline.NAMES if s != "pretrain"]  # off: backbone.weights is random
    assert _stage_lines(capsys.readouterr().out) == dict.fromkeys(stages, "ran")
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
