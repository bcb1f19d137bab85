"""Stage `cluster` (Sec 3.2): K-means on the mined objects' CLS features gives pseudo classes.

    python -m jobs.cluster --config configs/pascal.yaml [--set clustering.overclustering=2]

Fits the feature transform and K-means on the train split's features (or on
`clustering.support_split`, Sec 4.1: all COCO images for COCO20k), on a seeded uniform sample of
at most `clustering.fit_samples` of them (`maskdistill.cluster_stream`), then reads the `mine`
parts of every split one at a time and writes `run_dir/cluster/<split>.parquet` (the mined rows
plus `cluster`, 0-based; one row group per mine part), the model as `cluster/kmeans.npz` and
`cluster/manifest.json` (K, the fit sample's inertia, train cluster sizes). With
`clustering.num_clusters: auto` (the default for data without classes) K is the one in
`clustering.k_range` with the highest mean silhouette on the sample; the curve goes to
`cluster/k_sweep.png` and `.json`. K-means on a few hundred thousand features takes seconds on
the driver, so this stage needs no workers; its memory is the sample plus one part. Last, it
writes the train split's cluster gallery, `cluster/gallery/` (`maskdistill.gallery`, streamed):
per cluster its masks nearest and farthest from the centroid as `cluster_NNN.png`, a contact
sheet, `index.html` and `gallery.json`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jobs.common import execute_stage, stage_main
from maskdistill.cluster_stream import fit_sample, label_split
from maskdistill.clustering import KScore, choose_k, fit_kmeans, num_clusters_for
from maskdistill.clusters import candidates, kmeans_options, sweep, write_sweep
from maskdistill.config import ExperimentConfig
from maskdistill.data import build_dataset
from maskdistill.gallery import write_cluster_gallery
from maskdistill.outputs import mined_splits, write_kmeans
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
    """Fit on a sample of the support split, label every mined split part by part."""
    clustering = config.clustering
    support = clustering.support_split or config.data.train_split
    fit_on, support_total = fit_sample(
        run, support, fit_samples=clustering.fit_samples, seed=clustering.seed
    )
    count, scores, base = cluster_count(config, fit_on)
    if scores:
        picture = write_sweep(run, CLUSTER, scores, base)
        print(
            f"{STAGE}: K = {base} by silhouette over K = {scores[0].k}-{scores[-1].k} ({picture})"
        )
        manifest.metrics.update({"k_auto": base, "silhouette": _best(scores, base)})
    result = fit_kmeans(fit_on, count, **kmeans_options(clustering))
    write_kmeans(run, result)
    sizes = np.zeros(count, dtype=np.int64)
    for split in mined_splits(config):
        split_sizes = label_split(run, split, result)
        rows = int(split_sizes.sum())
        manifest.inputs += rows
        manifest.outputs += rows
        if split == config.data.train_split:
            sizes = split_sizes
    manifest.metrics.update(
        {"clusters": count, "inertia": result.inertia, "smallest": int(sizes.min())}
    )
    # inertia is K-means' own, on the fit sample; sizes count the train split's masks
    manifest.metrics.update({"fit_objects": len(fit_on), "support_objects": support_total})
    manifest.metrics.update({f"size_{k}": int(n) for k, n in enumerate(sizes)})
    write_cluster_gallery(config, run)


def _best(scores: list[KScore], k: int) -> float:
    return next(s.silhouette for s in scores if s.k == k)


def run_stage(config: ExperimentConfig, *, force: bool = False) -> StageManifest | None:
    """Cluster the mined masks; None when already complete for this config."""
    run = RunDir(config.run_dir)
    return execute_stage(config, STAGE, lambda m: cluster_splits(config, run, m), force=force)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage, needs_ray=False)


if __name__ == "__main__":
    raise SystemExit(main())
