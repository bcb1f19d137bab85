from pathlib import Path

import pytest
import torch

from jobs import pretrain
from maskdistill.backbones import build_backbone
from maskdistill.config import ExperimentConfig
from maskdistill.engine import Checkpointer
from maskdistill.outputs import PRETRAINED_BACKBONE, backbone_weights
from maskdistill.pretrain import build_dino, teacher_backbone
from maskdistill.rundir import RunDir
from maskdistill.stages import pretrain_wanted, stage_hashes
from tests.jobs.conftest import tiny_config
from tests.jobs.training import fail_once_then_resume

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

# 12 train images, batch 4 over 2 workers: 3 iterations an epoch, 9 in all, checkpoints every
# epoch (after 3 and 6, then 9).
PRETRAIN = (
    "backbone.weights=pretrain",
    "pretrain.epochs=3",
    "pretrain.warmup_epochs=1",
    "pretrain.batch_size=4",
    "pretrain.lr=0.05",
    "pretrain.global_crop_size=32",
    "pretrain.local_crops=2",
    "pretrain.local_crop_size=16",
    "pretrain.out_dim=64",
    "pretrain.hidden_dim=32",
    "pretrain.bottleneck_dim=16",
    "pretrain.checkpoint_every_epochs=1",
    "pretrain.resources.num_workers=2",
    "pretrain.resources.cpus_per_worker=1",
    "pretrain.resources.use_gpu=false",
    "pretrain.resources.loader_workers=1",
    "pretrain.resources.max_failures=1",
    "pretrain.attention_images=2",
)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    return tiny_config(tmp_path_factory.mktemp("run"), *PRETRAIN)


def test_pretraining_resumes_after_a_failure_and_exports_the_teacher(
    config: ExperimentConfig, tmp_path: Path
) -> None:
    manifest, steps, resumed = fail_once_then_resume(
        pretrain.run_stage, config, "pretrain", 6, tmp_path
    )
    run = RunDir(config.run_dir)
    assert [r["iteration"] for r in steps] == list(range(9))
    assert resumed == [6]
    schedules = pretrain.schedules_for(config, 12)
    assert [r["lr"] for r in steps] == pytest.approx(list(schedules.lr))
    assert all(r["loss_dino"] == r["loss_dino"] for r in steps), "finite losses"
    assert manifest.outputs == 9 and manifest.inputs == 12
    assert run.exists("pretrain", "attention.png")

    # The exported file is the final checkpoint's teacher, loaded strictly as mining loads it.
    assert backbone_weights(config) == run.uri_of(*PRETRAINED_BACKBONE)
    loaded = build_backbone(config.backbone.arch, weights=backbone_weights(config))
    dino = build_dino(arch=config.backbone.arch, config=config.pretrain)
    checkpoints = Checkpointer(run.uri_of("pretrain", "checkpoints"))
    dino.load_state_dict(Checkpointer.load(str(checkpoints.latest()))["model"])
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected, got = teacher_backbone(dino)(images), loaded(images)
    assert torch.equal(got.q, expected.q) and torch.equal(got.k, expected.k)
    assert pretrain.run_stage(config) is None, "complete: skipped"


def test_mining_reruns_when_the_pretrained_backbone_changes(config: ExperimentConfig) -> None:
    longer = config.model_copy(
        update={"pretrain": config.pretrain.model_copy(update={"epochs": 4})}
    )
    hashes, changed = stage_hashes(config), stage_hashes(longer)
    assert list(hashes)[:3] == ["data", "pretrain", "mine"]
    assert changed["pretrain"] != hashes["pretrain"] and changed["mine"] != hashes["mine"]
    assert changed["data"] == hashes["data"]
    random = config.model_copy(
        update={"backbone": config.backbone.model_copy(update={"weights": "random"})}
    )
    assert not pretrain_wanted(random) and pretrain_wanted(config)
    assert "pretrain" not in stage_hashes(random)
    assert stage_hashes(random.model_copy(update={"pretrain": longer.pretrain})) == (
        stage_hashes(random)
    ), "without weights=pretrain, pretraining settings do not touch mining"
