import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from jobs import cluster, distill, mine, train_detector
from maskdistill.config import ExperimentConfig
from maskdistill.engine import MetricsLog, lr_factor, scaled_lr
from maskdistill.outputs import mined_folder, read_labeled, read_pseudo
from maskdistill.pseudolabels import confident_masks, decode_label_map
from maskdistill.rundir import RunDir, read_manifest, stage_state
from maskdistill.shards import finished_shards
from maskdistill.stages import fingerprint
from tests.jobs.conftest import tiny_config
from tests.jobs.training import fail_once_then_resume

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

DETECTOR = (
    "clustering.num_clusters=3",
    "detector.arch=maskrcnn_resnet18_fpn",
    "detector.init=none",
    "detector.train_short_side=[48, 64]",
    "detector.test_short_side=48",
    "detector.max_size=96",
    "detector.proposals_per_image=50",
    "detector.test_proposals_per_image=50",
    "detector.roi_batch_size=32",
    "detector.detections_per_image=10",
    "detector.batch_size=2",
    "detector.resources.num_workers=2",
    "detector.resources.cpus_per_worker=1",
    "detector.resources.use_gpu=false",
    "detector.max_iters=6",
    "detector.checkpoint_every=2",
    "detector.resources.max_failures=1",
    "detector.resources.loader_workers=1",
    "detector.schedule={base_lr: 0.004, reference_batch: 2, warmup_iters: 2, milestones: [5]}",
    "pseudo_labels.resources.num_gpus=0",
    "pseudo_labels.resources.batch_size=4",
    "pseudo_labels.tau=0.5",
)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    config = tiny_config(tmp_path_factory.mktemp("run"), *DETECTOR)
    mine.run_stage(config, preview=0)
    cluster.run_stage(config)
    return config


def test_the_detector_reads_its_masks_a_row_group_at_a_time(clustered: ExperimentConfig) -> None:
    """Its workers get an index of the cluster file's row groups (one per mine part), not the
    rows; with a window of 1 row a loader process caches at most 1 + 2 x 5 of the 12."""
    run = RunDir(clustered.run_dir)
    windowed = clustered.model_copy(deep=True)
    windowed.detector.shuffle_window = 1
    rows = train_detector.training_rows(windowed, run)
    parts = len(finished_shards(run, mined_folder("train")))
    assert parts == 3 and len(rows.groups) == parts  # 12 images, mining.shard_size 5
    assert rows.cache_rows == 11 and len(rows) == 12
    table = read_labeled(run, "train")
    assert [rows[i] for i in range(12)] == table.select(rows.columns).to_pylist()


def test_failed_worker_group_resumes_at_the_same_iteration_and_lr(
    clustered: ExperimentConfig, tmp_path: Path
) -> None:
    _, steps, resumed = fail_once_then_resume(
        train_detector.run_stage, clustered, "detector", 4, tmp_path
    )
    run = RunDir(clustered.run_dir)
    assert [r["iteration"] for r in steps] == list(range(6))
    assert resumed == [4]
    schedule = clustered.detector.schedule
    expected = [scaled_lr(schedule, 2) * lr_factor(schedule, i) for i in range(6)]
    assert [r["lr"] for r in steps] == pytest.approx(expected)
    assert all(r["loss"] == r["loss"] for r in steps), "finite losses"
    assert run.exists("detector", "model.pt")
    assert train_detector.run_stage(clustered) is None, "complete: skipped"


def _stop_at(iteration: int) -> Callable[[int], None]:
    def hook(at: int) -> None:
        if at == iteration:
            raise RuntimeError(f"stopped at iteration {iteration}")

    return hook


def test_a_stopped_run_resumes_on_another_worker_count_at_the_same_iteration_and_lr(
    clustered: ExperimentConfig, tmp_path: Path
) -> None:
    for stage in ("mine", "cluster"):  # the same finished upstream stages, in a run of its own
        shutil.copytree(Path(clustered.run_dir) / stage, tmp_path / stage)
    two = clustered.model_copy(update={"run_dir": str(tmp_path)}, deep=True)
    two.detector.resources.max_failures = 0
    with pytest.raises(Exception, match="stopped at iteration 3"):  # after the checkpoint at 2
        train_detector.run_stage(two, hooks=[_stop_at(3)])
    one = two.model_copy(deep=True)
    one.detector.resources.num_workers = 1
    assert stage_state(RunDir(str(tmp_path)), fingerprint(one, "detector")) == "partial"
    assert train_detector.run_stage(one) is not None
    log = MetricsLog(str(tmp_path / "detector" / "log.jsonl")).read()
    assert [r["iteration"] for r in log if r.get("event") == "resumed"] == [2]
    steps = [r for r in log if "event" not in r]
    assert [r["iteration"] for r in steps] == list(range(6))
    schedule = clustered.detector.schedule
    expected = [scaled_lr(schedule, 2) * lr_factor(schedule, i) for i in range(6)]
    assert [r["lr"] for r in steps] == pytest.approx(expected), "global batch 2 on 2 or 1 workers"


def test_distill_writes_one_pseudo_label_row_per_image(clustered: ExperimentConfig) -> None:
    if read_manifest(RunDir(clustered.run_dir), "detector") is None:
        train_detector.run_stage(clustered)
    manifest = distill.run_stage(clustered)
    assert manifest is not None and manifest.outputs == 16
    run = RunDir(clustered.run_dir)
    for split, count in (("train", 12), ("val", 4)):
        rows = read_pseudo(run, split).to_pylist()
        assert sorted(r["image_id"] for r in rows) == [f"{split}_{i:06d}" for i in range(count)]
        for row in rows:
            label = decode_label_map(row["label_png"])
            assert label.shape == (row["height"], row["width"]) == (48, 64)
            assert set(label.flat) <= {0, 1, 2, 3}
            assert row["kept"] >= min(1, len(row["candidate_score"]))
            assert len(row["candidate_rle"]) == len(row["candidate_class"])
    gallery = json.loads((Path(clustered.run_dir) / "distill/gallery/gallery.json").read_text())
    train = {row["image_id"]: row for row in read_pseudo(run, "train").to_pylist()}
    assert gallery["total"] == sum(row["kept"] for row in train.values())
    assert sum(entry["size"] for entry in gallery["clusters"]) == gallery["total"]
    for entry in gallery["clusters"]:
        typical = [t["score"] for t in entry["typical"]]
        assert typical == sorted(typical, reverse=True)
        for tile in entry["typical"] + entry["least_typical"]:
            row = train[tile["image_id"]]
            kept = confident_masks(np.array(row["candidate_score"]), tau=0.5)
            assert tile["candidate"] in kept.tolist(), "only the confident masks"
            assert row["candidate_class"][tile["candidate"]] == entry["cluster"]
            assert tile["score"] == pytest.approx(row["candidate_score"][tile["candidate"]])
