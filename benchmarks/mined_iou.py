"""Mined-mask quality against ground truth (issue 7): does the backbone find an object?

    python benchmarks/mined_iou.py --config configs/demo.yaml \\
        --backbone runs/demo/pretrain/backbone.pth [--device cuda] [--set key=value ...]

For every image of the config's val split (synthetic scenes, or any data set with instance
masks), one mask is mined as the mine stage mines it (Sec 3.2, the config's `mining` settings)
and scored by its IoU with the best-matching ground-truth object. Rows:

  random init   `backbone.arch` with timm's random initialisation (torch seed --seed)
  whole image   the mask covering the whole image: what a mask that finds nothing scores
  pretrained    the `--backbone` file (e.g. what the pretrain stage wrote), when given

Columns: mean IoU over the images, and the share of images whose IoU is at least 0.5.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch

from maskdistill.backbones import ViTBackbone, build_backbone
from maskdistill.config import ExperimentConfig, load_config
from maskdistill.data import build_dataset
from maskdistill.masks import best_match_iou
from maskdistill.mining import MinedMask, mine_images


def mine_all(
    backbone: ViTBackbone,
    images: Sequence[np.ndarray],
    config: ExperimentConfig,
    *,
    device: str | torch.device,
    batch_size: int,
) -> list[MinedMask]:
    """One mined mask per image, as the mine stage mines it (the config's `mining` settings)."""
    mined: list[MinedMask] = []
    for start in range(0, len(images), batch_size):
        mined += mine_images(
            backbone,
            images[start : start + batch_size],
            short_side=config.mining.short_side,
            top_k=config.mining.top_k,
            cls_heads=config.mining.cls_heads,
            seed_component=config.mining.seed_component,
            device=device,
        )
    return mined


def mined_ious(
    backbone: ViTBackbone | None,
    images: Sequence[np.ndarray],
    objects: Sequence[np.ndarray],
    config: ExperimentConfig,
    *,
    device: str,
    batch_size: int,
) -> np.ndarray:
    """Per image IoU of the mined mask (the whole image when `backbone` is None)."""
    if backbone is None:
        masks = [np.ones(image.shape[:2], dtype=bool) for image in images]
    else:
        mined = mine_all(backbone, images, config, device=device, batch_size=batch_size)
        masks = [m.mask for m in mined]
    return np.array([best_match_iou(m, o) for m, o in zip(masks, objects, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--backbone", help="pretrained backbone file (row 'pretrained')")
    parser.add_argument("--split", help="default: the config's val split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random init")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    split = args.split or config.data.val_split or config.data.train_split
    dataset = build_dataset(config.data, split)
    samples = [dataset.load(image_id) for image_id in dataset.image_ids()]
    if any(s.instance_masks is None for s in samples):
        raise SystemExit(f"{split}: the data set has no instance masks to score against")
    images = [s.image for s in samples]
    objects = [s.instance_masks for s in samples if s.instance_masks is not None]
    torch.manual_seed(args.seed)
    rows: list[tuple[str, ViTBackbone | None]] = [
        ("random init", build_backbone(config.backbone.arch).to(args.device)),
        ("whole image", None),
    ]
    if args.backbone:
        rows.append(
            (
                "pretrained",
                build_backbone(config.backbone.arch, weights=args.backbone).to(args.device),
            )
        )
    print(
        f"{config.backbone.arch}, {split}: {len(images)} images, mined at short side "
        f"{config.mining.short_side}, top_k {config.mining.top_k}, on {args.device}"
    )
    print(f"{'backbone':<12} {'mean IoU':>9} {'IoU>=0.5':>9} {'seconds':>8}")
    for name, backbone in rows:
        start = time.perf_counter()
        ious = mined_ious(
            backbone, images, objects, config, device=args.device, batch_size=args.batch_size
        )
        seconds = time.perf_counter() - start
        print(f"{name:<12} {ious.mean():>9.3f} {(ious >= 0.5).mean():>9.3f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
