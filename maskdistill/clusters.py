"""`maskdistill clusters RUN_DIR`: the pseudo classes of a run, K from the data, their names.

    maskdistill clusters RUN_DIR                  # one row per cluster: size, name, label
    maskdistill clusters RUN_DIR --k 10,20,30     # silhouette and inertia for each K (or 2-12)
    maskdistill clusters RUN_DIR --init-names     # write names.yaml to edit
    maskdistill clusters RUN_DIR --gallery        # draw cluster/gallery/ (and distill/) again

The sweep reruns K-means on the stored features of the mined objects (nothing is mined again)
with the run's clustering settings and writes `sweep/k_sweep.png` and `.json` in the run
directory; set `clustering.num_clusters` to the K you choose and rerun `maskdistill pipeline`.
`clustering.num_clusters: auto` runs the same sweep over `clustering.k_range` in the cluster
stage (`cluster/k_sweep.png`). `--init-names` names each cluster after the class it was matched
to on the val split when the run has been evaluated, else "cluster k". Ray-free.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from maskdistill import storage
from maskdistill.charts import k_sweep_chart
from maskdistill.cluster_stream import fit_sample
from maskdistill.clustering import KScore, choose_k, sweep_k
from maskdistill.config import ClusteringConfig, ConfigError, ExperimentConfig
from maskdistill.evaluate import MINED
from maskdistill.gallery import write_cluster_gallery, write_distill_gallery
from maskdistill.names import BACKGROUND, NamesError, initial_names, names_uri, read_class_map
from maskdistill.outputs import METRICS_FILE, gallery_folder
from maskdistill.rundir import RunDir, check_run_dir, read_manifest
from maskdistill.stages import CLUSTER, DISTILL, MINE
from maskdistill.visualize import png_bytes

SWEEP = "k_sweep"
RULE = "the K with the highest mean silhouette (the smallest such K on a tie)"


def fit_features(run: RunDir, config: ExperimentConfig) -> np.ndarray:
    """The features K-means fits on: the support split's (Sec 4.1), else the train split's;
    the cluster stage's sample of at most `clustering.fit_samples` of them."""
    clustering = config.clustering
    split = clustering.support_split or config.data.train_split
    sample, _ = fit_sample(run, split, fit_samples=clustering.fit_samples, seed=clustering.seed)
    return sample


def candidates(low: int, high: int, num_points: int) -> list[int]:
    """Every K from low to high that the points allow (a silhouette needs K < points)."""
    top = min(high, num_points - 1)
    if top < low:
        raise ValueError(
            f"cannot choose K in [{low}, {high}] from {num_points} mined objects: a silhouette "
            "needs fewer clusters than points; set clustering.num_clusters"
        )
    return list(range(low, top + 1))


def kmeans_options(clustering: ClusteringConfig) -> dict[str, Any]:
    """The K-means settings of `fit_kmeans` and `sweep_k` from the config."""
    keys = ("n_init", "iterations", "seed", "whiten", "l2_normalize")
    return {key: getattr(clustering, key) for key in keys}


def sweep(config: ExperimentConfig, features: np.ndarray, ks: Sequence[int]) -> list[KScore]:
    """`sweep_k` with the run's clustering settings."""
    clustering = config.clustering
    return sweep_k(features, ks, sample=clustering.k_sample, **kmeans_options(clustering))


def write_sweep(run: RunDir, folder: str, scores: Sequence[KScore], chosen: int) -> str:
    """`<folder>/k_sweep.json` and `.png` in the run directory; the picture's path."""
    record = {
        "rule": RULE,
        "chosen": chosen,
        "scores": [{"k": s.k, "silhouette": s.silhouette, "inertia": s.inertia} for s in scores],
    }
    run.write_json(_finite(record), folder, f"{SWEEP}.json")
    return run.write_bytes(png_bytes(k_sweep_chart(scores, chosen)), folder, f"{SWEEP}.png")


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN silhouettes (too few points) as null: JSON has no NaN."""
    for score in record["scores"]:
        if not np.isfinite(score["silhouette"]):
            score["silhouette"] = None
    return record


def sweep_table(scores: Sequence[KScore], chosen: int | None) -> str:
    lines = [f"{'K':>4}  {'silhouette':>10}  {'inertia':>12}"]
    for s in scores:
        mark = "  <- chosen" if s.k == chosen else ""
        lines.append(f"{s.k:>4}  {s.silhouette:>10.4f}  {s.inertia:>12.4g}{mark}")
    return "\n".join(lines)


def cluster_sizes(run: RunDir) -> list[int]:
    """Masks per cluster on the train split, from the cluster stage's manifest."""
    manifest = read_manifest(run, CLUSTER)
    if manifest is None:
        raise FileNotFoundError(f"{run.uri}: the cluster stage has not run")
    count = int(manifest.metrics["clusters"])
    return [int(manifest.metrics.get(f"size_{k}", 0)) for k in range(count)]


def matched_names(run: RunDir, config: ExperimentConfig, count: int) -> list[str | None] | None:
    """Each cluster's class on the val split (the evaluation's matching of the mined masks),
    None where it matched nothing or background; None when the run was not evaluated."""
    if not run.exists(*METRICS_FILE) or config.data.val_split is None:
        return None
    row = run.read_json(*METRICS_FILE).get(MINED)  # Table 1's row of the clusters
    if not row:
        return None
    from maskdistill.data import build_dataset

    classes = ["background", *build_dataset(config.data, config.data.val_split).class_names]
    mapping = list(row["mapping"])[1 : 1 + count]  # label 1 + k is cluster k
    return [classes[m] if 0 < m < len(classes) else None for m in mapping]


