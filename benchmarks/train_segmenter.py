"""DeepLab-v3 training throughput (Sec 4.1, A.3, Eq 4): images/s of the segmenter's training step.

    python benchmarks/train_segmenter.py                                 # CPU, resnet18, a minute
    python benchmarks/train_segmenter.py --device cuda --backbone resnet50 --size 512 --batch 16 \
        --iters 40 [--bf16]

Anchor on one H100 at 512 px, batch 16: torchvision DeepLab-v3 R50 measured 89 img/s fp32 and
128 img/s bf16 in a plain loop (18 GB). Rows:
  step      forward + Eq 4 hard-pixel loss + backward + SGD step of `build_segmenter` (stem and
            layer1 frozen, output stride 8), batches already on the device
  +augment  the same fed by `SegmentationSamples` (A.3 scale, rotation, flip, crop) through the
            training stage's `Prefetch` loader threads, as `jobs/train_segmenter.py` runs it
The first quarter of the iterations is warm-up and not timed. Synthetic scenes with their
ground-truth maps stand in for the pseudo labels.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.engine import Prefetch, trainable
from maskdistill.pseudolabels import encode_label_map
from maskdistill.segmenter import SegmentationSamples, build_segmenter, segmenter_losses

NUM_CLASSES = 7  # six synthetic classes + background


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "resnet50"))
    parser.add_argument("--size", type=int, default=160, help="crop side (images are this too)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=4, help="loader threads for +augment")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    return parser.parse_args()


def training_samples(args: argparse.Namespace) -> SegmentationSamples:
    scenes = SyntheticScenes(num_images=args.images, image_size=(args.size, args.size), seed=3)
    rows = []
    for image_id in scenes.image_ids():
        semantic = scenes.load(image_id).semantic
        assert semantic is not None
        rows.append({"image_id": image_id, "label_png": encode_label_map(semantic)})
    return SegmentationSamples(rows, scenes, crop_size=args.size)


Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def augmented(samples: SegmentationSamples, batch: int) -> Batches:
    """The stage's data path: `SegmentationSamples` items drawn by iteration."""

    def batch_at(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = [(iteration * batch + i) % len(samples) for i in range(batch)]
        pairs = [samples.load(i, variant=iteration) for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    return batch_at


def rate(args: argparse.Namespace, batch_at: Batches) -> float:
    device = torch.device(args.device)
    model = build_segmenter(num_classes=NUM_CLASSES, backbone=args.backbone).to(device)
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


def on_device(samples: SegmentationSamples, args: argparse.Namespace) -> Batches:
    """One fixed batch already on the device: the training step alone."""
    images, targets = augmented(samples, args.batch)(0)
    images, targets = images.to(args.device), targets.to(args.device)
    return lambda iteration: (images, targets)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse()
    samples = training_samples(args)
    results = [("step", rate(args, on_device(samples, args)))]
    memory = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
    results.append(("+augment", rate(args, Prefetch(augmented(samples, args.batch), args.threads))))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    precision = "bf16" if args.bf16 else "fp32"
    print(
        f"DeepLab-v3 {args.backbone} on {device}, {precision}, {args.size} px, batch {args.batch}"
    )
    if memory:
        print(f"peak GPU memory (step): {memory:.1f} GiB")
    print(f"{'path':<10} {'img/s':>8}")
    for name, value in results:
        print(f"{name:<10} {value:>8.2f}")


if __name__ == "__main__":
    main()
