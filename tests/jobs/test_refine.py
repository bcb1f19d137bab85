"""Stage `refine` (CRF self-training, S1) end to end on tiny data: two rounds, a failure in the
second, the rerun resuming there; then the evaluation's Table 2 "+CRF" rows.

The stages before it are stood in for (a cluster manifest with K = 6, an untrained segmenter's
model.pt, no mined or detector rows), so the test runs the refine and evaluate code alone.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from jobs import refine
from maskdistill import evaluate
from maskdistill.config import ExperimentConfig
from maskdistill.engine import MetricsLog
from maskdistill.inference import segmenter_from_config
from maskdistill.outputs import (
    LABELED_SCHEMA,
    class_map,
    labeled_path,
    read_refined,
    write_table,
    write_weights,
)
from maskdistill.pseudolabels import decode_label_map
from maskdistill.rundir import RunDir, StageManifest, write_manifest
from maskdistill.rundir import stage_state as state
from maskdistill.stages import fingerprint, progress
from tests.jobs.conftest import tiny_config

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

REFINE = (
    "segmenter.backbone=resnet18",
    "segmenter.init=none",
    "segmenter.crop_size=48",
    "segmenter.batch_size=4",
    "segmenter.epochs=2",  # 12 images, batch 4: 3 iterations an epoch, 6 a round
    "segmenter.schedule={base_lr: 0.004, reference_batch: 4, milestones: [1]}",
    "segmenter.resources.num_workers=1",
    "segmenter.resources.use_gpu=false",
    "segmenter.resources.loader_workers=0",
    "segmenter.resources.max_failures=0",  # the injected failure ends the stage
    "self_training.rounds=2",
    "self_training.shard_size=5",  # 12 train images: 3 shards
    "self_training.resources.batch_size=3",
    "self_training.resources.predictor.num_gpus=0",
    "self_training.resources.predictor.num_cpus=0.5",
    "self_training.resources.predictor.batch_size=4",
    "evaluation.resources.num_gpus=0",
    "evaluation.linear_probe=true",
    "evaluation.probe_epochs=1",
    "evaluation.probe_batch_size=4",
    "evaluation.probe_milestones=[1]",
    "evaluation.mask_ap=false",
    "evaluation.num_overlays=0",
)


class FailInRound1:
    """Raises at `iteration` of round 1's training, once (a marker file outlives the worker)."""

    def __init__(self, run_dir: str, iteration: int, marker: Path) -> None:
        self.round0 = Path(run_dir, "refine", "round_0", "model.pt")
        self.iteration, self.marker = iteration, marker

    def __call__(self, iteration: int) -> None:
        if iteration == self.iteration and self.round0.exists() and not self.marker.exists():
            self.marker.write_text("failed once")
            raise RuntimeError(f"injected failure at iteration {iteration} of round 1")


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """A run whose segmenter stage is stood in for: K = 6 clusters, an untrained segmenter."""
    config = tiny_config(tmp_path_factory.mktemp("run"), *REFINE)
    run = RunDir(config.run_dir)
    write_manifest(run, StageManifest("cluster", "stand-in", metrics={"clusters": 6}))
    classes = class_map(run)
    model = segmenter_from_config(config.segmenter, num_classes=classes.num_classes)
    write_weights(
        run,
        "segmenter",
        model.state_dict(),
        num_classes=classes.num_classes,
        cluster_labels=list(classes.labels),
    )
    val = config.data.val_split
    assert val is not None
    write_table(run, LABELED_SCHEMA.empty_table(), *labeled_path(val))  # no mined val masks
    return config


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_refine_resumes_in_the_round_it_reached(
    segmented: ExperimentConfig, tmp_path: Path
) -> None:
    run = RunDir(segmented.run_dir)
    root = Path(segmented.run_dir, "refine")
    failure = FailInRound1(segmented.run_dir, 4, tmp_path / "failed")
    with pytest.raises(Exception, match="injected failure"):
        refine.run_stage(segmented, hooks=[failure])
    assert state(run, fingerprint(segmented, "refine")) == "partial"
    # Round 1 checkpoints after each 3-iteration epoch: the failure at 4 leaves iteration 3.
    assert progress(run, "refine") == "in round 1: resumes from the checkpoint at iteration 3"
    kept = {name: _mtimes(root / name / "labels") for name in ("round_0", "round_1")}
    round0_model = (root / "round_0" / "model.pt").stat().st_mtime_ns

    manifest = refine.run_stage(segmented, hooks=[failure])
    assert manifest is not None and manifest.outputs == 12 and not manifest.skipped
    assert (root / "round_0" / "model.pt").stat().st_mtime_ns == round0_model  # not retrained
    assert {name: _mtimes(root / name / "labels") for name in kept} == kept  # labels not redone
    log = MetricsLog(run.uri_of("refine", "round_1", "log.jsonl")).read()
    assert [r["iteration"] for r in log if r.get("event") == "resumed"] == [3]
    assert [r["iteration"] for r in log if "event" not in r] == list(range(6))
    assert (root / "round_1" / "model.pt").exists()
    for r in (0, 1):
        assert 0.0 <= manifest.metrics[f"round_{r} changed"] <= 1.0
        labels = read_refined(run, r).to_pylist()
        assert sorted(row["image_id"] for row in labels) == [f"train_{i:06d}" for i in range(12)]
        for row in labels:  # segmenter labels at each image's own size
            label = decode_label_map(row["label_png"])
            assert label.shape == (48, 64) and label.max() < class_map(run).num_classes
    assert manifest.metrics["loss_seg"] == manifest.metrics["round_1 loss_seg"]
    assert refine.run_stage(segmented) is None  # complete: skipped


def test_evaluation_writes_the_crf_rows(segmented: ExperimentConfig) -> None:
    refine.run_stage(segmented)  # done already when the resume test ran first
    metrics, skipped, scored = evaluate.evaluate(segmented)
    assert scored == 4 and not skipped
    rows = (evaluate.SELF_TRAINED, evaluate.CRF_EVAL, evaluate.PROBE_CRF)
    for row in (*rows, evaluate.SEGMENTER, evaluate.PROBE):
        assert 0.0 <= metrics[row]["miou"] <= 1.0, row
    assert evaluate.CRF not in metrics  # evaluation.crf is off: the original model gets no CRF
    run = RunDir(segmented.run_dir)
    assert set(rows) <= set(json.loads(run.read_bytes("evaluate", "metrics.json")))
    table1 = run.read_bytes("evaluate", "table1.md").decode()
    assert all(f"| {row} | {100 * metrics[row]['miou']:.1f} |" in table1 for row in rows)
    table2 = run.read_bytes("evaluate", "table2.md").decode().splitlines()
    crf_row = f"| MaskDistill+CRF | {100 * metrics[evaluate.PROBE_CRF]['miou']:.1f} |"
    assert any(line.startswith(crf_row) for line in table2)
    assert np.isfinite(metrics[evaluate.CRF_EVAL]["miou"])
