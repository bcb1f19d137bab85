"""The training stages' batch functions on a JPEG folder, and the `stage` row's run directory.

Each builder returns what the stage hands to its `BatchLoader` (`maskdistill.loader`): the same
samples class, `BatchPlan` and collate as jobs/train_segmenter.py, jobs/train_detector.py and
jobs/pretrain.py, for one rank. `stage_run` prepares a run directory whose upstream outputs are
the folder's labels (cluster manifest, clustered masks, pseudo labels), so that a benchmark can
run the real stage (Ray Train, one worker) on it; `stage_rate` reads its images/s from the log.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jpeg_folder import NUM_CLASSES, JpegFolder  # a sibling script, as the benchmarks run

from maskdistill.config import ExperimentConfig, PretrainConfig, load_config
from maskdistill.detector import MaskTargets, collate
from maskdistill.engine import BatchPlan
from maskdistill.loader import BatchLoader, SampleBatches
from maskdistill.outputs import PSEUDO_SCHEMA, labeled_path, pseudo_folder, write_table
from maskdistill.pretrain import MultiCrop, PretrainBatches
from maskdistill.rundir import RunDir, StageManifest, write_manifest
from maskdistill.segmenter import SegmentationSamples, stack_pairs
from maskdistill.shards import part_name


def plan(batch_size: int, num_samples: int, seed: int = 0) -> BatchPlan:
    """One rank's plan, as `jobs.training.Worker.plan` makes it with world size 1."""
    return BatchPlan(
        rank=0, world_size=1, batch_size=batch_size, num_samples=num_samples, seed=seed
    )


def segmenter_batches(folder: JpegFolder, *, crop_size: int, batch_size: int) -> SampleBatches:
    """The segmenter stage's batches: `SegmentationSamples` (A.3 augmentations) + `stack_pairs`."""
    samples = SegmentationSamples(folder.segmenter_rows(), folder.dataset, crop_size=crop_size)
    return SampleBatches(samples, plan(batch_size, len(samples)), stack_pairs)


def detector_batches(folder: JpegFolder, *, batch_size: int) -> SampleBatches:
    """The detector stage's batches: `MaskTargets` (one mined mask per image) + `collate`."""
    samples = MaskTargets(folder.detector_rows(), folder.dataset)
    return SampleBatches(samples, plan(batch_size, len(samples)), collate)


def pretrain_batches(
    folder: JpegFolder, *, config: PretrainConfig, batch_size: int, render: bool
) -> PretrainBatches:
    """The pretrain stage's batches: DINO's multi-crop views, rendered in the loader when
    `render` (a CPU run) or left as draws for the GPU step to render."""
    ids = folder.image_ids()
    crops = MultiCrop.from_config(config)
    return PretrainBatches(folder.dataset, ids, crops, plan(batch_size, len(ids)), render)


def stage_run(folder: JpegFolder, run_dir: str) -> RunDir:
    """A run directory as the stages before training leave it for `folder`'s train split:
    the cluster manifest (six clusters), clustered masks (detector) and pseudo labels
    (segmenter), each image's object and label map being the folder's."""
    run = RunDir(run_dir)
    masks = pa.Table.from_pylist(folder.detector_rows())
    write_table(run, masks, *labeled_path(folder.split))
    pseudo = [
        {
            **row,
            "height": mask["height"],
            "width": mask["width"],
            "kept": 1,
            "best_score": 1.0,
            "candidate_rle": [],
            "candidate_bbox": [],
            "candidate_score": [],
            "candidate_class": [],
        }
        for row, mask in zip(folder.segmenter_rows(), masks.to_pylist(), strict=True)
    ]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(pseudo, schema=PSEUDO_SCHEMA), sink)
    run.write_bytes(sink.getvalue(), pseudo_folder(folder.split), f"{part_name(0)}.parquet")
    clusters = {"clusters": float(NUM_CLASSES - 1)}
    write_manifest(run, StageManifest("cluster", "bench", metrics=clusters))
    return run


def stage_overrides(folder: JpegFolder, run_dir: str) -> dict[str, object]:
    """Config keys that point a stage at `folder` and `run_dir`."""
    return {
        "run_dir": run_dir,
        "data.kind": "folder",
        "data.root": str(folder.root),
        "data.train_split": json.dumps(folder.split),
        "data.val_split": "null",
    }


def stage_rate(run: RunDir, stage: str, *, warmup: int, batch_size: int) -> float:
    """Images/s of a stage from its log.jsonl: iterations after `warmup` to the last."""
    log = [json.loads(line) for line in run.read_bytes(stage, "log.jsonl").splitlines()]
    times = [r["time"] for r in log if "time" in r]
    if len(times) < warmup + 2:
        raise ValueError(f"{stage}: {len(times)} iterations logged; need more than {warmup + 1}")
    return (len(times) - 1 - warmup) * batch_size / (times[-1] - times[warmup])


def folder_size(folder: JpegFolder) -> str:
    """e.g. '64 images under /x/train'."""
    return f"{len(folder.image_ids())} images under {Path(folder.root, folder.split)}"


def loader_rate(
    rate: Callable[[Callable[[int], Any]], float],
    batches: SampleBatches,
    *,
    workers: int,
    stop: int,
    cuda: bool,
) -> float:
    """The `+data` row: `rate` of the batches through the stage's `BatchLoader`."""
    loader = BatchLoader(
        batches, workers=workers, stop=stop, pin_memory=cuda, describe=batches.image_ids
    )
    try:
        return rate(loader)
    finally:
        loader.close()


def timed_stage(
    run_stage: Callable[[ExperimentConfig], Any],
    overrides: dict[str, Any],
    *,
    stage: str,
    warmup: int,
    batch_size: int,
    workers: int,
    bf16: bool,
    cuda: bool,
) -> float:
    """The `stage` row: run the real stage (its section `stage`) on a local Ray with `overrides`
    plus its precision and resources, its images/s from its log."""
    import ray

    overrides = {
        **overrides,
        f"{stage}.precision": "bf16" if bf16 else "fp32",
        f"{stage}.resources.use_gpu": str(cuda).lower(),
        f"{stage}.resources.cpus_per_worker": min(os.cpu_count() or 1, workers + 1),
        f"{stage}.resources.loader_workers": workers,
    }
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    if cuda:
        torch.cuda.empty_cache()  # the step rows' cached blocks, for the stage's process
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        run_stage(config)
    finally:
        ray.shutdown()
    return stage_rate(RunDir(config.run_dir), stage, warmup=warmup, batch_size=batch_size)


def print_rows(title: str, results: list[tuple[str, float]], *, cuda: bool) -> None:
    """The benchmark's table: a title line, the step's peak GPU memory, one row per path."""
    print(title)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory (step and +data rows): {peak:.1f} GiB")
    print(f"{'row':<8} {'img/s':>8}")
    for name, value in results:
        print(f"{name:<8} {value:>8.2f}")
