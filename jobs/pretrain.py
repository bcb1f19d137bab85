"""Stage `pretrain`: DINO self-distillation of the mining ViT on the train split, with Ray Train.

    python -m jobs.pretrain --config configs/demo.yaml [--set pretrain.resources.num_workers=4]

Runs when backbone.weights is 'pretrain' (the pipeline skips it otherwise). The same contract
as the other training stages: DDP workers draw their share of the global batch by iteration,
rank 0 checkpoints student, teacher, centre, optimizer and RNG state every
`pretrain.checkpoint_every_epochs` epochs to `run_dir/pretrain/checkpoints/` and logs loss and
lr per iteration to `pretrain/log.jsonl`; a failed worker group restarts from the latest
checkpoint, a NaN loss stops the run. At the end the teacher's backbone is written to
`pretrain/backbone.pth` (DINO's release format; `backbones.backbone_weights` points mining at
it) and its last block's CLS attention on a few val images to `pretrain/attention.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray.train.torch
import torch

from jobs.common import stage_main
from jobs.training import Worker, fit_stage, latest_state, stage_runner
from maskdistill.config import ExperimentConfig
from maskdistill.data import dataset_of
from maskdistill.outputs import PRETRAINED_BACKBONE
from maskdistill.pretrain import (
    DINOSchedules,
    MultiCrop,
    PretrainBatches,
    attention_picture,
    build_dino,
    build_optimizer,
    dino_losses,
    dino_schedules,
    export_teacher,
    teacher_backbone,
)
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import PRETRAIN
from maskdistill.visualize import png_bytes

STAGE = PRETRAIN


def schedules_for(config: ExperimentConfig, num_images: int) -> DINOSchedules:
    """The per-iteration schedules for `num_images` training images (the last partial batch of
    each epoch is dropped, as DINO does)."""
    per_epoch = max(1, num_images // config.pretrain.batch_size)
    return dino_schedules(config.pretrain, iters_per_epoch=per_epoch)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, resume, train, report the last loss."""
    pre = loop_config["config"].pretrain
    worker = Worker.start(loop_config, pre)
    config, device = worker.config, worker.device
    dataset = dataset_of(config.data, config.data.train_split)
    image_ids = dataset.image_ids()
    schedules = schedules_for(config, len(image_ids))
    torch.manual_seed(config.seed)  # every rank starts from the same student and teacher
    dino = build_dino(arch=config.backbone.arch, config=pre, seed=config.seed).to(device)
    if pre.head_batch_norm and worker.world > 1 and device.type == "cuda":
        dino = torch.nn.SyncBatchNorm.convert_sync_batchnorm(dino)  # DINO syncs head BN too
    model = ray.train.torch.prepare_model(dino, move_to_device=False)
    optimizer, scheduler = build_optimizer(dino, schedules, clip_grad=pre.clip_grad)

    batches = PretrainBatches(
        dataset,
        image_ids,
        MultiCrop.from_config(pre),
        worker.plan(global_batch=pre.batch_size, num_samples=len(image_ids)),
        render=device.type == "cpu",  # a GPU renders the views in the step, in milliseconds
    )

    worker.train(
        STAGE,
        pre,
        model,
        optimizer,
        scheduler,
        max_iters=schedules.iterations,
        checkpoint_every=schedules.iterations // pre.epochs * pre.checkpoint_every_epochs,
        batches=batches,
        losses=dino_losses(schedules, device),
    )


def fit(config: ExperimentConfig, manifest: StageManifest, hooks: Sequence[Any] = ()) -> None:
    """Run the TorchTrainer, then export the teacher backbone and draw its attention."""
    pre = config.pretrain
    run = RunDir(config.run_dir)
    losses = fit_stage(train_loop_per_worker, config, STAGE, pre, hooks)
    state = latest_state(run, STAGE)
    dino = build_dino(arch=config.backbone.arch, config=pre)
    dino.load_state_dict(state["model"])
    export_teacher(dino, run.uri_of(*PRETRAINED_BACKBONE))
    if pre.attention_images:
        split = config.data.val_split or config.data.train_split
        dataset = dataset_of(config.data, split)
        images = [dataset.load(i).image for i in dataset.image_ids()[: pre.attention_images]]
        picture = attention_picture(teacher_backbone(dino), images)
        run.write_bytes(png_bytes(picture), STAGE, "attention.png")
    manifest.inputs = len(dataset_of(config.data, config.data.train_split).image_ids())
    manifest.outputs = int(state["iteration"])
    manifest.metrics.update(losses)


run_stage = stage_runner(STAGE, fit)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
