"""The evaluate stage as a Ray generator task: skips reach the manifest shard by shard."""

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import evaluate as stage
from maskdistill.config import ExperimentConfig
from maskdistill.evaluate import MINED, Evaluated, Skips
from maskdistill.rundir import RunDir, read_manifest
from tests.evaluation_run import write_scored_run
from tests.test_evaluate_shards import VAL_MIOU

pytestmark = pytest.mark.usefixtures("ray_cluster")

SHARDS, PER_SHARD = 3, 1500


def _many_skips(config: ExperimentConfig) -> Iterator[Skips | Evaluated]:
    for shard in range(SHARDS):
        yield [(f"img_{shard}_{i:05d}", f"reason {i % 2}: detail") for i in range(PER_SHARD)]
    yield Evaluated({MINED: {"miou": 0.5}}, scored=7)


def test_the_stage_scores_the_run_in_a_generator_task(tmp_path: Path) -> None:
    config = write_scored_run(
        tmp_path, "evaluation.linear_probe=false", "evaluation.resources.num_cpus=1"
    )
    manifest = stage.run_stage(config)
    assert manifest is not None and manifest.outputs == manifest.inputs == 10
    assert manifest.metrics[f"miou {MINED}"] == pytest.approx(VAL_MIOU[MINED], abs=1e-11)
    assert manifest.skipped.total == 0


def test_each_shards_skips_go_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_scored_run(tmp_path, "evaluation.resources.num_cpus=1")
    monkeypatch.setattr(stage, "evaluate_stream", _many_skips)
    manifest = stage.run_stage(config)
    assert manifest is not None
    assert (manifest.inputs, manifest.outputs) == (7 + SHARDS * PER_SHARD, 7)
    assert manifest.metrics == {f"miou {MINED}": 0.5}
    saved = read_manifest(RunDir(config.run_dir), "evaluate")
    assert saved is not None and saved.skipped.counts == {"reason 0": 2250, "reason 1": 2250}
    listed = pq.read_table(tmp_path / "evaluate" / "skipped.parquet")
    assert listed.num_rows == SHARDS * PER_SHARD
    assert listed.column("image_id")[PER_SHARD].as_py() == "img_1_00000"  # in stream order
