"""Mining throughput (Sec 3.2): images/s for ViT + masks, + object features, and end to end.

    python benchmarks/mine.py                                   # CPU, small, a minute
    python benchmarks/mine.py --device cuda --bf16 --images 2048 --batch-size 64 \\
        --arch vit_small_patch16_224 --size 480 640 --short-side 640

Rows:
  masks     ViT forward + `object_masks` + upsample/RLE-ready masks, images already decoded
  +features the above plus the CLS feature of each object's crop (what the mine stage stores)
  e2e-plain JPEG files decoded by a thread pool, then the `+features` step, in one process
  e2e-ray   the `mine` Ray Data job over the same JPEG folder (needs `.[cluster]`)

Targets on one H100, bf16, 640 px shorter side: >= 1000 img/s for `masks`, and an end-to-end
rate within 80% of the slower of that and CPU JPEG decoding (about 1100 img/s on 16 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskdistill.backbones import build_backbone
from maskdistill.clustering import object_views
from maskdistill.data.images import read_image_file
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.mining import mine_images


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    parser.add_argument("--short-side", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--view-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--decode-threads", type=int, default=8)
    parser.add_argument("--ray", action="store_true", help="also time the Ray Data job")
    return parser.parse_args()


def timed(step, batches: list, device: str) -> float:
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
    scenes = SyntheticScenes(num_images=args.images, image_size=tuple(args.size), seed=1)
    images = [scenes.load(i).image for i in scenes.image_ids()]
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    backbone = build_backbone(args.arch).to(args.device)
    kwargs = {"short_side": args.short_side, "device": args.device, "bf16": args.bf16}

    def masks(batch: list[np.ndarray]) -> list:
        return mine_images(backbone, batch, **kwargs)

    @torch.no_grad()
    def with_features(batch: list[np.ndarray]) -> None:
        mined = masks(batch)
        views = object_views(
            batch, [m.mask for m in mined], [m.box for m in mined], mode="crop", size=args.view_size
        )
        with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.bf16):
            backbone.cls_features(views.to(args.device)).float().cpu()

    rows = [
        ("masks", timed(masks, batches, args.device)),
        ("+features", timed(with_features, batches, args.device)),
    ]
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, image in enumerate(images):
            paths.append(str(Path(folder) / f"{i:06d}.jpg"))
            Image.fromarray(image).save(paths[-1], quality=90)
        pool = ThreadPoolExecutor(args.decode_threads)

        def decode_and_mine(batch_paths: list[str]) -> None:
            with_features(list(pool.map(lambda p: read_image_file(p, p), batch_paths)))

        path_batches = [
            paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)
        ]
        rows.append(("e2e-plain", timed(decode_and_mine, path_batches, args.device)))
        decode_only = timed(
            lambda b: list(pool.map(lambda p: read_image_file(p, p), b)), path_batches, "cpu"
        )
        rows.append(("decode", decode_only))
        if args.ray:
            rows.append(("e2e-ray", ray_rate(args, folder)))
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(
        f"{args.arch} on {device}, {'bf16' if args.bf16 else 'fp32'}, {args.images} images "
        f"{args.size[0]}x{args.size[1]} at short side {args.short_side}, batch {args.batch_size}"
    )
    print(f"{'step':<10} {'img/s':>8}")
    for name, rate in rows:
        print(f"{name:<10} {rate:>8.1f}")


def ray_rate(args: argparse.Namespace, folder: str) -> float:
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
                f"data.root={folder}",
                "data.train_split=''",
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
        return args.images / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
