"""Stage `cluster` (Sec 3.2): K-means on the mined objects' CLS features gives pseudo classes.

    python -m jobs.cluster --config configs/pascal.yaml [--set clustering.overclustering=2]

Reads the `mine` parts of every split, fits the feature transform and K-means on the train
split (or on `clustering.support_split`, Sec 4.1: all COCO images for COCO20k), and writes
`run_dir/cluster/<split>.parquet` (the mined rows plus `cluster`, 0-based), the model as
`cluster/kmeans.npz` and `cluster/manifest.json` (K, inertia, cluster sizes). K-means on a few
hundred thousand features takes seconds on the driver, so this stage needs no workers.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import mine
from jobs.common import stage_main
from maskdistill.clustering import KMeansResult, assign, fit_kmeans, num_clusters_for
from maskdistill.config import ExperimentConfig
from maskdistill.data import build_dataset
from maskdistill.rundir import RunDir, StageManifest, execute
from maskdistill.shards import MASK_SCHEMA, read_parts, split_name

STAGE = "cluster"
LABELED_SCHEMA = MASK_SCHEMA.append(pa.field("cluster", pa.int32()))


def config_hash(config: ExperimentConfig) -> str:
    return config.section_hash("clustering") + mine.config_hash(config)


def features_of(table: pa.Table) -> np.ndarray:
    """float32 [N, D] features of a mined-mask table."""
    column = table.column("feature").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    width = len(column[0])
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)


def cluster_count(config: ExperimentConfig) -> int:
    """K: `clustering.num_clusters`, else the data set's class count, times overclustering."""
    classes = len(build_dataset(config.data, config.data.train_split).class_names)
    if config.clustering.num_clusters is None and classes == 0:
        raise ValueError(
            f"clustering.num_clusters must be set: data.kind={config.data.kind!r} has no classes"
        )
    return num_clusters_for(
        config.clustering.num_clusters, classes, config.clustering.overclustering
    )


def table_path(config: ExperimentConfig, split: str | None = None) -> tuple[str, str]:
    """Run-directory parts of a split's labelled-mask table (the train split by default)."""
    name = config.data.train_split if split is None else split
    return STAGE, f"{split_name(name)}.parquet"


def read_labeled(run: RunDir, config: ExperimentConfig, split: str | None = None) -> pa.Table:
    """A split's mined masks with their clusters (the train split by default)."""
    return pq.read_table(io.BytesIO(run.read_bytes(*table_path(config, split))))


def save_kmeans(run: RunDir, result: KMeansResult) -> None:
    transform = result.transform
    sink = io.BytesIO()
    np.savez(
        sink,
        centroids=result.centroids,
        mean=np.zeros(0) if transform.mean is None else transform.mean,
        matrix=np.zeros((0, 0)) if transform.matrix is None else transform.matrix,
        l2_normalize=np.array(transform.l2_normalize),
    )
    run.write_bytes(sink.getvalue(), STAGE, "kmeans.npz")


def cluster_splits(config: ExperimentConfig, run: RunDir, manifest: StageManifest) -> None:
    """Fit on the support split, label every mined split, write one table per split."""
    clustering = config.clustering
    tables = {split: read_parts(run, mine.split_folder(split)) for split in mine.splits(config)}
    train = tables[config.data.train_split]
    support = tables[clustering.support_split] if clustering.support_split else None
    result = fit_kmeans(
        features_of(train),
        cluster_count(config),
        n_init=clustering.n_init,
        iterations=clustering.iterations,
        seed=clustering.seed,
        whiten=clustering.whiten,
        l2_normalize=clustering.l2_normalize,
        support=None if support is None else features_of(support),
    )
    save_kmeans(run, result)
    for split, table in tables.items():
        labels = result.labels if split == config.data.train_split else _assign(table, result)
        labeled = table.append_column("cluster", pa.array(labels, type=pa.int32()))
        sink = io.BytesIO()
        pq.write_table(labeled.cast(LABELED_SCHEMA), sink)
        run.write_bytes(sink.getvalue(), *table_path(config, split))
        manifest.inputs += table.num_rows
        manifest.outputs += labeled.num_rows
    sizes = np.bincount(result.labels, minlength=len(result.centroids))
    manifest.metrics.update(
        {"clusters": len(result.centroids), "inertia": result.inertia, "smallest": int(sizes.min())}
    )
    manifest.metrics.update({f"size_{k}": int(n) for k, n in enumerate(sizes)})


def _assign(table: pa.Table, result: KMeansResult) -> np.ndarray:
    return assign(features_of(table), result) if table.num_rows else np.zeros(0, np.int64)


def run_stage(config: ExperimentConfig, *, force: bool = False) -> StageManifest | None:
    """Cluster the mined masks; None when already complete for this config."""
    run = RunDir(config.run_dir)
    return execute(
        run, STAGE, config_hash(config), lambda m: cluster_splits(config, run, m), force=force
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage, needs_ray=False)


if __name__ == "__main__":
    raise SystemExit(main())
