"""DeepLab-v3 training throughput (Sec 4.1, A.3, Eq 4): images/s of the segmenter's training.

    python benchmarks/train_segmenter.py                                 # CPU, resnet18, minutes
    python benchmarks/train_segmenter.py --device cuda --backbone resnet50 --size 512 --batch 16 \
        --iters 40 --workers 12 --count 512 [--bf16] [--stage] [--images DIR]

Anchor on one H100 at 512 px, batch 16: torchvision DeepLab-v3 R50 measured 89 img/s fp32 and
128 img/s bf16 in a plain loop (18 GB). Data: VOC-size JPEGs (`jpeg_folder.py`, 500x375 and
375x500, decoded by `ImageFolder` as in users' runs) with their label PNGs as pseudo labels, or
a user's folder with blob labels (`--images DIR`). Rows, in one run:
  step   forward + Eq 4 hard-pixel loss + backward + SGD step of `build_segmenter` (stem and
         layer1 frozen, output stride 8), one batch already on the device
  +data  the same fed by the stage's batch function (`SampleBatches` of `SegmentationSamples`:
         decode, A.3 scale/rotate/flip/crop, stack) through the stage's `BatchLoader` with
         `--workers` processes, pinned memory on a GPU
  stage  (`--stage`) jobs/train_segmenter.py itself (Ray Train, one worker, checkpoints only at
         the end), images/s from its log.jsonl
The first quarter of the iterations is warm-up and not timed. Targets (issue 15): `stage` and
`+data` >= 0.9x `step`, `step` at or above the anchor.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jpeg_folder  # sibling scripts: run this file as a script, as documented
import stage_data
import torch

from maskdistill.engine import trainable
from maskdistill.segmenter import build_segmenter, segmenter_losses

Batch = tuple[torch.Tensor, torch.Tensor]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "resnet50"))
    parser.add_argument("--size", type=int, default=256, help="crop side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="loader processes for +data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--stage", action="store_true", help="also time the stage (Ray Train)")
    jpeg_folder.add_arguments(parser, count=64)
    return parser.parse_args()


def rate(args: argparse.Namespace, batch_at: Callable[[int], Batch]) -> float:
    device = torch.device(args.device)
    model = build_segmenter(num_classes=jpeg_folder.NUM_CLASSES, backbone=args.backbone)
    model = model.to(device)
    optimizer = torch.optim.SGD(
        trainable(model.parameters()), lr=0.002, momentum=0.9, weight_decay=1e-4
    )
    warmup = max(1, args.iters // 4)
    for iteration in range(args.iters + warmup):
        if iteration == warmup:
            _sync(device)
            start = time.perf_counter()
        images, targets = batch_at(iteration)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            loss = segmenter_losses(model, images, targets)["loss_seg"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return args.iters * args.batch / (time.perf_counter() - start)


def stage_rate(args: argparse.Namespace, folder: jpeg_folder.JpegFolder) -> float:
    from jobs import train_segmenter

    warmup = max(1, args.iters // 4)
    per_epoch = len(folder.image_ids()) // args.batch
    epochs = math.ceil((args.iters + warmup + 1) / per_epoch)
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as run_dir:
        stage_data.stage_run(folder, run_dir)
        overrides: dict[str, Any] = {
            **stage_data.stage_overrides(folder, run_dir),
            "segmenter.backbone": args.backbone,
            "segmenter.init": "none",
            "segmenter.crop_size": args.size,
            "segmenter.batch_size": args.batch,
            "segmenter.epochs": epochs,
            "segmenter.checkpoint_every_epochs": epochs,
            "segmenter.schedule": f"{{base_lr: 0.002, reference_batch: {args.batch}}}",
        }
        return stage_data.timed_stage(
            train_segmenter.run_stage,
            overrides,
            stage="segmenter",
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
    batches = stage_data.segmenter_batches(folder, crop_size=args.size, batch_size=args.batch)
    first = batches(0)
    fixed = (first[0].to(args.device), first[1].to(args.device))
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
        f"DeepLab-v3 {args.backbone} on {device}, {precision}, {args.size} px crops, "
        f"batch {args.batch}, {args.workers} loader processes, "
        f"{stage_data.folder_size(folder)}"
    )
    stage_data.print_rows(title, results, cuda=cuda)


if __name__ == "__main__":
    main()
