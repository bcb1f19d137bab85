"""Stage `mine` (Sec 3.2) as a Ray Data job: one object mask and feature per image.

    python -m jobs.mine --config configs/pascal.yaml [--set mining.concurrency=8] [--preview 16]

Image ids are cut into shards of `mining.shard_size`; CPU tasks decode, a pool of
`mining.concurrency` actors with `mining.num_gpus` GPUs each runs the ViT and the mask math on
batches of `mining.batch_size`, and the driver writes each finished shard as
`run_dir/mine/<split>/part-NNNNN.parquet` (schema `maskdistill.shards.MASK_SCHEMA`). A rerun
after a crash mines only the shards without a part. Unreadable images are skipped and counted,
with their reasons, in `mine/manifest.json`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy
from tqdm import tqdm

from jobs.common import connect, start
from maskdistill.backbones import build_backbone
from maskdistill.clustering import object_views
from maskdistill.config import DataConfig, ExperimentConfig
from maskdistill.data import Dataset, UnreadableImage, build_dataset
from maskdistill.masks import decode_rle, encode_rle
from maskdistill.mining import mine_images
from maskdistill.rundir import RunDir, StageManifest, execute
from maskdistill.shards import finished_shards, read_parts, read_skipped, shard_ids, write_shard
from maskdistill.visualize import image_grid, mask_tile, png_bytes

STAGE = "mine"
DECODE_BATCH = 16
DECODE_CPUS = 0.5


def config_hash(config: ExperimentConfig) -> str:
    """What the mined masks and features depend on."""
    return config.section_hash(
        "data", "backbone", "mining", "clustering.feature", "clustering.view_size"
    )


def split_folder(split: str) -> str:
    """Where a split's parts go; an image folder's root split ('') is called `images`."""
    return f"{STAGE}/{split or 'images'}"


def splits(config: ExperimentConfig) -> list[str]:
    """Train, val and the clustering support split, each mined once."""
    names = (config.data.train_split, config.data.val_split, config.clustering.support_split)
    return list(dict.fromkeys(s for s in names if s is not None))


_DATASETS: dict[tuple[str, str], Dataset] = {}


def _dataset(data: DataConfig, split: str) -> Dataset:
    """The split's data set, built once per worker process."""
    key = (data.model_dump_json(), split)
    if key not in _DATASETS:
        _DATASETS[key] = build_dataset(data, split)
    return _DATASETS[key]


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array, even when the values are equal-shaped arrays."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def decode(batch: dict[str, np.ndarray], data: DataConfig, split: str) -> dict[str, Any]:
    """CPU task: image ids -> RGB images; an unreadable one gets an empty image and a reason."""
    dataset = _dataset(data, split)
    images, reasons = [], []
    for image_id in batch["image_id"]:
        try:
            images.append(dataset.load(str(image_id)).image)
            reasons.append("")
        except UnreadableImage as err:
            images.append(np.zeros((0, 0, 3), dtype=np.uint8))
            reasons.append(err.reason)
    return {
        "image_id": batch["image_id"],
        "shard": batch["shard"],
        "image": _objects(images),
        "reason": np.array(reasons),
    }


class Miner:
    """GPU actor: the ViT stays loaded; each batch gives masks (Sec 3.2) and object features."""

    def __init__(self, config: ExperimentConfig) -> None:
        torch.set_num_threads(math.ceil(config.mining.num_cpus))  # Ray sets OMP threads to 1
        use_gpu = config.mining.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.bf16 = use_gpu and config.mining.precision == "bf16"
        self.backbone = build_backbone(config.backbone.arch, weights=config.backbone.weights)
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
    """Mine every unfinished shard of `split`; write each shard as soon as it is complete."""
    folder = split_folder(split)
    shards = shard_ids(_dataset(config.data, split).image_ids(), config.mining.shard_size)
    done = finished_shards(run, folder)
    pending = {i: ids for i, ids in enumerate(shards) if i not in done}
    if pending:
        _mine_shards(config, run, folder, split, pending)
    table = read_parts(run, folder)
    manifest.inputs += sum(len(ids) for ids in shards)
    manifest.outputs += table.num_rows
    for entry in read_skipped(run, folder):
        manifest.skip(entry["image_id"], entry["reason"])
    manifest.metrics[f"{split}_shards"] = len(shards)
    manifest.metrics[f"{split}_shards_reused"] = len(done)


def _mine_shards(
    config: ExperimentConfig, run: RunDir, folder: str, split: str, pending: dict[int, list[str]]
) -> None:
    items = [{"image_id": image_id, "shard": i} for i, ids in pending.items() for image_id in ids]
    mined = (
        ray.data.from_items(items)
        .map_batches(
            decode,  # type: ignore[arg-type]  # Ray's stub wants a one-argument function
            fn_kwargs={"data": config.data, "split": split},
            batch_size=DECODE_BATCH,
            num_cpus=DECODE_CPUS,
        )
        .map_batches(
            Miner,
            fn_constructor_kwargs={"config": config},
            batch_size=config.mining.batch_size,
            compute=ActorPoolStrategy(size=config.mining.concurrency),
            num_cpus=config.mining.num_cpus,
            num_gpus=config.mining.num_gpus,
        )
    )
    rows: dict[int, list[dict[str, object]]] = defaultdict(list)
    skipped: dict[int, list[dict[str, str]]] = defaultdict(list)
    with tqdm(total=len(items), desc=f"mine:{split}", unit="img") as progress:
        for out in mined.iter_rows():
            shard, image_id = int(out["shard"]), str(out["image_id"])
            if out["reason"]:
                skipped[shard].append({"image_id": image_id, "reason": str(out["reason"])})
            else:
                rows[shard].append(_mask_row(image_id, out))
            progress.update()
            if len(rows[shard]) + len(skipped[shard]) == len(pending[shard]):
                write_shard(run, folder, shard, rows.pop(shard), skipped.pop(shard, []))


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
        for split in splits(config):
            mine_split(config, run, split, manifest)
        if preview:
            write_preview(config, run, config.data.train_split, preview)

    run = RunDir(config.run_dir)
    return execute(run, STAGE, config_hash(config), mine_all, force=force)


def write_preview(config: ExperimentConfig, run: RunDir, split: str, count: int) -> str:
    """A grid of the first `count` images of `split`: mask in colour, seed patch boxed."""
    table = read_parts(run, split_folder(split)).slice(0, count).to_pylist()
    dataset = _dataset(config.data, split)
    tiles = [
        mask_tile(
            dataset.load(row["image_id"]).image,
            decode_rle({"size": [row["height"], row["width"]], "counts": row["mask_rle"]}),
            tuple(row["seed_box"]),
        )
        for row in table
    ]
    rows = [tiles[i : i + 6] for i in range(0, len(tiles), 6)]
    return run.write_bytes(png_bytes(image_grid(rows)), f"{split_folder(split)}_preview.png")


def main(argv: Sequence[str] | None = None) -> int:
    config, args = start(__doc__, argv, preview=True)
    connect()
    run_stage(config, force=args.force, preview=args.preview)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
