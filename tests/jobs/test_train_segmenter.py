from pathlib import Path

import numpy as np
import pytest

from jobs import cluster, distill, mine, train_detector, train_segmenter
from maskdistill.config import ExperimentConfig
from maskdistill.engine import MetricsLog, lr_factor, scaled_lr
from maskdistill.rundir import RunDir
from tests.jobs.conftest import tiny_config
from tests.jobs.test_train_detector import DETECTOR, FailOnce

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

SEGMENTER = (
    "detector.max_iters=2",
    "segmenter.backbone=resnet18",
    "segmenter.init=none",
    "segmenter.crop_size=48",
    "segmenter.batch_size=4",
    "segmenter.num_workers=2",
    "segmenter.cpus_per_worker=1",
    "segmenter.use_gpu=false",
    "segmenter.epochs=3",
    "segmenter.schedule={base_lr: 0.004, reference_batch: 4, milestones: [2]}",
    "segmenter.loader_threads=1",
    "segmenter.max_failures=1",
)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    config = tiny_config(tmp_path_factory.mktemp("run"), *DETECTOR, *SEGMENTER)
    mine.run_stage(config, preview=0)
    cluster.run_stage(config)
    train_detector.run_stage(config)
    distill.run_stage(config)
    return config


def test_segmenter_resumes_after_a_failure_with_the_same_lr(
    distilled: ExperimentConfig, tmp_path: Path
) -> None:
    # 12 train images, batch 4: 3 iterations an epoch, 9 in all, checkpoints after 3 and 6.
    hook = FailOnce(6, str(tmp_path / "failed"))
    manifest = train_segmenter.run_stage(distilled, hooks=[hook])
    assert manifest is not None and (tmp_path / "failed").exists()
    run = RunDir(distilled.run_dir)
    log = MetricsLog(run.uri_of("segmenter", "log.jsonl")).read()
    steps = [r for r in log if "event" not in r]
    assert [r["iteration"] for r in steps] == list(range(9))
    assert [r["iteration"] for r in log if r.get("event") == "resumed"] == [6]
    _, _, schedule = train_segmenter.iteration_schedule(distilled, 12)
    assert schedule.milestones == [6]
    expected = [scaled_lr(schedule, 4) * lr_factor(schedule, i) for i in range(9)]
    assert [r["lr"] for r in steps] == pytest.approx(expected)
    assert all(r["loss_seg"] == r["loss_seg"] and r["loss_seg"] >= 0 for r in steps)
    segmenter = train_segmenter.load_segmenter(distilled)
    assert segmenter.class_names[0] == "background"
    image = np.zeros((37, 45, 3), dtype=np.uint8)
    (labels,) = segmenter.segment([image])
    assert labels.shape == (37, 45) and labels.max() < segmenter.num_classes
