"""Mask R-CNN training throughput (A.1): images/s of the training step, its data, the stage.

    python benchmarks/train_detector.py                                  # CPU, small, minutes
    python benchmarks/train_detector.py --device cuda --size 800 --batch 8 --iters 40 \
        --workers 8 --count 512 [--bf16] [--stage] [--images DIR]

Anchor on one H100 at 800 px, batch 8: torchvision R50-FPN measured 38 img/s fp32 and 46 img/s
bf16 in a plain loop on 800x800 synthetic images. Data here: VOC-size JPEGs (`jpeg_folder.py`,
500x375 and 375x500, decoded by `ImageFolder` as in users' runs), each with one object (its
first ground-truth instance, as the cluster stage's rows), or a user's folder with one blob
per image (`--images DIR`); the model resizes them to short side `--size` (800 -> 800x1067,
a third more pixels than the anchor's). Rows, in one run:
  step   forward + losses + backward + SGD step on one batch already on the device
  +data  the same fed by the stage's batch function (`SampleBatches` of `MaskTargets`: decode,
         RLE decode, flip, collate) through the stage's `BatchLoader` with `--workers`
         processes, pinned memory on a GPU
  stage  (`--stage`) jobs/train_detector.py itself (Ray Train, one worker), images/s from its
         log.jsonl
The first quarter of the iterations is warm-up and not timed. Targets (issue 15): `stage` and
`+data` >= 0.9x `step`, `step` at or above the anchor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jpeg_folder  # sibling scripts: run this file as a script, as documented
import stage_data
import torch

from maskdistill.detector import build_detector, detector_losses
from maskdistill.engine import trainable

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="maskrcnn_resnet50_fpn")
    parser.add_argument("--size", type=int, default=256, help="short side the model resizes to")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="loader processes for +data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--stage", action="store_true", help="also time the stage (Ray Train)")
    jpeg_folder.add_arguments(parser, count=64)
    return parser.parse_args()


def rate(args: argparse.Namespace, batch_at: Callable[[int], Batch]) -> float:
    device = torch.device(args.device)
    model = build_detector(
        arch=args.arch,
        num_classes=jpeg_folder.NUM_CLASSES,
        train_short_sides=(args.size,),
        test_short_side=args.size,
    ).to(device)
    optimizer = torch.optim.SGD(trainable(model.parameters()), lr=0.001, momentum=0.9)
    warmup = max(1, args.iters // 4)
    for iteration in range(args.iters + warmup):
        if iteration == warmup:
            _sync(device)
            start = time.perf_counter()
        images, targets = batch_at(iteration)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            losses = detector_losses(
                model,
                [im.to(device, non_blocking=True) for im in images],
                [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets],
            )
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()  # type: ignore[union-attr]
        optimizer.step()
    _sync(device)
    return args.iters * args.batch / (time.perf_counter() - start)


def stage_rate(args: argparse.Namespace, folder: jpeg_folder.JpegFolder) -> float:
    from jobs import train_detector

    warmup = max(1, args.iters // 4)
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as run_dir:
        stage_data.stage_run(folder, run_dir)
        overrides: dict[str, Any] = {
            **stage_data.stage_overrides(folder, run_dir),
            "detector.arch": args.arch,
            "detector.init": "none",
            "detector.train_short_side": f"[{args.size}, {args.size}]",
            "detector.batch_size": args.batch,
            "detector.max_iters": args.iters + warmup + 1,
            "detector.checkpoint_every": 10_000,
            "detector.schedule": "{base_lr: 0.001, warmup_iters: 0, milestones: []}",
        }
        return stage_data.timed_stage(
            train_detector.run_stage,
            overrides,
            stage="detector",
            warmup=warmup,
            batch_size=args.batch,
            workers=args.workers,
            bf16=args.bf16,
            cuda=cuda,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse()
    folder = jpeg_folder.from_arguments(args)
    batches = stage_data.detector_batches(folder, batch_size=args.batch)
    images, targets = batches(0)
    fixed = (
        [im.to(args.device) for im in images],
        [{k: v.to(args.device) for k, v in t.items()} for t in targets],
    )
    results = [("step", rate(args, lambda iteration: fixed))]
    cuda = args.device.startswith("cuda")
    warmup = max(1, args.iters // 4)
    stop = args.iters + warmup
    data_rate = stage_data.loader_rate(
        lambda batch_at: rate(args, batch_at), batches, workers=args.workers, stop=stop, cuda=cuda
    )
    results.append(("+data", data_rate))
    if args.stage:
        results.append(("stage", stage_rate(args, folder)))
    device = torch.cuda.get_device_name() if cuda else "CPU"
    precision = "bf16" if args.bf16 else "fp32"
    title = (
        f"{args.arch} on {device}, {precision}, short side {args.size}, batch {args.batch}, "
        f"{args.workers} loader processes, {stage_data.folder_size(folder)}"
    )
    stage_data.print_rows(title, results, cuda=cuda)


if __name__ == "__main__":
    main()
