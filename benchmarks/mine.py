"""Mining throughput (Sec 3.2): images/s for ViT + masks, + object features, and end to end.

    python benchmarks/mine.py                       # CPU, vit_tiny, 64 VOC-size JPEGs, minutes
    python benchmarks/mine.py --device cuda --bf16 --count 1024 --batch-size 64 \\
        --arch vit_small_patch16_224 --short-side 640 --decode-threads 16    # the H100 rows
    python benchmarks/mine.py --images DIR ...      # a folder of your own images instead

Images: VOC-size JPEGs (`jpeg_folder.py`: 375x500 and 500x375, made once and cached), or the
first `--count` images of `--images DIR`. Rows:
  masks     ViT forward + `object_masks` + masks, boxes and seed boxes at the original sizes
            (`mine_images`, batched on the device, one copy back), images already decoded
  +features the above plus each object's CLS feature from its `--view-size` crop, batched on
            the device (`ObjectFeatures`, what the mine stage stores)
  e2e-plain the JPEG files decoded by a thread pool, then the `+features` step, in one process
  decode    the thread pool's decoding alone
  e2e-ray   the `mine` Ray Data job over the same folder (`--ray`, needs `.[cluster]`): decode
            tasks overlap the GPU actor

Targets (issue 15) on one H100, bf16, ViT-S/16 at short side 640: `masks` >= 900 img/s, and
end to end (`e2e-ray`, else `e2e-plain`) >= 0.8x `masks`. The anchor, a plain torch loop of
the ViT and the mask math, gave 1185 img/s there; before the batched path the stage gave 549
masks, 207 with features and 211 end to end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jpeg_folder  # sibling scripts: run this file as a script, as documented
import numpy as np
import torch

from maskdistill.backbones import build_backbone
from maskdistill.clustering import ObjectFeatures
from maskdistill.mining import mine_images


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vit_tiny_patch16_224")
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--view-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--decode-threads", type=int, default=8)
    parser.add_argument("--ray", action="store_true", help="also time the Ray Data job")
    jpeg_folder.add_arguments(parser, count=64)
    return parser.parse_args()


def timed(step: Callable[[list], object], batches: list[list], device: str) -> float:
    """Images per second of `step` over all batches, after one warm-up batch."""
    step(batches[0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    args = parse()
    folder = jpeg_folder.from_arguments(args)
    ids = folder.image_ids()
    dataset = folder.dataset
    images = [dataset.load(i).image for i in ids]
    backbone = build_backbone(args.arch).to(args.device)
    features = ObjectFeatures(backbone=backbone, mode="crop", size=args.view_size)
    kwargs = {"short_side": args.short_side, "device": args.device, "bf16": args.bf16}

    def masks(batch: Sequence[np.ndarray]) -> list:
        return mine_images(backbone, batch, **kwargs)

    def with_features(batch: Sequence[np.ndarray]) -> list:
        return mine_images(backbone, batch, features=features, **kwargs)

    pool = ThreadPoolExecutor(args.decode_threads)

    def decode(batch_ids: list[str]) -> list[np.ndarray]:
        return list(pool.map(lambda i: dataset.load(i).image, batch_ids))

    size = args.batch_size
    rows = [
        ("masks", timed(masks, _batches(images, size), args.device)),
        ("+features", timed(with_features, _batches(images, size), args.device)),
        ("e2e-plain", timed(lambda b: with_features(decode(b)), _batches(ids, size), args.device)),
        ("decode", timed(decode, _batches(ids, size), "cpu")),
    ]
    if args.ray:
        rows.append(("e2e-ray", ray_rate(args, folder)))
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU x{torch.get_num_threads()} threads"
    )
    shapes = sorted({tuple(image.shape[:2]) for image in images})
    print(
        f"{args.arch} on {device}, {'bf16' if args.bf16 else 'fp32'}, {len(images)} images "
        f"{' '.join(f'{h}x{w}' for h, w in shapes[:4])} from {folder.root / folder.split} at "
        f"short side {args.short_side}, batch {size}, views {args.view_size}"
    )
    print(f"{'step':<10} {'img/s':>8}")
    for name, rate in rows:
        print(f"{name:<10} {rate:>8.1f}")


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def ray_rate(args: argparse.Namespace, folder: jpeg_folder.JpegFolder) -> float:
    import ray

    from jobs import mine
    from maskdistill.config import load_config

    gpus = 1.0 if args.device.startswith("cuda") else 0.0
    cpus = 1.0 if gpus else max(1.0, torch.get_num_threads() - 0.5)  # leave room for decoding
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(
            None,
            [
                f"run_dir={run_dir}",
                "data.kind=folder",
                f"data.root={folder.root}",
                f"data.train_split='{folder.split}'",
                "data.val_split=null",
                f"backbone.arch={args.arch}",
                f"mining.short_side={args.short_side}",
                f"mining.resources.batch_size={args.batch_size}",
                f"mining.resources.num_gpus={gpus}",
                f"mining.resources.num_cpus={cpus}",
                f"mining.precision={'bf16' if args.bf16 else 'fp32'}",
                f"clustering.view_size={args.view_size}",
                "clustering.num_clusters=2",
            ],
        )
        ray.init(include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        mine.run_stage(config, preview=0)
        return len(folder.image_ids()) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
