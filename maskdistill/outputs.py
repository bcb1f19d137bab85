"""Where every stage's output lives under the run directory, its schema, and how to read it.

The one place drivers, benchmarks, `predict` and the service learn the layout of a run
(`maskdistill.stages` holds the names, order and hashes). Rows join by `image_id`.

    data/<split>.parquet              INDEX_SCHEMA: every readable image's size
    pretrain/backbone.pth             the teacher ViT in DINO's release format
    mine/<split>/part-NNNNN.parquet   MASK_SCHEMA: one mined object per image (Sec 3.2)
    cluster/<split>.parquet           LABELED_SCHEMA: the mined rows plus their cluster, one
                                      row group per mine part, in shard order
    cluster/kmeans.npz                centroids and feature transform
    cluster/gallery/cluster_NNN.png   a cluster's most and least typical train masks
    cluster/gallery/sheet.png         one row of typical masks per cluster, labelled
    cluster/gallery/index.html        each cluster's size, share and picture (self-contained)
    cluster/gallery/gallery.json      per cluster: size, share, shown image ids, distances
    detector/model.pt                 {"model", "num_classes", "arch"}
    distill/<split>/part-NNNNN.parquet  PSEUDO_SCHEMA: confident pseudo labels (Sec 3.3)
    distill/gallery/...               the same files for the kept train masks, by score
    names.yaml                        the user's names, merges, background clusters
    segmenter/model.pt                {"model", "num_classes", "cluster_labels"}
    refine/round_N/labels/part-NNNNN.parquet  REFINED_SCHEMA: round N's CRF labels (S1)
    refine/round_N/model.pt           the segmenter retrained on them, as segmenter/model.pt
    evaluate/metrics.json, table1.md  Table 1 rows, per-class IoU, mask AP (and pictures)
    evaluate/class_names.json         the class each segmenter label was matched to
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from maskdistill.clustering import FeatureTransform, KMeansResult
from maskdistill.config import ExperimentConfig
from maskdistill.names import ClassMap, read_class_map
from maskdistill.rows import row_groups
from maskdistill.rows_by_id import RowsById
from maskdistill.rundir import RunDir, read_manifest
from maskdistill.shards import (
    iter_parts,
    part_uris,
    read_parts,
    split_folder,
    split_name,
)
from maskdistill.stages import (
    CLUSTER,
    DATA,
    DISTILL,
    EVALUATE,
    MINE,
    PRETRAIN,
    REFINE,
    SEGMENTER,
    pretrain_wanted,
    refine_wanted,
)

MODEL_FILE = "model.pt"
PRETRAINED_BACKBONE = (PRETRAIN, "backbone.pth")
KMEANS = (CLUSTER, "kmeans.npz")
CLASS_NAMES_FILE = (EVALUATE, "class_names.json")
METRICS_FILE = (EVALUATE, "metrics.json")
TABLE1_FILE = (EVALUATE, "table1.md")
TABLE2_FILE = (EVALUATE, "table2.md")  # Table 2 form: linear probe and clustering, +CRF rows

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_instances", pa.int32()),
    ]
)
# One mined object mask per image (Sec 3.2).
MASK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_rle", pa.string()),  # COCO RLE counts of a [height, width] mask
        ("bbox", pa.list_(pa.int32(), 4)),  # x0, y0, x1, y1 in pixel edges
        ("score", pa.float32()),
        ("seed_patch", pa.list_(pa.int32(), 2)),  # (row, col) on the patch grid
        ("seed_box", pa.list_(pa.int32(), 4)),  # that patch on the image, x0, y0, x1, y1
        ("feature", pa.list_(pa.float32())),
    ]
)
LABELED_SCHEMA = MASK_SCHEMA.append(pa.field("cluster", pa.int32()))  # 0-based
PSEUDO_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("label_png", pa.binary()),  # 0 background, 1 + cluster elsewhere
        ("kept", pa.int32()),
        ("best_score", pa.float32()),
        ("candidate_rle", pa.list_(pa.string())),
        ("candidate_bbox", pa.list_(pa.list_(pa.float32(), 4))),
        ("candidate_score", pa.list_(pa.float32())),
        ("candidate_class", pa.list_(pa.int32())),  # 0-based cluster ids
    ]
)


def detector_splits(config: ExperimentConfig) -> list[str]:
    """The splits whose clustered masks train the detector (`detector.train_splits`)."""
    return list(config.detector.train_splits or [config.data.train_split])


def mask_ap_split(config: ExperimentConfig) -> str | None:
    """The split of Table 3's mask AP: `evaluation.mask_ap_split`, else the val split."""
    return config.evaluation.mask_ap_split or config.data.val_split


