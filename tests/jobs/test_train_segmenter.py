import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import (
    cluster,
    distill,
    evaluate,
    mine,
    segmenter_training,
    train_detector,
    train_segmenter,
)
from maskdistill import evaluate as tables
from maskdistill.config import ExperimentConfig
from maskdistill.engine import lr_factor, scaled_lr
from maskdistill.inference import Segmenter
from maskdistill.outputs import num_clusters, pseudo_folder, read_pseudo, read_weights
from maskdistill.rundir import RunDir, read_manifest
from maskdistill.rundir import stage_state as state
from maskdistill.shards import part_uris
from maskdistill.stages import fingerprint, stage_hashes
from tests.jobs.conftest import tiny_config
from tests.jobs.test_train_detector import DETECTOR
from tests.jobs.training import fail_once_then_resume

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

SEGMENTER = (
    "detector.max_iters=2",
    "segmenter.backbone=resnet18",
    "segmenter.init=none",
    "segmenter.crop_size=48",
    "segmenter.batch_size=4",
    "segmenter.resources.num_workers=2",
    "segmenter.resources.cpus_per_worker=1",
    "segmenter.resources.use_gpu=false",
    "segmenter.epochs=3",
    "segmenter.schedule={base_lr: 0.004, reference_batch: 4, milestones: [2]}",
    "segmenter.resources.loader_workers=1",
    "segmenter.resources.max_failures=1",
    "pseudo_labels.shard_size=5",
)


EVALUATION = (
    "evaluation.resources.num_gpus=0",
    "evaluation.resources.num_cpus=1",
    "evaluation.resources.batch_size=3",
    "evaluation.linear_probe=true",
    "evaluation.probe_epochs=2",
    "evaluation.probe_batch_size=4",
    "evaluation.probe_milestones=[1]",
    "evaluation.crf=true",
    "evaluation.num_overlays=2",
)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    config = tiny_config(tmp_path_factory.mktemp("run"), *DETECTOR, *SEGMENTER)
    mine.run_stage(config, preview=0)
    cluster.run_stage(config)
    train_detector.run_stage(config)
    distill.run_stage(config)
    return config


def test_the_segmenter_reads_its_labels_a_part_at_a_time(distilled: ExperimentConfig) -> None:
    """Its workers get an index of distill's parts (one row group each), not the label maps."""
    run = RunDir(distilled.run_dir)
    rows = segmenter_training.training_rows(distilled, run)
    parts = part_uris(run, pseudo_folder("train"))
    assert [g.uri for g in rows.groups] == parts and len(parts) > 1
    table = read_pseudo(run, "train", ["image_id", "label_png"])
    assert [rows[i] for i in range(len(rows))] == table.to_pylist()


def test_segmenter_resumes_after_a_failure_with_the_same_lr(
    distilled: ExperimentConfig, tmp_path: Path
) -> None:
    # 12 train images, batch 4: 3 iterations an epoch, 9 in all, checkpoints after 3 and 6.
    _, steps, resumed = fail_once_then_resume(
        train_segmenter.run_stage, distilled, "segmenter", 6, tmp_path
    )
    assert [r["iteration"] for r in steps] == list(range(9))
    assert resumed == [6]
    _, _, schedule = segmenter_training.iteration_schedule(distilled, 12)
    assert schedule.milestones == [6]
    expected = [scaled_lr(schedule, 4) * lr_factor(schedule, i) for i in range(9)]
    assert [r["lr"] for r in steps] == pytest.approx(expected)
    assert all(r["loss_seg"] == r["loss_seg"] and r["loss_seg"] >= 0 for r in steps)
    segmenter = Segmenter.load(distilled.run_dir, config=distilled)
    assert segmenter.class_names[0] == "background"
    image = np.zeros((37, 45, 3), dtype=np.uint8)
    (labels,) = segmenter.segment([image])
    assert labels.shape == (37, 45) and labels.max() < segmenter.num_classes


