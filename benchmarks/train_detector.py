"""Mask R-CNN training throughput (A.1): images/s of a plain loop and of the Ray Train stage.

    python benchmarks/train_detector.py                                  # CPU, small, minutes
    python benchmarks/train_detector.py --device cuda --size 800 --batch 8 --iters 40 --ray
    python benchmarks/train_detector.py --device cuda --size 800 --batch 8 --iters 40 --bf16 --ray

Anchor on one H100 at 800 px, batch 8: torchvision R50-FPN measured 38 img/s fp32 and 46 img/s
bf16 in a plain loop; the Ray Train path (`--ray`, one worker) should lose at most 10% to it.
Rows: `step` is the training step on one batch already on the device; `plain` renders and
collates each batch in the loop (no loader threads); `ray-train` is the stage itself.
Both use synthetic scenes with one ground-truth object per image as the target, like the
mined masks; the first quarter of the iterations is warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import pyarrow as pa
import torch

from maskdistill.config import ExperimentConfig, load_config
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.detector import MaskTargets, build_detector, collate, detector_losses
from maskdistill.engine import trainable
from maskdistill.masks import encode_rle, mask_to_box
from maskdistill.outputs import labeled_path, write_table
from maskdistill.rundir import RunDir, StageManifest, write_manifest


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="maskrcnn_resnet50_fpn")
    parser.add_argument("--size", type=int, default=256, help="image side; also the short side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--ray", action="store_true", help="also time the Ray Train stage")
    return parser.parse_args()


def labelled_rows(scenes: SyntheticScenes) -> list[dict[str, object]]:
    """One object per image as the cluster stage writes it: RLE mask, box, 0-based cluster."""
    rows = []
    for image_id in scenes.image_ids():
        sample = scenes.load(image_id)
        assert sample.instance_masks is not None and sample.instance_classes is not None
        mask = sample.instance_masks[0]
        rows.append(
            {
                "image_id": image_id,
                "height": sample.height,
                "width": sample.width,
                "mask_rle": encode_rle(mask)["counts"],
                "bbox": list(mask_to_box(mask)),
                "cluster": int(sample.instance_classes[0]) - 1,
            }
        )
    return rows


Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


def plain_rate(args: argparse.Namespace, batch_at: Callable[[int], Batch], classes: int) -> float:
    device = torch.device(args.device)
    model = build_detector(
        arch=args.arch,
        num_classes=classes,
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
                [im.to(device) for im in images],
                [{k: v.to(device) for k, v in t.items()} for t in targets],
            )
        optimizer.zero_grad()
        sum(losses.values()).backward()  # type: ignore[union-attr]
        optimizer.step()
    _sync(device)
    return args.iters * args.batch / (time.perf_counter() - start)


def loaded(samples: MaskTargets, batch: int) -> Callable[[int], Batch]:
    """Batches decoded and rendered in the loop, one after the other (no loader threads)."""

    def batch_at(iteration: int) -> Batch:
        indices = [(iteration * batch + i) % len(samples) for i in range(batch)]
        images, targets = collate([samples[i] for i in indices])
        return list(images), list(targets)

    return batch_at


def on_device(samples: MaskTargets, args: argparse.Namespace) -> Callable[[int], Batch]:
    """One fixed batch already on the device: the training step alone."""
    images, targets = loaded(samples, args.batch)(0)
    images = [im.to(args.device) for im in images]
    targets = [{k: v.to(args.device) for k, v in t.items()} for t in targets]
    return lambda iteration: (images, targets)


def ray_rate(args: argparse.Namespace, rows: list[dict[str, object]], classes: int) -> float:
    import ray

    from jobs import train_detector

    with tempfile.TemporaryDirectory() as run_dir:
        config = ray_config(args, run_dir)
        run = RunDir(run_dir)
        write_table(run, pa.Table.from_pylist(rows), *labeled_path("train"))
        write_manifest(run, StageManifest("cluster", "bench", metrics={"clusters": classes - 1}))
        ray.init(include_dashboard=False, log_to_driver=False)
        train_detector.run_stage(config)
        log = [json.loads(line) for line in run.read_bytes("detector", "log.jsonl").splitlines()]
        times = [r["time"] for r in log if "time" in r]
        warmup = max(1, args.iters // 4)
        return (len(times) - 1 - warmup) * args.batch / (times[-1] - times[warmup])


def ray_config(args: argparse.Namespace, run_dir: str) -> ExperimentConfig:
    warmup = max(1, args.iters // 4)
    overrides = {
        "run_dir": run_dir,
        "data.synthetic.train_images": args.images,
        "data.synthetic.image_size": f"[{args.size}, {args.size}]",
        "detector.arch": args.arch,
        "detector.init": "none",
        "detector.train_short_side": f"[{args.size}, {args.size}]",
        "detector.batch_size": args.batch,
        "detector.max_iters": args.iters + warmup + 1,
        "detector.checkpoint_every": 10_000,
        "detector.resources.use_gpu": str(args.device.startswith("cuda")).lower(),
        "detector.precision": "bf16" if args.bf16 else "fp32",
        "detector.resources.cpus_per_worker": 1 if args.device.startswith("cuda") else 2,
        "detector.schedule": "{base_lr: 0.001, warmup_iters: 0, milestones: []}",
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse()
    scenes = SyntheticScenes(num_images=args.images, image_size=(args.size, args.size), seed=3)
    rows = labelled_rows(scenes)
    classes = 7  # six synthetic classes + background
    samples = MaskTargets(rows, scenes)
    results = [("step", plain_rate(args, on_device(samples, args), classes))]
    if args.device.startswith("cuda"):
        memory = torch.cuda.max_memory_allocated() / 2**30
    results.append(("plain", plain_rate(args, loaded(samples, args.batch), classes)))
    if args.ray:
        results.append(("ray-train", ray_rate(args, rows, classes)))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    precision = "bf16" if args.bf16 else "fp32"
    print(f"{args.arch} on {device}, {precision}, {args.size} px, batch {args.batch}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory (plain loop): {memory:.1f} GiB")
    print(f"{'path':<10} {'img/s':>8}")
    for name, rate in results:
        print(f"{name:<10} {rate:>8.2f}")


if __name__ == "__main__":
    main()
