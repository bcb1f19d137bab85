"""DINO learning curve (issue 7): how the teacher's mined masks change while it trains.

    python benchmarks/pretrain_curve.py --config configs/demo.yaml --iters 1000 --every 250 \\
        --set backbone.arch=test_vit [--set pretrain.lr=0.008 ...] [--device cuda] [--seconds S] \\
        [--save F] [--picture F.png]

Trains as the pretrain stage does (`build_dino`, DINO's schedules over `pretrain.epochs`, the
optimizer hooks, `multi_crop_batch`, batches by `engine.batch_indices`) in one process without
Ray, checkpoints or resume, and stops after --iters iterations or --seconds of wall time (the
schedules still span `pretrain.epochs`). The views are rendered on --device. Every --every
iterations it mines the val split with the teacher as the mine stage would (`mining` settings)
and prints:

  loss          mean DINO loss over the last --every iterations
  entropy       mean entropy of the teacher's centred, sharpened output on the last batch, in
                nats; ln(out_dim) is a uniform teacher (collapse), 0 a one-hot one
  mined IoU     mean IoU of each image's mined mask with its best-matching object
  IoU>=0.5      share of images whose mined mask reaches IoU 0.5
  seed on obj   share of images whose seed patch (argmax CLS attention) lies mostly on an object
  seconds       wall time since the start

Synthetic scenes, not the JPEG folder of the other benchmarks: the mined IoU needs their ground
truth. The pretrain stage's loader on VOC-size JPEGs is measured by benchmarks/loaders.py.

Row 0 is the untrained network (timm's initialisation under `seed`). --save writes the last
teacher backbone (DINO's release format, as the stage exports it), --picture the last teacher's
CLS attention on the first `pretrain.attention_images` val images (`attention_picture`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from mined_iou import mine_all  # a sibling script: run this file as a script, as documented
from PIL import Image

from maskdistill.backbones import ViTBackbone, save_backbone
from maskdistill.config import ExperimentConfig, load_config
from maskdistill.data import build_dataset
from maskdistill.engine import batch_indices
from maskdistill.masks import best_match_iou
from maskdistill.mining import MinedMask
from maskdistill.pretrain import (
    DINO,
    MultiCrop,
    attention_picture,
    build_dino,
    build_optimizer,
    dino_schedules,
    multi_crop_batch,
    teacher_backbone,
)


def seed_on_object(mined: MinedMask, objects: np.ndarray) -> bool:
    """Whether most pixels of the seed patch belong to some ground-truth object."""
    x0, y0, x1, y1 = mined.seed_box
    return bool(objects[:, y0:y1, x0:x1].any(0).mean() > 0.5)


def mined_scores(
    backbone: ViTBackbone,
    images: Sequence[np.ndarray],
    objects: Sequence[np.ndarray],
    config: ExperimentConfig,
    *,
    device: torch.device,
) -> tuple[float, float, float]:
    """(mean IoU, share with IoU >= 0.5, share with the seed on an object) over the images."""
    mined = mine_all(backbone, images, config, device=device, batch_size=32)
    ious = np.array([best_match_iou(m.mask, o) for m, o in zip(mined, objects, strict=True)])
    seeds = [seed_on_object(m, o) for m, o in zip(mined, objects, strict=True)]
    return float(ious.mean()), float(np.mean(ious >= 0.5)), float(np.mean(seeds))


@torch.no_grad()
def teacher_entropy(dino: DINO, views: Sequence[torch.Tensor], temperature: float) -> float:
    """Mean entropy (nats) of the teacher's centred, sharpened output on the global views."""
    logits = dino.teacher(views[:2]).float()
    probs = ((logits - dino.center) / temperature).softmax(-1)
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--iters", type=int, default=1000, help="stop after this many")
    parser.add_argument("--every", type=int, default=250, help="evaluate every this many")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this (0: never)")
    parser.add_argument("--save", help="write the last teacher backbone here")
    parser.add_argument("--picture", help="write the last teacher's attention picture here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    pre, device = config.pretrain, torch.device(args.device)
    train = build_dataset(config.data, config.data.train_split)
    val = build_dataset(config.data, config.data.val_split or config.data.train_split)
    images = [train.load(image_id).image for image_id in train.image_ids()]
    samples = [val.load(image_id) for image_id in val.image_ids()]
    val_images = [s.image for s in samples]
    objects = [s.instance_masks for s in samples if s.instance_masks is not None]
    if len(objects) != len(samples):
        raise SystemExit("the val split has no instance masks to score against")
    schedules = dino_schedules(pre, iters_per_epoch=max(1, len(images) // pre.batch_size))
    torch.manual_seed(config.seed)
    dino = build_dino(arch=config.backbone.arch, config=pre, seed=config.seed).to(device)
    optimizer, scheduler = build_optimizer(dino, schedules, clip_grad=pre.clip_grad)
    crops = MultiCrop.from_config(pre)

    def scores() -> tuple[float, float, float]:
        backbone = teacher_backbone(dino).to(device)
        return mined_scores(backbone, val_images, objects, config, device=device)

    print(
        f"{config.backbone.arch} on {len(images)} train images, batch {pre.batch_size}, "
        f"schedules over {schedules.iterations} iterations, ln(out_dim) = "
        f"{math.log(pre.out_dim):.2f}, {device}"
    )
    print(
        f"{'iteration':>9} {'loss':>7} {'entropy':>8} {'mined IoU':>10} {'IoU>=0.5':>9} "
        f"{'seed on obj':>12} {'seconds':>8}"
    )
    print(f"{0:>9} {'':>7} {'':>8} " + "{:>10.3f} {:>9.3f} {:>12.3f}".format(*scores()))
    start, losses = time.perf_counter(), []
    total = min(args.iters, schedules.iterations)
    for iteration in range(total):
        indices = batch_indices(
            iteration,
            rank=0,
            world_size=1,
            batch_size=pre.batch_size,
            num_samples=len(images),
            seed=config.seed,
        )
        views = multi_crop_batch(
            [images[i] for i in indices],
            crops,
            indices=indices,
            iteration=iteration,
            seed=0,
            device=device,
        )
        temperature = schedules.at("teacher_temp", iteration)
        with torch.autocast(device.type, torch.bfloat16, enabled=pre.precision == "bf16"):
            loss = dino(views, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        out_of_time = 0 < args.seconds < time.perf_counter() - start
        if (iteration + 1) % args.every == 0 or iteration + 1 == total or out_of_time:
            entropy = teacher_entropy(dino, views, temperature)
            print(
                f"{iteration + 1:>9} {np.mean(losses[-args.every :]):>7.3f} {entropy:>8.3f} "
                + "{:>10.3f} {:>9.3f} {:>12.3f}".format(*scores())
                + f" {time.perf_counter() - start:>8.1f}",
                flush=True,
            )
        if out_of_time:
            break
    teacher = teacher_backbone(dino)
    if args.save:
        save_backbone(teacher, args.save)
    if args.picture:
        picture = attention_picture(teacher.to(device), val_images[: pre.attention_images])
        Image.fromarray(picture).save(args.picture)


if __name__ == "__main__":
    main()
