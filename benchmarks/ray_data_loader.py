"""Process-based loading, two ways (issue 15): torch `DataLoader` workers vs Ray Data streaming.

    python benchmarks/ray_data_loader.py        # this CPU, 2 processes each, about 3 minutes

Both make the segmenter stage's batches on the JPEG folder (`SegmentationSamples`: decode JPEG
and label PNG, A.3 augmentations, 512 crops) in the stage's order, iteration by iteration:
  dataloader  `maskdistill.loader.BatchLoader` with `--workers` processes, as the stages run it
  ray-data    `ray.data.from_items` of (iteration, index) rows in that order, `map_batches` over
              `--workers` CPU tasks (one sample a row), `iter_torch_batches` with
              `preserve_order` on, so each batch is the same images as the DataLoader's
Both are timed after a warm-up of `--warmup` batches. What decided: the stages need each
iteration's batch by iteration number (resume at a checkpoint, the same batches on any worker
count); the DataLoader takes that as its sampler, while Ray Data must stream the order as rows
and preserve it, and its start-up and per-block scheduling cost on top of the same decode.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jpeg_folder  # sibling scripts: run this file as a script, as documented
import numpy as np
import stage_data
import torch

from maskdistill.loader import BatchLoader, SampleBatches


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (or Ray tasks)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--crop", type=int, default=512)
    jpeg_folder.add_arguments(parser, count=128)
    return parser.parse_args()


def dataloader_rate(batches: SampleBatches, args: argparse.Namespace) -> float:
    total = args.warmup + args.batches
    loader = BatchLoader(batches, workers=args.workers, stop=total)
    try:
        for iteration in range(args.warmup):
            loader(iteration)
        start = time.perf_counter()
        for iteration in range(args.warmup, total):
            loader(iteration)
        return args.batches * args.batch / (time.perf_counter() - start)
    finally:
        loader.close()


class _Load:
    """Ray Data's map: one (iteration, index) row -> the augmented pair, as numpy."""

    def __init__(self, batches: SampleBatches) -> None:
        self.samples = batches.samples

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [
            self.samples.load(int(index), variant=int(iteration))
            for iteration, index in zip(rows["iteration"], rows["index"], strict=True)
        ]
        return {
            "image": np.stack([image.numpy() for image, _ in pairs]),
            "target": np.stack([target.numpy() for _, target in pairs]),
        }


def ray_data_rate(batches: SampleBatches, args: argparse.Namespace) -> float:
    import ray

    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        total = args.warmup + args.batches
        rows = [
            {"iteration": iteration, "index": index}
            for iteration in range(total)
            for index in batches.plan.indices(iteration)
        ]
        stream = (
            ray.data.from_items(rows, override_num_blocks=total)
            .map_batches(
                _Load,
                fn_constructor_args=(batches,),
                batch_size=args.batch,
                concurrency=args.workers,
                num_cpus=1,
            )
            .iter_torch_batches(batch_size=args.batch, prefetch_batches=args.workers)
        )
        seen: list[dict[str, Any]] = []
        start = 0.0
        for count, batch in enumerate(stream, start=1):
            seen.append(batch)
            if count == args.warmup:
                start = time.perf_counter()
        rate = args.batches * args.batch / (time.perf_counter() - start)
        _check_same(seen[-1], batches(total - 1))
        return rate
    finally:
        ray.shutdown()


def _check_same(batch: dict[str, Any], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The last Ray Data batch is the stage's batch of that iteration (order preserved)."""
    if not torch.equal(batch["image"], expected[0]) or not torch.equal(
        batch["target"], expected[1]
    ):
        raise AssertionError("ray-data: the last batch differs from the stage's batch")


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    folder = jpeg_folder.from_arguments(args)
    batches = stage_data.segmenter_batches(folder, crop_size=args.crop, batch_size=args.batch)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"segmenter pairs at {args.crop} px, {args.workers} processes, batch {args.batch}, "
        f"{stage_data.folder_size(folder)} (load average {load})"
    )
    print(f"{'path':<11} {'images/s':>9}")
    print(f"{'dataloader':<11} {dataloader_rate(batches, args):>9.1f}", flush=True)
    print(f"{'ray-data':<11} {ray_data_rate(batches, args):>9.1f}")


if __name__ == "__main__":
    main()