def mined_splits(config: ExperimentConfig) -> list[str]:
    """Train, val, the clustering support split, the detector's training splits and the mask
    AP split, each mined once (the mine stage hashes the keys that name them)."""
    data = config.data
    names = (
        data.train_split,
        data.val_split,
        config.clustering.support_split,
        *detector_splits(config),
        mask_ap_split(config),
    )
    return list(dict.fromkeys(s for s in names if s is not None))


def distilled_splits(config: ExperimentConfig) -> list[str]:
    """The mined splits the detector labels: train, val and the mask AP split; not a support
    split that only K-means reads (COCO20k: its 82783 train2014 images are clustered, never
    distilled) nor one that only trains the detector (PASCAL: voc07_trainval)."""
    data = config.data
    used = (data.train_split, data.val_split, mask_ap_split(config))
    return [s for s in mined_splits(config) if s in used]


def index_path(split: str) -> tuple[str, str]:
    return DATA, f"{split_name(split)}.parquet"


def read_index(run: RunDir, split: str) -> pa.Table:
    """Every readable image of a split with its size (INDEX_SCHEMA)."""
    return read_table(run, *index_path(split))


def backbone_weights(config: ExperimentConfig) -> str:
    """What mining loads: `backbone.weights`, or this run's pretrained backbone for 'pretrain'."""
    if pretrain_wanted(config):
        return RunDir(config.run_dir).uri_of(*PRETRAINED_BACKBONE)
    return config.backbone.weights


def mined_folder(split: str) -> str:
    return split_folder(MINE, split)


def read_mined(run: RunDir, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A split's mined masks, in shard order (only `columns` if given)."""
    return read_parts(run, mined_folder(split), MASK_SCHEMA, columns)


def mined_parts(run: RunDir, split: str) -> list[tuple[str, int]]:
    """A split's finished mine parts in shard order: (file name, rows), the rows from each
    Parquet footer alone (no data read)."""
    return [
        (uri.rsplit("/", 1)[-1], sum(g.rows for g in row_groups([uri])))
        for uri in part_uris(run, mined_folder(split))
    ]


def iter_mined(run: RunDir, split: str, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """A split's mined masks one part at a time, in shard order (only `columns` if given)."""
    return iter_parts(run, mined_folder(split), columns)


def gallery_folder(stage: str) -> str:
    """Where a stage's cluster gallery lives (`maskdistill.gallery` writes it)."""
    return f"{stage}/gallery"


def labeled_path(split: str) -> tuple[str, str]:
    return CLUSTER, f"{split_name(split)}.parquet"


def read_labeled(run: RunDir, split: str) -> pa.Table:
    """A split's mined masks with their clusters."""
    return read_table(run, *labeled_path(split))


def labeled_by_id(run: RunDir, split: str, columns: Sequence[str]) -> RowsById:
    """A split's clustered masks looked up one shard of image ids at a time (`columns` only)."""
    return RowsById([run.uri_of(*labeled_path(split))], columns)


def iter_labeled(
    run: RunDir, split: str, columns: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """A split's clustered masks one row group (at most one mine part) at a time, in order."""
    with run.fs.open_input_file(run.path(*labeled_path(split))) as f:
        parquet = pq.ParquetFile(f)
        names = None if columns is None else list(columns)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=names)


def read_table(run: RunDir, *parts: str) -> pa.Table:
    return pq.read_table(io.BytesIO(run.read_bytes(*parts)))


def write_table(run: RunDir, table: pa.Table, *parts: str) -> str:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return run.write_bytes(sink.getvalue(), *parts)


def features_of(table: pa.Table) -> np.ndarray:
    """float32 [N, D] features of a mined-mask table."""
    column = table.column("feature").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    width = len(column[0])
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)


def write_kmeans(run: RunDir, result: KMeansResult) -> str:
    transform = result.transform
    sink = io.BytesIO()
    np.savez(
        sink,
        centroids=result.centroids,
        mean=np.zeros(0) if transform.mean is None else transform.mean,
        matrix=np.zeros((0, 0)) if transform.matrix is None else transform.matrix,
        l2_normalize=np.array(transform.l2_normalize),
        inertia=np.array(result.inertia),
    )
    return run.write_bytes(sink.getvalue(), *KMEANS)


def read_kmeans(run: RunDir) -> KMeansResult:
    """The fitted K-means (no labels: `clustering.assign` labels features with it)."""
    saved = np.load(io.BytesIO(run.read_bytes(*KMEANS)))
    transform = FeatureTransform(
        mean=saved["mean"] if saved["mean"].size else None,
        matrix=saved["matrix"] if saved["matrix"].size else None,
        l2_normalize=bool(saved["l2_normalize"]),
    )
    inertia = float(saved["inertia"]) if "inertia" in saved else float("nan")
    return KMeansResult(np.zeros(0, np.int64), saved["centroids"], inertia, transform)


def num_clusters(run: RunDir) -> int:
    """K, from the cluster stage's manifest."""
    manifest = read_manifest(run, CLUSTER)
    if manifest is None:
        raise FileNotFoundError(f"no {CLUSTER} stage in {run.uri}: run it first")
    return int(manifest.metrics["clusters"])


def num_classes(run: RunDir) -> int:
    """The detector's labels: clusters + 1 (background)."""
    return num_clusters(run) + 1


def class_map(run: RunDir) -> ClassMap:
    """How the run's clusters become segmenter labels, and their names (names.yaml)."""
    return read_class_map(run.uri, num_clusters(run))


def pseudo_folder(split: str) -> str:
    return split_folder(DISTILL, split)


def read_pseudo(run: RunDir, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A split's pseudo-label rows (only `columns` if given)."""
    return read_parts(run, pseudo_folder(split), PSEUDO_SCHEMA, columns)


def pseudo_by_id(run: RunDir, split: str, columns: Sequence[str]) -> RowsById:
    """A split's pseudo labels looked up one shard of image ids at a time (`columns` only)."""
    return RowsById(part_uris(run, pseudo_folder(split)), columns)


# CRF self-training (S1): the dense CRF's labels of the train split, in the segmenter's labels
REFINED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("label_png", pa.binary()),  # segmenter labels: 0 background, then names.yaml's groups
        ("changed", pa.float32()),  # share of pixels the CRF moved off the segmenter's argmax
    ]
)


