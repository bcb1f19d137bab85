"""Stage `segmenter` (Sec 3.3 Eq 4, 4.1, A.3): DeepLab-v3 on the pseudo labels, with Ray Train.

    python -m jobs.train_segmenter --config configs/pascal.yaml \
        --set segmenter.resources.num_workers=2

The same contract as the detector stage: DDP workers draw their share of the global batch by
iteration, rank 0 checkpoints every `segmenter.checkpoint_every_epochs` epochs to
`run_dir/segmenter/checkpoints/` and logs losses and lr per iteration to `segmenter/log.jsonl`,
a failed worker group restarts from the latest checkpoint, a NaN loss stops the run. The loss is
Eq 4: cross-entropy over the hardest `segmenter.hard_pixel_fraction` of the valid pixels of
each batch. Schedule milestones are in epochs. The weights end in `segmenter/model.pt`.
The classes are the run's names.yaml groups (`maskdistill.names`): merged clusters train as
one class, background clusters as background; `cluster_labels` in model.pt records the map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray.train
import ray.train.torch
import torch

from jobs.common import stage_main
from jobs.training import Worker, export_weights, fit_stage, stage_runner
from maskdistill.config import ExperimentConfig, LRSchedule
from maskdistill.data import dataset_of
from maskdistill.engine import build_scheduler, scaled_lr, trainable
from maskdistill.inference import segmenter_from_config
from maskdistill.outputs import class_map, read_pseudo
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.segmenter import SegmentationSamples, segmenter_losses
from maskdistill.stages import SEGMENTER

STAGE = SEGMENTER


def training_rows(config: ExperimentConfig, run: RunDir) -> list[dict[str, Any]]:
    """The pseudo labels of the train split, one row per image."""
    return read_pseudo(run, config.data.train_split, ["image_id", "label_png"]).to_pylist()


def iteration_schedule(config: ExperimentConfig, num_images: int) -> tuple[int, int, LRSchedule]:
    """Iterations per epoch, total iterations, and the schedule with milestones in iterations."""
    seg = config.segmenter
    per_epoch = max(1, num_images // seg.batch_size)
    schedule = seg.schedule.model_copy(
        update={"milestones": [m * per_epoch for m in seg.schedule.milestones]}
    )
    return per_epoch, seg.epochs * per_epoch, schedule


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, resume, train, report the last loss."""
    seg = loop_config["config"].segmenter
    worker = Worker.start(loop_config, seg)
    config, run, device = worker.config, worker.run, worker.device
    rows = training_rows(config, run)
    per_epoch, max_iters, schedule = iteration_schedule(config, len(rows))
    classes = class_map(run)
    model = ray.train.torch.prepare_model(
        segmenter_from_config(seg, num_classes=classes.num_classes)
    )
    optimizer = torch.optim.SGD(
        trainable(model.parameters()),
        lr=scaled_lr(schedule, seg.batch_size),
        momentum=seg.momentum,
        weight_decay=seg.weight_decay,
    )
    samples = SegmentationSamples(
        rows,
        dataset_of(config.data, config.data.train_split),
        crop_size=seg.crop_size,
        scale_range=seg.scale_range,
        rotation_degrees=seg.rotation_degrees,
        seed=config.seed,
        label_lookup=classes.lookup(),
    )

    def batch_at(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = worker.indices(iteration, global_batch=seg.batch_size, num_samples=len(samples))
        pairs = [samples.load(i, variant=iteration) for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def losses(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        return segmenter_losses(
            model, images.to(device), targets.to(device), fraction=seg.hard_pixel_fraction
        )

    worker.train(
        STAGE,
        seg,
        model,
        optimizer,
        build_scheduler(optimizer, schedule),
        max_iters=max_iters,
        checkpoint_every=per_epoch * seg.checkpoint_every_epochs,
        batch_at=batch_at,
        losses=losses,
    )


def fit(config: ExperimentConfig, manifest: StageManifest, hooks: Sequence[Any] = ()) -> None:
    """Run the TorchTrainer; export the final weights to `segmenter/model.pt`."""
    run = RunDir(config.run_dir)
    losses = fit_stage(train_loop_per_worker, config, STAGE, config.segmenter, hooks)
    classes = class_map(run)
    state = export_weights(
        run, STAGE, num_classes=classes.num_classes, cluster_labels=list(classes.labels)
    )
    manifest.inputs = len(training_rows(config, run))
    manifest.outputs = int(state["iteration"])
    manifest.metrics.update(losses)


run_stage = stage_runner(STAGE, fit)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
