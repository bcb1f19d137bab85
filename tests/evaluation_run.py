"""A run directory with real mined and pseudo-label tables for the evaluation tests.

`write_scored_run` writes, from each synthetic image's ground truth, the cluster stage's
`cluster/<split>.parquet` (a row group per shard of `row_group` sorted ids, as the mine parts)
and the distill stage's `distill/<split>/part-NNNNN.parquet` (shards of `row_group` sorted ids),
imperfect on purpose (shifted masks, a swapped cluster, missing rows, a spurious candidate) so
that every Table 1 row and every mask AP setting scores something between 0 and 1.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from maskdistill import outputs
from maskdistill.config import ExperimentConfig
from maskdistill.data import dataset_of
from maskdistill.masks import encode_rle
from maskdistill.pseudolabels import encode_label_map
from maskdistill.rundir import RunDir
from maskdistill.shards import shard_ids, write_shard
from tests.runs import write_run

CLUSTERS = 4  # tests.runs.NUM_CLASSES - 1: the segmenter's labels are 1 + cluster
CLUSTER_OF_CLASS = {1: 2, 2: 0, 3: 3, 4: 1}  # synthetic class -> cluster, a permutation


def write_scored_run(
    tmp_path: Path, *overrides: str, val_images: int = 10, row_group: int = 4
) -> ExperimentConfig:
    """A run of 32 x 48 synthetic images (4 classes) with the tables of its train and val."""
    run_dir = write_run(
        tmp_path,
        "data.synthetic.num_classes=4",
        "data.synthetic.train_images=4",
        f"data.synthetic.val_images={val_images}",
        "data.synthetic.image_size=[32, 48]",
        "data.synthetic.max_objects=2",
        "evaluation.resources.num_gpus=0",
        "evaluation.resources.batch_size=3",
        "evaluation.resources.loader_workers=0",
        f"mining.shard_size={row_group}",  # the evaluation's shards: row_group sorted ids
        *overrides,
    )
    run = RunDir(str(run_dir))
    config = run.read_config()
    for split in ("train", "val"):
        _write_tables(config, run, split, row_group)
    return config


def _write_tables(config: ExperimentConfig, run: RunDir, split: str, row_group: int) -> None:
    dataset = dataset_of(config.data, split)
    mined, pseudo = [], []
    for i, image_id in enumerate(sorted(dataset.image_ids())):
        sample = dataset.load(image_id)
        assert sample.instance_masks is not None and sample.instance_classes is not None
        masks, classes = sample.instance_masks, sample.instance_classes
        clusters = [CLUSTER_OF_CLASS[int(c)] for c in classes]
        size = {"height": sample.height, "width": sample.width}
        if i % 4 != 3:  # every 4th image has no mined mask
            mask = np.roll(masks[0], i % 3, axis=1)  # 0, 1 or 2 pixels off
            cluster = (clusters[0] + 1) % CLUSTERS if i % 5 == 2 else clusters[0]
            mined.append(_mined_row(image_id, size, mask, cluster, 0.1 + 0.1 * (i % 7)))
        if i % 5 != 4:  # every 5th image has no pseudo labels
            pseudo.append(_pseudo_row(image_id, size, masks, clusters, i))
    shards = shard_ids(list(dataset.image_ids()), row_group)
    mined_by_id = {row["image_id"]: row for row in mined}
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, outputs.LABELED_SCHEMA) as writer:  # a row group per shard
        for ids in shards:
            rows = [mined_by_id[i] for i in ids if i in mined_by_id]
            writer.write_table(pa.Table.from_pylist(rows, schema=outputs.LABELED_SCHEMA))
    run.write_bytes(sink.getvalue().to_pybytes(), *outputs.labeled_path(split))
    pseudo_by_id = {row["image_id"]: row for row in pseudo}
    for shard, ids in enumerate(shards):
        rows = [pseudo_by_id[i] for i in ids if i in pseudo_by_id]
        write_shard(run, outputs.pseudo_folder(split), shard, rows, [], outputs.PSEUDO_SCHEMA)


def _mined_row(
    image_id: str, size: dict[str, int], mask: np.ndarray, cluster: int, score: float
) -> dict[str, object]:
    return {
        "image_id": image_id,
        **size,
        "mask_rle": encode_rle(mask)["counts"],
        "bbox": [0, 0, 1, 1],
        "score": score,
        "seed_patch": [0, 0],
        "seed_box": [0, 0, 1, 1],
        "feature": [0.0, 1.0],
        "cluster": cluster,
    }


def _pseudo_row(
    image_id: str, size: dict[str, int], masks: np.ndarray, clusters: list[int], i: int
) -> dict[str, object]:
    labels = np.zeros(masks.shape[1:], np.uint8)
    for mask, cluster in zip(masks, clusters, strict=True):
        labels[np.roll(mask, i % 2, axis=0)] = 1 + cluster
    spurious = np.zeros(masks.shape[1:], bool)
    spurious[:6, :6] = True  # a corner patch: a false positive
    candidates = [*(np.roll(m, i % 3, axis=0) for m in masks), spurious]
    scores = [0.9 - 0.1 * j - 0.01 * (i % 4) for j in range(len(masks))] + [0.5]
    return {
        "image_id": image_id,
        **size,
        "label_png": encode_label_map(labels),
        "kept": len(masks),
        "best_score": scores[0],
        "candidate_rle": [encode_rle(m)["counts"] for m in candidates],
        "candidate_bbox": [[0.0, 0.0, 1.0, 1.0]] * len(candidates),
        "candidate_score": scores,
        "candidate_class": [*clusters, (i + 1) % CLUSTERS],
    }
