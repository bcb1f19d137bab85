"""Stage `mine` (Sec 3.2) as a Ray Data job: one object mask and feature per image.

    python -m jobs.mine --config configs/pascal.yaml [--set mining.resources.concurrency=8]

Image ids are cut into shards of `mining.shard_size`; CPU tasks decode, a pool of
`mining.resources.concurrency` actors with `resources.num_gpus` GPUs each runs the ViT and the
mask math on batches of `resources.batch_size`, and the driver writes each finished shard as
`run_dir/mine/<split>/part-NNNNN.parquet` (schema `maskdistill.outputs.MASK_SCHEMA`). A rerun
after a crash mines only the shards without a part. Unreadable images are skipped, counted per
reason in `mine/manifest.json` and listed in `mine/skipped.parquet`. With `mining.source:
ground_truth` (an upper-bound diagnostic) the actors write each image's largest labelled object
instead, with no ViT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from jobs.common import connect, execute_stage, start
from jobs.sharded import ShardedMap, run_sharded
from maskdistill.backbones import build_backbone
from maskdistill.clustering import ObjectFeatures
from maskdistill.config import ExperimentConfig
from maskdistill.data import dataset_of
from maskdistill.masks import decode_rle, encode_rle
from maskdistill.mining import MinedMask, mine_images
from maskdistill.oracle import NO_OBJECT, largest_object
from maskdistill.outputs import (
    MASK_SCHEMA,
    backbone_weights,
    mined_folder,
    mined_splits,
)
from maskdistill.rows import first_rows
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.shards import part_uris
from maskdistill.stages import MINE
from maskdistill.visualize import image_grid, mask_tile, png_bytes

STAGE = MINE


class Miner:
    """GPU actor: the ViT stays loaded; each batch gives masks (Sec 3.2) and object features,
    computed batched on the device with one copy back per batch (`mine_images`); decoding runs
    in Ray Data's CPU tasks, overlapping the GPU.

    With `clustering.backbone` a second ViT (the release: ViT-S/8) gives the features.
    """

    def __init__(self, config: ExperimentConfig) -> None:
        res = config.mining.resources
        torch.set_num_threads(math.ceil(res.num_cpus))  # Ray sets OMP threads to 1
        use_gpu = res.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.bf16 = use_gpu and config.mining.precision == "bf16"
        self.backbone = build_backbone(config.backbone.arch, weights=backbone_weights(config))
        self.backbone.to(self.device)
        own = config.clustering.backbone
        self.feature_backbone = (
            self.backbone
            if own is None
            else build_backbone(own.arch, weights=own.weights).to(self.device)
        )
        self.mining = config.mining
        self.features = ObjectFeatures(
            backbone=self.feature_backbone,
            mode=config.clustering.feature,
            crop=config.clustering.crop,
            size=config.clustering.view_size,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        readable = [i for i, reason in enumerate(batch["reason"]) if not reason]
        images = [batch["image"][i] for i in readable]
        mined = mine_images(
            self.backbone,
            images,
            short_side=self.mining.short_side,
            top_k=self.mining.top_k,
            cls_heads=self.mining.cls_heads,
            seed_component=self.mining.seed_component,
            device=self.device,
            bf16=self.bf16,
            features=self.features,
        )
        # Sec 3.2: the CLS token of each object's view (box crop or masked image)
        features = np.array([m.feature for m in mined], dtype=np.float32)
        features = features.reshape(len(mined), self.feature_backbone.embed_dim)
        return mined_columns(batch, batch["reason"], mined, features)


class GroundTruthMiner:
    """`mining.source: ground_truth` (an upper-bound diagnostic): each image's largest labelled
    object in place of the ViT's mask, a one-hot of its class as feature (`maskdistill.oracle`).
    """

    def __init__(self, config: ExperimentConfig, split: str) -> None:
        self.dataset = dataset_of(config.data, split)
        self.num_classes = len(self.dataset.class_names)
        self.patch_size = build_backbone(config.backbone.arch).patch_size  # the seed's grid
        self.short_side = config.mining.short_side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        reasons = batch["reason"].astype(object)  # room for a longer reason than the batch's
        found = []
        for i, image_id in enumerate(batch["image_id"]):
            if reasons[i]:
                continue
            obj = largest_object(
                self.dataset.load(str(image_id)),
                num_classes=self.num_classes,
                patch_size=self.patch_size,
                short_side=self.short_side,
            )
            if obj is None:
                reasons[i] = NO_OBJECT
            else:
                found.append(obj)
        features = np.array([m.cls_token for m in found], np.float32)
        features = features.reshape(len(found), self.num_classes)
        return mined_columns(batch, reasons.astype(str), found, features)


def mined_columns(
    batch: dict[str, np.ndarray],
    reasons: np.ndarray,
    mined: list[MinedMask],
    features: np.ndarray,
) -> dict[str, Any]:
    """The actor's output: the images without a reason first, in order, with their `mined`
    masks and `features` [len(mined), D]; then the skipped ones with blank columns."""
    readable = [i for i, reason in enumerate(reasons) if not reason]
    order = readable + [i for i, reason in enumerate(reasons) if reason]
    blank = len(order) - len(mined)
    return {
        "image_id": batch["image_id"][order],
        "shard": batch["shard"][order],
        "reason": reasons[order],
        "height": np.array([m.height for m in mined] + [0] * blank, dtype=np.int32),
        "width": np.array([m.width for m in mined] + [0] * blank, dtype=np.int32),
        "mask_rle": np.array([encode_rle(m.mask)["counts"] for m in mined] + [""] * blank),
        "bbox": np.array([m.box for m in mined] + [(0, 0, 0, 0)] * blank, dtype=np.int32),
        "score": np.array([m.score for m in mined] + [0.0] * blank, dtype=np.float32),
        "seed_patch": np.array([m.seed_patch for m in mined] + [(0, 0)] * blank, np.int32),
        "seed_box": np.array([m.seed_box for m in mined] + [(0, 0, 0, 0)] * blank, np.int32),
        "feature": np.concatenate([features, np.zeros((blank, features.shape[1]), np.float32)]),
    }


def mine_split(config: ExperimentConfig, run: RunDir, split: str, manifest: StageManifest) -> None:
    """Mine every unfinished shard of `split`; each shard is written as soon as it is complete."""
    oracle = config.mining.source == "ground_truth"
    spec = ShardedMap(
        data=config.data,
        split=split,
        folder=mined_folder(split),
        shard_size=config.mining.shard_size,
        actor=GroundTruthMiner if oracle else Miner,
        to_row=_mask_row,
        resources=config.mining.resources,
        schema=MASK_SCHEMA,
        actor_kwargs={"config": config, "split": split} if oracle else {"config": config},
        desc=STAGE,
    )
    run_sharded(run, spec, manifest)


def _mask_row(image_id: str, out: dict[str, Any]) -> dict[str, object]:
    """A row of `MASK_SCHEMA` from one output row of the actor pool."""
    return {
        "image_id": image_id,
        "height": int(out["height"]),
        "width": int(out["width"]),
        "mask_rle": str(out["mask_rle"]),
        "bbox": [int(v) for v in out["bbox"]],
        "score": float(out["score"]),
        "seed_patch": [int(v) for v in out["seed_patch"]],
        "seed_box": [int(v) for v in out["seed_box"]],
        "feature": np.asarray(out["feature"], dtype=np.float32).tolist(),
    }


def run_stage(
    config: ExperimentConfig, *, force: bool = False, preview: int = 12
) -> StageManifest | None:
    """Mine every split and draw `preview` train images; None when already complete."""

    def mine_all(manifest: StageManifest) -> None:
        for split in mined_splits(config):
            mine_split(config, run, split, manifest)
        if preview:
            write_preview(config, run, config.data.train_split, preview)

    run = RunDir(config.run_dir)
    return execute_stage(config, STAGE, mine_all, force=force)


def write_preview(config: ExperimentConfig, run: RunDir, split: str, count: int) -> str:
    """A grid of the first `count` images of `split`: mask in colour, seed patch boxed."""
    table = first_rows(part_uris(run, mined_folder(split)), count)
    dataset = dataset_of(config.data, split)
    tiles = [
        mask_tile(
            dataset.load(row["image_id"]).image,
            decode_rle({"size": [row["height"], row["width"]], "counts": row["mask_rle"]}),
            tuple(row["seed_box"]),
        )
        for row in table
    ]
    rows = [tiles[i : i + 6] for i in range(0, len(tiles), 6)]
    return run.write_bytes(png_bytes(image_grid(rows)), f"{mined_folder(split)}_preview.png")


def main(argv: Sequence[str] | None = None) -> int:
    config, args = start(__doc__, argv, preview=12)
    connect()
    run_stage(config, force=args.force, preview=args.preview)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
