"""Loader throughput of each training stage on the JPEG folder (issue 15): batches/s and
images/s with 0, 1 and 2 worker processes, and what a second process adds.

    python benchmarks/loaders.py                       # this CPU, about 5 minutes on 2 quiet cores
    python benchmarks/loaders.py --workers 0 1 2 4 --batches 16 --stages segmenter detector
    python benchmarks/loaders.py --images DIR          # a user's folder (blob labels)

Each stage's batch function is the one its job builds (`stage_data.py`: the same samples,
`BatchPlan` and collate), run by `maskdistill.loader.BatchLoader` as the stage runs it; nothing
trains, so the rates are what the loader can deliver at most. workers=0 prepares each batch in
this process when asked (torch on one thread here, as in a loader process, so it is the rate of
one core). Stages:
  segmenter   `SegmentationSamples`: decode JPEG + label PNG, A.3 scale/rotate/flip, crop
              `--crop` (512), stacked; the pairs/s of workers=0 is the per-core rate
  detector    `MaskTargets`: decode JPEG, RLE decode of the mined mask, flip, collate (the
              model resizes on its device)
  pretrain    `PretrainBatches` with DINO's default multi-crop (2 x 224 + 10 x 96): `draws`
              (the GPU path: decode and draw the crop parameters; the step renders) and
              `rendered` (the CPU path: views rendered in the loader)
The linear probe (evaluate) has no loader: it caches the segmenter's features of the train
images once and trains on those. Targets (issue 15, this 2-core box): workers 2 >= 1.7x
workers 1 for every stage; segmenter pairs at 512 >= 55/s per core. Load on the box distorts
every wall-clock figure (the header prints the load average); `img/CPU-s` (images per CPU-second
of this process and its loader processes, from /proc) is the per-core rate, which load
disturbs much less.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jpeg_folder  # sibling scripts: run this file as a script, as documented
import stage_data
import torch

from maskdistill.config import PretrainConfig
from maskdistill.loader import BatchLoader

STAGES = ("segmenter", "detector", "pretrain")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=16, help="timed batches per setting")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--crop", type=int, default=512, help="segmenter crop side")
    parser.add_argument("--prefetch", type=int, default=2)
    jpeg_folder.add_arguments(parser, count=256)
    return parser.parse_args()


def stage_batches(args: argparse.Namespace, folder: jpeg_folder.JpegFolder) -> dict[str, Any]:
    """Name -> the batch function of each stage asked for (pretrain: two rows)."""
    made: dict[str, Any] = {}
    if "segmenter" in args.stages:
        made[f"segmenter {args.crop}"] = stage_data.segmenter_batches(
            folder, crop_size=args.crop, batch_size=args.batch
        )
    if "detector" in args.stages:
        made["detector"] = stage_data.detector_batches(folder, batch_size=args.batch)
    if "pretrain" in args.stages:
        for name, render in (("draws", False), ("rendered", True)):
            made[f"pretrain {name}"] = stage_data.pretrain_batches(
                folder, config=PretrainConfig(), batch_size=args.batch, render=render
            )
    return made


def batches_per_second(
    batches: Callable[[int], Any], *, workers: int, count: int, prefetch: int
) -> tuple[float, float]:
    """Batches/s over `count` batches in the steady state: the first workers x prefetch + 1
    (process start-up, the queue filling) are not timed, so the queue is full at both ends."""
    warmup = workers * prefetch + 1
    loader = BatchLoader(batches, workers=workers, stop=warmup + count, prefetch=prefetch)
    try:
        for iteration in range(warmup):
            loader(iteration)
        start, cpu = time.perf_counter(), cpu_seconds()
        for iteration in range(warmup, warmup + count):
            loader(iteration)
        return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu)
    finally:
        loader.close()


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children so far (Linux /proc)."""
    me = Path("/proc/self")
    pids = ["self"] + [
        pid for task in (me / "task").iterdir() for pid in (task / "children").read_text().split()
    ]
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue  # a child that has just exited
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = parse()
    torch.set_num_threads(1)  # as in a loader process: workers=0 is one core's rate
    folder = jpeg_folder.from_arguments(args)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"loaders on {os.cpu_count()} CPUs (load average {load}), {args.batch} images a batch, "
        f"{args.batches} batches timed, prefetch {args.prefetch}, {stage_data.folder_size(folder)}"
    )
    print(
        f"{'stage':<18} {'workers':>7} {'batches/s':>10} {'images/s':>9} {'x 1 worker':>10} "
        f"{'img/CPU-s':>9}"
    )
    for name, batches in stage_batches(args, folder).items():
        rates = {}
        for workers in args.workers:
            rates[workers], per_cpu = batches_per_second(
                batches, workers=workers, count=args.batches, prefetch=args.prefetch
            )
            ratio = f"{rates[workers] / rates[1]:.2f}" if 1 in rates else ""
            print(
                f"{name:<18} {workers:>7} {rates[workers]:>10.2f} "
                f"{rates[workers] * args.batch:>9.1f} {ratio:>10} {per_cpu * args.batch:>9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
