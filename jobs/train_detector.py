"""Stage `detector` (Sec 3.2 Eq 3, A.1): distill a Mask R-CNN on the clustered masks, Ray Train.

    python -m jobs.train_detector --config configs/pascal.yaml \
        --set detector.resources.num_workers=4

A `TorchTrainer` runs `detector.resources.num_workers` DDP workers (GPUs when `use_gpu`). Each
iteration every worker draws its share of the global batch by iteration number, so a resumed
run sees the same data. Rank 0 writes checkpoints (model, optimizer, scheduler, scaler,
iteration, RNG state) every `detector.checkpoint_every` iterations to
`run_dir/detector/checkpoints/`, and losses and lr per iteration to `detector/log.jsonl`. A
failed worker group is restarted up to `resources.max_failures` times and resumes from the latest
checkpoint; so does a rerun of the job. A NaN or infinite loss stops the run with an error. The
trained weights end in `detector/model.pt` for the distill stage. It trains on the clustered
masks of every split in `detector.train_splits` (default the train split; PASCAL, A.4: VOC2012's
train_aug and VOC2007's trainval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray.train
import ray.train.torch
import torch

from jobs.common import stage_main
from jobs.training import Worker, export_weights, fit_stage, stage_runner
from maskdistill.config import ExperimentConfig
from maskdistill.data import dataset_of
from maskdistill.data.union import SplitUnion
from maskdistill.detector import MaskTargets, collate, detector_losses, sync_batch_norm
from maskdistill.engine import build_scheduler, scaled_lr, trainable
from maskdistill.inference import detector_from_config
from maskdistill.loader import SampleBatches
from maskdistill.outputs import detector_splits, labeled_path, num_classes
from maskdistill.rows import ShardedRows, repeated_ids, row_groups, windowed
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import DETECTOR

STAGE = DETECTOR


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, resume, train to `max_iters`, report the last losses."""
    det = loop_config["config"].detector
    worker = Worker.start(loop_config, det)
    config, run, device = worker.config, worker.run, worker.device
    model = detector_from_config(det, num_classes=num_classes(run))
    if det.train_batch_norm:
        model = sync_batch_norm(model, world_size=worker.world)
    model = ray.train.torch.prepare_model(
        model,
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    optimizer = torch.optim.SGD(
        trainable(model.parameters()),
        lr=scaled_lr(det.schedule, det.batch_size),
        momentum=det.momentum,
        weight_decay=det.weight_decay,
    )
    images = SplitUnion(
        {split: dataset_of(config.data, split) for split in detector_splits(config)}
    )
    samples = MaskTargets(loop_config["rows"], images, seed=config.seed)
    plan = worker.plan(
        global_batch=det.batch_size, num_samples=len(samples), window=det.shuffle_window
    )

    def losses(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        return detector_losses(
            model,
            [image.to(device, non_blocking=True) for image in images],
            [
                {key: value.to(device, non_blocking=True) for key, value in t.items()}
                for t in targets
            ],
        )

    worker.train(
        STAGE,
        det,
        model,
        optimizer,
        build_scheduler(optimizer, det.schedule),
        max_iters=det.max_iters,
        checkpoint_every=det.checkpoint_every,
        batches=SampleBatches(samples, plan, collate),
        losses=losses,
    )


TRAINING_COLUMNS = ("image_id", "height", "width", "mask_rle", "cluster")


def training_rows(config: ExperimentConfig, run: RunDir) -> ShardedRows:
    """The clustered masks of every `detector.train_splits` split (A.4: VOC07+12 for PASCAL),
    an image in several splits once (its first split's row), read a row group at a time."""
    groups = [row_groups([run.uri_of(*labeled_path(split))]) for split in detector_splits(config)]
    drop: list[int] = []
    offset = 0
    for i, later in enumerate(groups):
        drop += [offset + p for p in repeated_ids(groups[:i], later)]
        offset += sum(g.rows for g in later)
    flat = [g for split_groups in groups for g in split_groups]
    return windowed(flat, TRAINING_COLUMNS, window=config.detector.shuffle_window, drop=drop)


def fit(config: ExperimentConfig, manifest: StageManifest, hooks: Sequence[Any] = ()) -> None:
    """Run the TorchTrainer; export the final weights to `detector/model.pt`."""
    det = config.detector
    run = RunDir(config.run_dir)
    rows = training_rows(config, run)
    losses = fit_stage(train_loop_per_worker, config, STAGE, det, hooks, {"rows": rows})
    export_weights(run, STAGE, num_classes=num_classes(run), arch=det.arch)
    manifest.inputs = len(rows)
    manifest.outputs = det.max_iters
    manifest.metrics.update(losses)


run_stage = stage_runner(STAGE, fit)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