def refine_round(round_index: int) -> str:
    """A self-training round's folder: `labels/` parts, the retrained segmenter's model.pt."""
    return f"{REFINE}/round_{round_index}"


def refined_folder(round_index: int) -> str:
    return f"{refine_round(round_index)}/labels"


def read_refined(run: RunDir, round_index: int, columns: Sequence[str] | None = None) -> pa.Table:
    """A round's refined train labels (only `columns` if given)."""
    return read_parts(run, refined_folder(round_index), REFINED_SCHEMA, columns)


def final_segmenter(config: ExperimentConfig) -> str:
    """The folder of the segmenter the evaluation scores: the last self-training round's, or
    the segmenter stage's when self-training is off."""
    if refine_wanted(config):
        return refine_round(config.self_training.rounds - 1)
    return SEGMENTER


def has_weights(run: RunDir, stage: str) -> bool:
    return run.exists(stage, MODEL_FILE)


def read_weights(run: RunDir, stage: str) -> dict[str, Any]:
    """The `<stage>/model.pt` a training stage exported: {"model": state dict, ...extra}."""
    if not has_weights(run, stage):
        raise FileNotFoundError(f"{run.uri_of(stage, MODEL_FILE)}: no trained {stage} there")
    state: dict[str, Any] = torch.load(
        io.BytesIO(run.read_bytes(stage, MODEL_FILE)), map_location="cpu"
    )
    return state


def write_weights(run: RunDir, stage: str, model: dict[str, Any], **extra: Any) -> str:
    """Write `<stage>/model.pt`: the model's state dict and `extra` (num_classes, arch)."""
    buffer = io.BytesIO()
    torch.save({"model": model, **extra}, buffer)
    return run.write_bytes(buffer.getvalue(), stage, MODEL_FILE)


def read_metrics(run: RunDir) -> dict[str, Any]:
    """The evaluate stage's metrics: Table 1 rows by name (miou, iou, mapping), mask AP."""
    metrics: dict[str, Any] = run.read_json(*METRICS_FILE)
    return metrics