def init_names(run: RunDir, config: ExperimentConfig, *, overwrite: bool) -> str:
    """Write the run's first names.yaml; its URI. FileExistsError unless `overwrite`."""
    uri = names_uri(run.uri)
    if storage.is_file(uri) and not overwrite:
        raise FileExistsError(f"{uri} exists: edit it, or pass --overwrite to start again")
    sizes = cluster_sizes(run)
    matched = matched_names(run, config, len(sizes))
    how = f"matched to the classes of the {config.data.val_split!r} split" if matched else ""
    storage.write_bytes(uri, initial_names(sizes, matched, how=how).encode())
    return uri


def names_table(run: RunDir) -> str:
    """One row per cluster: masks, share, name, segmenter label (merges, background)."""
    sizes = cluster_sizes(run)
    classes = read_class_map(run.uri, len(sizes))
    total = max(1, sum(sizes))
    groups = classes.groups()
    lines = [f"{'cluster':>7}  {'masks':>6}  {'share':>6}  {'label':>5}  name"]
    for k, size in enumerate(sizes):
        label = classes.labels[k]
        group = groups[label - 1] if label else []
        merged = f" (with {', '.join(map(str, (g for g in group if g != k)))})" if group[1:] else ""
        lines.append(
            f"{k:>7}  {size:>6}  {100 * size / total:>5.1f}%  {label:>5}  "
            f"{classes.names[k]}{merged}"
        )
    lines.append(
        f"{classes.num_classes - 1} classes + background for the segmenter"
        + ("" if storage.is_file(names_uri(run.uri)) else "; no names.yaml (--init-names)")
    )
    return "\n".join(lines + _same_names(classes.names, classes.labels))


def _same_names(names: Sequence[str], labels: Sequence[int]) -> list[str]:
    """A warning for each name two unmerged classes share."""
    by_name: dict[str, set[int]] = {}
    for name, label in zip(names, labels, strict=True):
        if name != BACKGROUND:
            by_name.setdefault(name, set()).add(label)
    return [
        f"warning: {len(found)} classes are named {name!r}: merge their clusters to train them "
        "as one (`K: other` in names.yaml)"
        for name, found in by_name.items()
        if len(found) > 1
    ]


def draw_galleries(run: RunDir, config: ExperimentConfig) -> list[str]:
    """The cluster stage's gallery and, once distilled, the distill stage's; their folders."""
    if read_manifest(run, CLUSTER) is None:
        raise FileNotFoundError(f"{run.uri}: the cluster stage has not run: no gallery to draw")
    write_cluster_gallery(config, run)
    folders = [run.uri_of(gallery_folder(CLUSTER))]
    if read_manifest(run, DISTILL) is not None:
        write_distill_gallery(config, run)
        folders.append(run.uri_of(gallery_folder(DISTILL)))
    return folders


def parse_ks(text: str) -> list[int]:
    """'10,20,30' or '2-12' (both ends included) or a mix: the K to try, each >= 2."""
    ks: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            ks += list(range(int(low), int(high if dash else low) + 1))
        except ValueError:
            raise ValueError(f"--k {text!r}: expected numbers like 10,20,30 or 2-12") from None
    if not ks or min(ks) < 2:
        raise ValueError(f"--k {text!r}: every K must be >= 2")
    return sorted(set(ks))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdistill clusters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="run directory (local path or URI)")
    parser.add_argument(
        "--k",
        help="K to try on the stored features, e.g. 10,20,30 or 2-12; the silhouette peaks "
        "where clusters are tight and apart (inertia only ever falls)",
    )
    parser.add_argument(
        "--init-names", action="store_true", help="write names.yaml (matched names when evaluated)"
    )
    parser.add_argument("--overwrite", action="store_true", help="with --init-names: replace it")
    parser.add_argument(
        "--gallery",
        action="store_true",
        help="draw the galleries again (cluster/gallery/, distill/gallery/ once distilled)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_run_dir(args.run_dir)
        run = RunDir(args.run_dir)
        config = run.read_config()
        if args.k:
            return _sweep_command(run, config, parse_ks(args.k))
        if args.gallery:
            for folder in draw_galleries(run, config):
                print(f"gallery: {folder}/index.html")
        if args.init_names:
            print(f"wrote {init_names(run, config, overwrite=args.overwrite)}")
        print(names_table(run))
    except (ConfigError, NamesError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _sweep_command(run: RunDir, config: ExperimentConfig, ks: list[int]) -> int:
    if read_manifest(run, MINE) is None:
        raise FileNotFoundError(f"{run.uri}: the mine stage has not run: no features to cluster")
    features = fit_features(run, config)
    ks = [k for k in ks if k < len(features)] or candidates(min(ks), max(ks), len(features))
    scores = sweep(config, features, ks)
    chosen = choose_k(scores)
    picture = write_sweep(run, "sweep", scores, chosen)
    print(sweep_table(scores, chosen))
    print(f"rule: {RULE}; picture: {picture}")
    print(f"to use it: --set clustering.num_clusters={chosen} (then `maskdistill pipeline`)")
    return 0
