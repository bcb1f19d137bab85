"""Stage `mine` (Sec 3.2) as a Ray Data job: one object mask and feature per image.

    python -m jobs.mine --config configs/pascal.yaml [--set mining.resources.concurrency=8]

Image ids are cut into shards of `mining.shard_size`; CPU tasks decode, a pool of
`mining.resources.concurrency` actors with `resources.num_gpus` GPUs each runs the ViT and the
mask math on batches of `resources.batch_size`, and the driver writes each finished shard as
`run_dir/mine/<split>/part-NNNNN.parquet` (schema `maskdistill.outputs.MASK_SCHEMA`). A rerun
after a crash mines only the shards without a part. Unreadable images are skipped and counted,
with their reasons, in `mine/manifest.json`.
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
from maskdistill.clustering import object_views
from maskdistill.config import ExperimentConfig
from maskdistill.data import dataset_of
from maskdistill.masks import decode_rle, encode_rle
from maskdistill.mining import mine_images
from maskdistill.outputs import (
    MASK_SCHEMA,
    backbone_weights,
    mined_folder,
    mined_splits,
    read_mined,
)
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import MINE
from maskdistill.visualize import image_grid, mask_tile, png_bytes

STAGE = MINE


class Miner:
    """GPU actor: the ViT stays loaded; each batch gives masks (Sec 3.2) and object features."""

    def __init__(self, config: ExperimentConfig) -> None:
        res = config.mining.resources
        torch.set_num_threads(math.ceil(res.num_cpus))  # Ray sets OMP threads to 1
        use_gpu = res.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.bf16 = use_gpu and config.mining.precision == "bf16"
        self.backbone = build_backbone(config.backbone.arch, weights=backbone_weights(config))
        self.backbone.to(self.device)
        self.mining = config.mining
        self.clustering = config.clustering

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
        )
        features = self._features(images, [m.mask for m in mined], [m.box for m in mined])
        order = readable + [i for i, reason in enumerate(batch["reason"]) if reason]
        blank = len(order) - len(mined)
        return {
            "image_id": batch["image_id"][order],
            "shard": batch["shard"][order],
            "reason": batch["reason"][order],
            "height": np.array([m.height for m in mined] + [0] * blank, dtype=np.int32),
            "width": np.array([m.width for m in mined] + [0] * blank, dtype=np.int32),
            "mask_rle": np.array([encode_rle(m.mask)["counts"] for m in mined] + [""] * blank),
            "bbox": np.array([m.box for m in mined] + [(0, 0, 0, 0)] * blank, dtype=np.int32),
            "score": np.array([m.score for m in mined] + [0.0] * blank, dtype=np.float32),
            "seed_patch": np.array([m.seed_patch for m in mined] + [(0, 0)] * blank, np.int32),
            "seed_box": np.array([m.seed_box for m in mined] + [(0, 0, 0, 0)] * blank, np.int32),
            "feature": np.concatenate([features, np.zeros((blank, features.shape[1]), np.float32)]),
        }

    @torch.no_grad()
    def _features(
        self, images: list[np.ndarray], masks: list[np.ndarray], boxes: list
    ) -> np.ndarray:
        """Sec 3.2: the CLS token of each object's view (box crop or masked image)."""
        if not images:
            return np.zeros((0, self.backbone.embed_dim), dtype=np.float32)
        views = object_views(
            images, masks, boxes, mode=self.clustering.feature, size=self.clustering.view_size
        ).to(self.device)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            return self.backbone.cls_features(views).float().cpu().numpy()


def mine_split(config: ExperimentConfig, run: RunDir, split: str, manifest: StageManifest) -> None:
    """Mine every unfinished shard of `split`; each shard is written as soon as it is complete."""
    spec = ShardedMap(
        data=config.data,
        split=split,
        folder=mined_folder(split),
        shard_size=config.mining.shard_size,
        actor=Miner,
        to_row=_mask_row,
        resources=config.mining.resources,
        schema=MASK_SCHEMA,
        actor_kwargs={"config": config},
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
    table = read_mined(run, split).slice(0, count).to_pylist()
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
