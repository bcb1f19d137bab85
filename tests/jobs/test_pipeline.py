from pathlib import Path

import pytest

from jobs import pipeline
from tests.jobs.conftest import DEMO, TINY
from tests.jobs.test_train_detector import DETECTOR
from tests.jobs.test_train_segmenter import SEGMENTER

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def _stage_lines(output: str) -> list[list[str]]:
    return [line.split()[:2] for line in output.splitlines()[-6:]]


def test_pipeline_runs_every_stage_then_reuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--config", str(DEMO)]
    overrides = (*TINY, *DETECTOR, *SEGMENTER, "detector.num_workers=1", "segmenter.num_workers=1")
    for item in (*overrides, f"run_dir={tmp_path}"):
        args += ["--set", item]
    assert pipeline.main(args) == 0
    assert _stage_lines(capsys.readouterr().out) == [
        ["data", "ran"],
        ["mine", "ran"],
        ["cluster", "ran"],
        ["detector", "ran"],
        ["distill", "ran"],
        ["segmenter", "ran"],
    ]
    assert (tmp_path / "config.yaml").exists()
    assert (tmp_path / "cluster" / "train.parquet").exists()
    assert pipeline.main(args) == 0
    assert _stage_lines(capsys.readouterr().out) == [
        ["data", "reused"],
        ["mine", "reused"],
        ["cluster", "reused"],
        ["detector", "reused"],
        ["distill", "reused"],
        ["segmenter", "reused"],
    ]
