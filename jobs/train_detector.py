"""Stage `detector` (Sec 3.2 Eq 3, A.1): distill a Mask R-CNN on the clustered masks, Ray Train.

    python -m jobs.train_detector --config configs/pascal.yaml --set detector.num_workers=4

A `TorchTrainer` runs `detector.num_workers` DDP workers (GPUs when `detector.use_gpu`). Each
iteration every worker draws its share of the global batch by iteration number, so a resumed
run sees the same data. Rank 0 writes checkpoints (model, optimizer, scheduler, scaler,
iteration, RNG state) every `detector.checkpoint_every` iterations to
`run_dir/detector/checkpoints/`, and losses and lr per iteration to `detector/log.jsonl`. A
failed worker group is restarted up to `detector.max_failures` times and resumes from the latest
checkpoint; so does a rerun of the job. A NaN or infinite loss stops the run with an error. The
trained weights end in `detector/model.pt` for the distill stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray.train
import ray.train.torch
import torch

from jobs import cluster
from jobs.common import stage_main
from jobs.sharded import dataset_of
from jobs.training import Worker, export_weights, fit_stage
from maskdistill.config import ExperimentConfig
from maskdistill.detector import MaskTargets, build_detector, collate, detector_losses
from maskdistill.engine import (
    build_scheduler,
    scaled_lr,
    trainable,
)
from maskdistill.inference import read_weights
from maskdistill.rundir import RunDir, StageManifest, execute, read_manifest

STAGE = "detector"
SIDE_STEP = 32  # train shorter sides: low, low + 32, ..., high (detectron2's choice list)


def config_hash(config: ExperimentConfig) -> str:
    return config.section_hash("detector", "seed") + cluster.config_hash(config)


def num_classes(run: RunDir) -> int:
    """Clusters + 1 (background), from the cluster stage's manifest."""
    manifest = read_manifest(run, cluster.STAGE)
    if manifest is None:
        raise FileNotFoundError(f"no {cluster.STAGE} stage in {run.uri}: run it first")
    return int(manifest.metrics["clusters"]) + 1


def detector_for(
    config: ExperimentConfig, classes: int, *, load_init: bool = True
) -> torch.nn.Module:
    det = config.detector
    low, high = det.train_short_side
    return build_detector(
        arch=det.arch,
        num_classes=classes,
        init=det.init,
        init_path=det.init_path,
        trainable_backbone_layers=det.trainable_backbone_layers,
        train_short_sides=tuple(range(low, high, SIDE_STEP)) + (high,),
        test_short_side=det.test_short_side,
        max_size=det.max_size,
        rpn_post_nms_top_n_train=det.proposals_per_image,
        rpn_post_nms_top_n_test=det.test_proposals_per_image,
        box_batch_size_per_image=det.roi_batch_size,
        box_detections_per_img=det.detections_per_image,
        load_init=load_init,
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, resume, train to `max_iters`, report the last losses."""
    det = loop_config["config"].detector
    worker = Worker.start(loop_config, det)
    config, run, device = worker.config, worker.run, worker.device
    model = ray.train.torch.prepare_model(
        detector_for(config, num_classes(run)),
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    optimizer = torch.optim.SGD(
        trainable(model.parameters()),
        lr=scaled_lr(det.schedule, det.batch_size),
        momentum=det.momentum,
        weight_decay=det.weight_decay,
    )
    rows = cluster.read_labeled(run, config).to_pylist()
    samples = MaskTargets(rows, dataset_of(config.data, config.data.train_split), seed=config.seed)

    def batch_at(iteration: int) -> Any:
        indices = worker.indices(iteration, global_batch=det.batch_size, num_samples=len(samples))
        return collate([samples.load(i, variant=iteration) for i in indices])

    def losses(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        return detector_losses(
            model,
            [image.to(device) for image in images],
            [{key: value.to(device) for key, value in t.items()} for t in targets],
        )

    worker.train(
        STAGE,
        det,
        model,
        optimizer,
        build_scheduler(optimizer, det.schedule),
        max_iters=det.max_iters,
        checkpoint_every=det.checkpoint_every,
        batch_at=batch_at,
        losses=losses,
    )


def fit(config: ExperimentConfig, manifest: StageManifest, hooks: Sequence[Any] = ()) -> None:
    """Run the TorchTrainer; export the final weights to `detector/model.pt`."""
    det = config.detector
    run = RunDir(config.run_dir)
    losses = fit_stage(train_loop_per_worker, config, STAGE, det, hooks)
    export_weights(run, STAGE, num_classes=num_classes(run), arch=det.arch)
    manifest.inputs = len(cluster.read_labeled(run, config))
    manifest.outputs = det.max_iters
    manifest.metrics.update(losses)


def load_detector(config: ExperimentConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The trained detector from `detector/model.pt`, in eval mode."""
    state = read_weights(RunDir(config.run_dir), STAGE)
    model = detector_for(config, int(state["num_classes"]), load_init=False)  # weights: model.pt
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def run_stage(
    config: ExperimentConfig, *, force: bool = False, hooks: Sequence[Any] = ()
) -> StageManifest | None:
    """Train the detector; None when already complete for this config."""
    run = RunDir(config.run_dir)
    return execute(run, STAGE, config_hash(config), lambda m: fit(config, m, hooks), force=force)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