def test_evaluate_scores_every_stage_and_writes_tables_and_pictures(
    distilled: ExperimentConfig,
) -> None:
    train_segmenter.run_stage(distilled)  # trained already when the resume test ran first
    config = tiny_config(Path(distilled.run_dir), *DETECTOR, *SEGMENTER, *EVALUATION)
    manifest = evaluate.run_stage(config)
    assert manifest is not None and manifest.outputs == 4 and not manifest.skipped
    run = RunDir(config.run_dir)
    metrics = json.loads(run.read_bytes("evaluate", "metrics.json"))
    rows = (tables.MINED, tables.DETECTOR, tables.SEGMENTER, tables.CRF, tables.PROBE)
    for row in rows:
        assert 0.0 <= metrics[row]["miou"] <= 1.0
        assert len(metrics[row]["iou"]) == 1 + config.data.synthetic.num_classes
    assert set(metrics["mask AP"]) == {
        f"{source} {setting} {kind}"
        for source in ("mined", "detector")
        for setting in ("multi", "single")
        for kind in ("class-agnostic", "semantic")
    }
    names = run.read_json("evaluate", "class_names.json")["names"]
    assert len(names) == len(metrics[tables.SEGMENTER]["mapping"]) and names[0]
    for picture in ("confusion.png", "overlays.png"):
        assert Image.open(run.uri_of("evaluate", picture)).size[0] > 100
    table = run.read_bytes("evaluate", "table1.md").decode()
    assert all(row in table for row in rows)
    assert read_manifest(run, "evaluate") is not None
    assert evaluate.run_stage(config) is None  # complete: skipped


def test_merged_and_background_clusters_retrain_only_the_segmenter(
    distilled: ExperimentConfig, tmp_path: Path
) -> None:
    train_segmenter.run_stage(distilled)
    copy = tmp_path / "named"
    shutil.copytree(distilled.run_dir, copy)
    config = distilled.model_copy(update={"run_dir": str(copy)})
    run = RunDir(str(copy))
    before = stage_hashes(config)
    (copy / "names.yaml").write_text('clusters:\n  0: "dog"\n  1: "cat"\n')
    assert stage_hashes(config) == before  # names alone: nothing to retrain
    assert all(state(run, fingerprint(config, s)) == "done" for s in ("detector", "segmenter"))
    (copy / "names.yaml").write_text('clusters:\n  0: "dog"\n  1: 0\n  2: "background"\n')
    assert stage_hashes(config)["detector"] == before["detector"]
    assert state(run, fingerprint(config, "segmenter")) == "stale"
    assert train_segmenter.run_stage(config) is not None
    weights = read_weights(run, "segmenter")
    clusters = num_clusters(run)  # 6 classes in the tiny demo: 6 clusters
    # Cluster 1 joins 0, cluster 2 is background: one class fewer and one dropped.
    assert weights["num_classes"] == 1 + clusters - 2
    assert weights["cluster_labels"] == [1, 1, 0, *range(2, clusters - 1)]
    segmenter = Segmenter.load(str(copy), config=config)
    assert segmenter.class_names[:2] == ["background", "dog"]
    assert segmenter.num_classes == clusters - 1


def test_best_on_val_keeps_the_best_epoch_and_evaluation_marks_it(
    distilled: ExperimentConfig, tmp_path: Path
) -> None:
    copy = tmp_path / "selected"
    shutil.copytree(distilled.run_dir, copy, ignore=shutil.ignore_patterns("segmenter", "evaluate"))
    config = tiny_config(
        copy, *DETECTOR, *SEGMENTER, *EVALUATION, "segmenter.select=best_on_val",
        "evaluation.linear_probe=false", "evaluation.crf=false",
    )  # fmt: skip
    assert train_segmenter.run_stage(config) is not None
    run = RunDir(str(copy))
    record = run.read_json("segmenter", "selection.json")
    # 3 iterations an epoch, a checkpoint each: iterations 3, 6 and 9 scored on val
    assert sorted(int(it) for it in record["scores"]) == [3, 6, 9]
    best = max(record["scores"].items(), key=lambda item: (item[1], -int(item[0])))
    assert record["iteration"] == int(best[0])
    weights = read_weights(run, "segmenter")
    assert weights["selection"]["iteration"] == record["iteration"]
    kept = torch.load(run.uri_of("segmenter", "best.pt"), map_location="cpu")
    assert all(torch.equal(kept[k], weights["model"][k]) for k in kept)
    evaluate.run_stage(config)
    metrics = json.loads(run.read_bytes("evaluate", "metrics.json"))
    assert metrics[tables.SELECTION]["iteration"] == record["iteration"]
    assert "selected on the evaluation set" in run.read_bytes("evaluate", "table1.md").decode()
