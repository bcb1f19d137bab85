"""Stage `cluster` (Sec 3.2): K-means on the mined objects' CLS features gives pseudo classes.

    python -m jobs.cluster --config configs/pascal.yaml [--set clustering.overclustering=2]

Reads the `mine` parts of every split, fits the feature transform and K-means on the train
split (or on `clustering.support_split`, Sec 4.1: all COCO images for COCO20k), and writes
`run_dir/cluster/<split>.parquet` (the mined rows plus `cluster`, 0-based), the model as
`cluster/kmeans.npz` and `cluster/manifest.json` (K, inertia, cluster sizes). With
`clustering.num_clusters: auto` (the default for data without classes) K is the one in
`clustering.k_range` with the highest mean silhouette; the curve goes to `cluster/k_sweep.png`
and `.json`. K-means on a few hundred thousand features takes seconds on the driver, so this
stage needs no workers. Last, it writes the train split's cluster gallery, `cluster/gallery/`
(`maskdistill.gallery`): per cluster its masks nearest and farthest from the centroid as
`cluster_NNN.png`, a contact sheet, `index.html` and `gallery.json`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from jobs.common import execute_stage, stage_main
from maskdistill.clustering import (
    KMeansResult,
    KScore,
    assign,
    choose_k,
    fit_kmeans,
    num_clusters_for,
)
from maskdistill.clusters import candidates, kmeans_options, sweep, write_sweep
from maskdistill.config import ExperimentConfig
from maskdistill.data import build_dataset
from maskdistill.gallery import write_cluster_gallery
from maskdistill.outputs import (
    LABELED_SCHEMA,
    features_of,
    labeled_path,
    mined_splits,
    read_mined,
    write_kmeans,
    write_table,
)
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import CLUSTER

STAGE = CLUSTER


def cluster_count(config: ExperimentConfig, features: np.ndarray) -> tuple[int, list[KScore], int]:
    """K: `clustering.num_clusters`, else the data set's class count, else (or with `auto`)
    the silhouette's choice over `clustering.k_range` on `features`; times overclustering.
    Also the sweep's scores ([] without one) and the K it chose."""
    clustering = config.clustering
    wanted = clustering.num_clusters
    if wanted is None:
        wanted = len(build_dataset(config.data, config.data.train_split).class_names) or "auto"
    if isinstance(wanted, int):
        return num_clusters_for(wanted, 0, clustering.overclustering), [], wanted
    scores = sweep(config, features, candidates(*clustering.k_range, len(features)))
    chosen = choose_k(scores)
    return num_clusters_for(chosen, 0, clustering.overclustering), scores, chosen


def cluster_splits(config: ExperimentConfig, run: RunDir, manifest: StageManifest) -> None:
    """Fit on the support split, label every mined split, write one table per split."""
    clustering = config.clustering
    tables = {split: read_mined(run, split) for split in mined_splits(config)}
    train = tables[config.data.train_split]
    support = tables[clustering.support_split] if clustering.support_split else None
    train_features = features_of(train)
    support_features = None if support is None else features_of(support)
    fit_on = train_features if support_features is None else support_features
    count, scores, base = cluster_count(config, fit_on)
    if scores:
        picture = write_sweep(run, CLUSTER, scores, base)
        print(
            f"{STAGE}: K = {base} by silhouette over K = {scores[0].k}-{scores[-1].k} ({picture})"
        )
        manifest.metrics.update({"k_auto": base, "silhouette": _best(scores, base)})
    options = kmeans_options(clustering)
    result = fit_kmeans(train_features, count, support=support_features, **options)
    write_kmeans(run, result)
    for split, table in tables.items():
        labels = result.labels if split == config.data.train_split else _assign(table, result)
        labeled = table.append_column("cluster", pa.array(labels, type=pa.int32()))
        write_table(run, labeled.cast(LABELED_SCHEMA), *labeled_path(split))
        manifest.inputs += table.num_rows
        manifest.outputs += labeled.num_rows
    sizes = np.bincount(result.labels, minlength=len(result.centroids))
    manifest.metrics.update(
        {"clusters": len(result.centroids), "inertia": result.inertia, "smallest": int(sizes.min())}
    )
    manifest.metrics["fit_objects"] = len(fit_on)  # the support split's count (Sec 4.1), if any
    manifest.metrics.update({f"size_{k}": int(n) for k, n in enumerate(sizes)})
    write_cluster_gallery(config, run)


def _best(scores: list[KScore], k: int) -> float:
    return next(s.silhouette for s in scores if s.k == k)


def _assign(table: pa.Table, result: KMeansResult) -> np.ndarray:
    return assign(features_of(table), result) if table.num_rows else np.zeros(0, np.int64)


def run_stage(config: ExperimentConfig, *, force: bool = False) -> StageManifest | None:
    """Cluster the mined masks; None when already complete for this config."""
    run = RunDir(config.run_dir)
    return execute_stage(config, STAGE, lambda m: cluster_splits(config, run, m), force=force)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage, needs_ray=False)


if __name__ == "__main__":
    raise SystemExit(main())
