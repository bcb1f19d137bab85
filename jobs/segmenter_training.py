"""The segmenter's training (Sec 3.3 Eq 4, A.3) shared by the stages that train one: `segmenter`
on distill's pseudo labels, `refine` on each CRF self-training round's labels (S1).

`train_on(config, folder=, labels=)` trains (or resumes) a DeepLab-v3 with checkpoints under
`run_dir/<folder>/` and exports `<folder>/model.pt`; the Ray Train loop, the iteration schedule
(milestones in epochs) and `segmenter.select: best_on_val` live here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ray.train
import ray.train.torch
import torch

from jobs.training import Worker, export_weights, fit_stage
from maskdistill.config import ExperimentConfig, LRSchedule
from maskdistill.data import dataset_of
from maskdistill.data.base import SkipLog, iter_samples
from maskdistill.engine import build_scheduler, scaled_lr, trainable, unwrap
from maskdistill.inference import segmenter_from_config
from maskdistill.loader import SampleBatches
from maskdistill.outputs import class_map, pseudo_folder, write_weights
from maskdistill.rows import ShardedRows, row_groups, windowed
from maskdistill.rundir import RunDir
from maskdistill.segmenter import SegmentationSamples, segmenter_losses, stack_pairs
from maskdistill.selection import BEST_ON_VAL, Selection, val_miou
from maskdistill.shards import part_uris
from maskdistill.stages import SEGMENTER


def training_rows(config: ExperimentConfig, run: RunDir, labels: str | None = None) -> ShardedRows:
    """The pseudo labels of the train split, one row per image, read a row group at a time:
    distill's, or the parts under `labels` (a CRF self-training round's,
    `outputs.refined_folder`)."""
    folder = pseudo_folder(config.data.train_split) if labels is None else labels
    groups = row_groups(part_uris(run, folder))
    return windowed(groups, ["image_id", "label_png"], window=config.segmenter.shuffle_window)


def iteration_schedule(config: ExperimentConfig, num_images: int) -> tuple[int, int, LRSchedule]:
    """Iterations per epoch, total iterations, and the schedule with milestones in iterations."""
    seg = config.segmenter
    per_epoch = max(1, num_images // seg.batch_size)
    schedule = seg.schedule.model_copy(
        update={"milestones": [m * per_epoch for m in seg.schedule.milestones]}
    )
    return per_epoch, seg.epochs * per_epoch, schedule


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, resume, train, report the last loss. `folder` (default the stage's)
    holds the checkpoints; `labels`, when given, the refined labels to train on instead."""
    seg = loop_config["config"].segmenter
    folder, labels = loop_config.get("folder", SEGMENTER), loop_config.get("labels")
    worker = Worker.start(loop_config, seg)
    config, run, device = worker.config, worker.run, worker.device
    rows = loop_config["rows"]
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
        label_lookup=classes.lookup() if labels is None else None,  # refined: already groups
        augment=seg.augment,
    )

    plan = worker.plan(
        global_batch=seg.batch_size, num_samples=len(samples), window=seg.shuffle_window
    )

    def losses(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        return segmenter_losses(
            model,
            images.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
            fraction=seg.hard_pixel_fraction,
        )

    checkpoint_every = per_epoch * seg.checkpoint_every_epochs
    select = None
    if seg.select == BEST_ON_VAL and worker.rank == 0:  # the release: best val mIoU epoch
        select = checkpoint_selector(config, run, folder, model, classes.num_classes)
        at_checkpoint = select

        def hook(iteration: int) -> None:  # runs before an iteration: `iteration` steps done
            if iteration % checkpoint_every == 0:
                at_checkpoint(iteration)

        worker = dataclasses.replace(worker, hooks=[*worker.hooks, hook])
    worker.train(
        folder,
        seg,
        model,
        optimizer,
        build_scheduler(optimizer, schedule),
        max_iters=max_iters,
        checkpoint_every=checkpoint_every,
        batches=SampleBatches(samples, plan, stack_pairs),
        losses=losses,
    )
    if select is not None:
        select(max_iters)


def checkpoint_selector(
    config: ExperimentConfig, run: RunDir, folder: str, model: torch.nn.Module, num_classes: int
) -> Callable[[int], None]:
    """`segmenter.select: best_on_val`: a hook scoring the model at a checkpoint iteration on
    the val split (the evaluation's protocol) and keeping the best one's weights (rank 0 only;
    the other ranks wait at the next step). Costs one pass over val per checkpoint."""
    split = config.data.val_split
    if split is None:
        raise ValueError("segmenter.select=best_on_val needs data.val_split: a split to score on")
    val = dataset_of(config.data, split)
    selection = Selection(run, folder)

    def select(iteration: int) -> None:
        if iteration == 0 or iteration in selection.scores:
            return
        inner = unwrap(model)
        miou = val_miou(
            inner,
            iter_samples(val, skips=SkipLog()),
            num_predicted=num_classes,
            num_classes=1 + len(val.class_names),
            matching=config.evaluation.matching,
        )
        best = selection.add(iteration, miou, inner.state_dict())
        print(f"{folder}: val mIoU {100 * miou:.1f} at iteration {iteration}{' (best)' * best}")

    return select


def train_on(
    config: ExperimentConfig,
    *,
    folder: str = SEGMENTER,
    labels: str | None = None,
    hooks: Sequence[Any] = (),
) -> tuple[dict[str, float], int]:
    """Train (or resume) the segmenter with checkpoints under `folder`, on distill's pseudo
    labels or the parts under `labels`; export `<folder>/model.pt`. (losses, iterations)."""
    run = RunDir(config.run_dir)
    extra = {"folder": folder, "labels": labels, "rows": training_rows(config, run, labels)}
    losses = fit_stage(train_loop_per_worker, config, folder, config.segmenter, hooks, extra)
    classes = class_map(run)
    state = export_weights(
        run, folder, num_classes=classes.num_classes, cluster_labels=list(classes.labels)
    )
    if config.segmenter.select == BEST_ON_VAL:  # model.pt: the best val checkpoint instead
        selection = Selection(run, folder)
        write_weights(
            run,
            folder,
            selection.best_state(),
            num_classes=classes.num_classes,
            cluster_labels=list(classes.labels),
            selection=selection.record(),
        )
    return losses, int(state["iteration"])
