"""Pseudo labels out: a run's mined or distilled masks as a COCO instances JSON. Ray-free.

    maskdistill export-labels RUN_DIR OUT --stage mine|distill [--split SPLIT] [--overwrite]

OUT is the JSON file (a local path or URI); CVAT, Label Studio and FiftyOne open it with the
images, so the pseudo labels can be looked at and corrected. It holds:

    images       one per image of the split with a row in the stage's output, ids 1..N in the
                 table's order; `file_name` is the image's path relative to the data root
                 (`data.root`), `maskdistill_id` the run's image id
    categories   one per segmenter class of the run's names.yaml (else "cluster k"): merged
                 clusters are one category (`maskdistill_clusters` lists them); `--stage mine`
                 before the cluster stage has one category, "object"
    annotations  --stage mine: each image's mined mask (Sec 3.2) with its cluster, score = the
                 mining score; --stage distill: the detector's confident masks (Sec 3.3), exactly
                 the candidates the distill stage kept (score > tau, or the best one when none
                 passes), score = the detector's. `segmentation` is the stored COCO RLE as is,
                 `bbox` [x, y, w, h] (the detector's box for distill), `maskdistill_cluster` the
                 0-based cluster. Masks of clusters named background are left out (counted).
    info         run, stage, split, date, maskdistill version, data kind and root

Synthetic scenes have no image files: their `file_name` is `<split>/<id>.png`, and the rendered
images are written there under OUT's folder, so OUT's folder is their image root.
OUT must not exist unless `--overwrite`. Bad input exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import posixpath
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from pycocotools import mask as coco_mask

from maskdistill import __version__, outputs, storage
from maskdistill.cocoformat import image_table
from maskdistill.config import ExperimentConfig
from maskdistill.data import Dataset, build_dataset
from maskdistill.names import BACKGROUND, ClassMap
from maskdistill.pseudolabels import stored_kept
from maskdistill.rundir import RunDir, StageManifest, check_run_dir, read_manifest
from maskdistill.stages import CLUSTER, DISTILL, MINE
from maskdistill.visualize import png_bytes

STAGES = (MINE, DISTILL)
OBJECT = "object"  # the one category of mined masks before the cluster stage
MINE_COLUMNS = ("image_id", "height", "width", "mask_rle", "bbox", "score")
DISTILL_COLUMNS = (
    "image_id", "height", "width", "kept",
    "candidate_rle", "candidate_bbox", "candidate_score", "candidate_class",
)  # fmt: skip


class LabelsError(ValueError):
    """Input that cannot be exported; the message names the file, stage or split."""


@dataclass
class LabelsReport:
    """What `export_labels` wrote: images, annotations per category name, the annotations of
    background clusters left out, rendered images written, and notes for the user."""

    out: str
    stage: str
    split: str
    images: int = 0
    per_category: dict[str, int] = field(default_factory=dict)
    background: int = 0
    rendered: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def annotations(self) -> int:
        return sum(self.per_category.values())

    def summary(self) -> str:
        counts = ", ".join(f"{name}: {n}" for name, n in self.per_category.items())
        lines = [
            f"export-labels: {self.stage}/{self.split}: {self.images} images, "
            f"{self.annotations} annotations ({counts}) -> {self.out}"
        ]
        if self.background:
            lines.append(f"  {self.background} annotations of clusters named background left out")
        if self.rendered:
            folder = posixpath.dirname(self.out.rstrip("/")) or "."
            lines.append(f"  {self.rendered} rendered images written under {folder}/")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class _Labels:
    """The category scheme of an export: label names (index 0 background) and, per cluster,
    its label; `clusters` None: one category for every mask, no cluster."""

    names: list[str]
    clusters: ClassMap | None

    def label(self, cluster: int | None) -> int:
        if self.clusters is None or cluster is None:
            return 1
        if not 0 <= cluster < self.clusters.num_clusters:
            raise LabelsError(
                f"cluster {cluster} in the stage's output, but this run has "
                f"{self.clusters.num_clusters} clusters"
            )
        return self.clusters.labels[cluster]


def export_labels(
    run_dir: str, out: str, *, stage: str, split: str | None = None, overwrite: bool = False
) -> LabelsReport:
    """Write the COCO instances JSON of `stage`'s pseudo labels of `split` (default the train
    split) to `out`; what was written. FileNotFoundError for a path that is not a run
    directory; LabelsError for other bad input (a stage that has not run, an unknown split,
    `out` existing without `overwrite`)."""
    if stage not in STAGES:
        raise LabelsError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    check_run_dir(run_dir)
    _check_target(out, overwrite=overwrite)
    run = RunDir(run_dir)
    config = run.read_config()
    split = config.data.train_split if split is None else split
    splits = outputs.distilled_splits(config) if stage == DISTILL else outputs.mined_splits(config)
    if split not in splits:
        shown = ", ".join(repr(s) for s in splits)
        raise LabelsError(f"split {split!r}: not a split of this run (it has {shown})")
    manifest = read_manifest(run, stage)
    if manifest is None:
        raise LabelsError(
            f"stage {stage!r} has not run in {run.uri} (no {stage}/manifest.json): run "
            f"`maskdistill {stage}` or `maskdistill pipeline` first"
        )
    report = LabelsReport(out, stage, split)
    dataset = build_dataset(config.data, split)
    document = labels_document(run, config, dataset, manifest, report)
    storage.write_bytes(out, json.dumps(document).encode())
    if config.data.kind == "synthetic":
        folder = posixpath.dirname(out.rstrip("/")) or "."
        report.rendered = _render(dataset, document["images"], folder)
    return report


def labels_document(
    run: RunDir,
    config: ExperimentConfig,
    dataset: Dataset,
    manifest: StageManifest,
    report: LabelsReport,
) -> dict[str, Any]:
    """The COCO instances document of `manifest.stage`'s output of the split `report.split` of
    `dataset`; fills `report`."""
    split = report.split
    if manifest.stage == MINE:
        table, labels = _mined(run, manifest, split, report)
        found = [_mined_annotation(row, labels) for row in table.to_pylist()]
    else:
        table = outputs.read_pseudo(run, split, DISTILL_COLUMNS)
        names = outputs.class_map(run)
        labels = _Labels(names.class_names, names)
        rule = _distill_rule(config, manifest)
        found = [_distilled(row, labels, split, *rule) for row in table.to_pylist()]
    rows = table.select(["image_id", "height", "width"]).to_pylist()
    listed = [
        (n + 1, _file_name(dataset, row["image_id"], config), row["height"], row["width"])
        for n, row in enumerate(rows)
    ]
    document = image_table(listed, labels.names)
    for image, row in zip(document["images"], rows, strict=True):
        image["maskdistill_id"] = row["image_id"]
    if labels.clusters is not None:
        groups = labels.clusters.groups()
        for category, clusters in zip(document["categories"], groups, strict=True):
            category["maskdistill_clusters"] = clusters
    counts: Counter[int] = Counter()
    for (image_id, *_), of_image in zip(listed, found, strict=True):
        for annotation in of_image:
            if annotation["category_id"] == 0:
                report.background += 1
                continue
            annotation.update(id=len(document["annotations"]) + 1, image_id=image_id)
            document["annotations"].append(annotation)
            counts[annotation["category_id"]] += 1
    report.images = len(listed)
    report.per_category = {c["name"]: counts[c["id"]] for c in document["categories"]}
    document["info"] = _info(run, config, manifest.stage, split)
    document["licenses"] = []
    return document


def _mined(
    run: RunDir, manifest: StageManifest, split: str, report: LabelsReport
) -> tuple[pa.Table, _Labels]:
    """The mined masks with their clusters when the cluster stage ran on these very masks, else
    without (one category); why not, in the report's notes."""
    cluster = read_manifest(run, CLUSTER)
    if cluster is None:
        report.notes.append(f"no {CLUSTER} stage yet: every mask is category {OBJECT!r}")
    elif cluster.upstream.get(MINE) != manifest.config_hash:
        report.notes.append(
            f"{CLUSTER}/ was made from other mined masks (rerun `maskdistill cluster`): every "
            f"mask is category {OBJECT!r}"
        )
    elif not run.exists(*outputs.labeled_path(split)):
        report.notes.append(f"{CLUSTER} stage has no table for split {split!r}: one category")
    else:
        table = outputs.read_labeled(run, split).select([*MINE_COLUMNS, "cluster"])
        names = outputs.class_map(run)
        return table, _Labels(names.class_names, names)
    return outputs.read_mined(run, split, MINE_COLUMNS), _Labels([BACKGROUND, OBJECT], None)


def _mined_annotation(row: dict[str, Any], labels: _Labels) -> list[dict[str, Any]]:
    """The image's one mined mask (Sec 3.2) as an annotation."""
    cluster = row.get("cluster")
    return [_annotation(row, row["mask_rle"], row["bbox"], row["score"], cluster, labels)]


def _distill_rule(config: ExperimentConfig, manifest: StageManifest) -> tuple[float, bool]:
    """tau and keep_best_when_none as the distill stage ran (its manifest), else the config's."""
    science = manifest.science
    tau = science.get("pseudo_labels.tau", config.pseudo_labels.tau)
    keep_best = science.get("pseudo_labels.keep_best_when_none")
    if keep_best is None:
        keep_best = config.pseudo_labels.keep_best_when_none
    return float(tau), bool(keep_best)


def _distilled(
    row: dict[str, Any], labels: _Labels, split: str, tau: float, keep_best: bool
) -> list[dict[str, Any]]:
    """The candidates the distill stage kept (Sec 3.3, 4.1), most confident first."""
    try:
        kept = stored_kept(row, tau=tau, keep_best_when_none=keep_best).tolist()
    except ValueError as err:
        raise LabelsError(
            f"{outputs.pseudo_folder(split)}: {err}; the distill output does not match its "
            "manifest (rerun `maskdistill distill --force`)"
        ) from None
    return [
        _annotation(
            row,
            row["candidate_rle"][i],
            row["candidate_bbox"][i],
            row["candidate_score"][i],
            row["candidate_class"][i],
            labels,
        )
        for i in kept
    ]


def _annotation(
    row: dict[str, Any],
    counts: str,
    box: Sequence[float],
    score: float,
    cluster: int | None,
    labels: _Labels,
) -> dict[str, Any]:
    """One COCO annotation (id and image_id set later; category 0: a background cluster)."""
    size = [int(row["height"]), int(row["width"])]
    x0, y0, x1, y1 = box
    annotation: dict[str, Any] = {
        "id": 0,  # numbered when added, background left out
        "image_id": 0,
        "category_id": labels.label(cluster),
        "segmentation": {"size": size, "counts": counts},  # the stored COCO counts, as is
        "area": int(coco_mask.area({"size": size, "counts": counts.encode("ascii")})),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "score": round(float(score), 6),  # float32 in Parquet
        "iscrowd": 0,
    }
    if labels.clusters is not None and cluster is not None:
        annotation["maskdistill_cluster"] = int(cluster)
    return annotation


def _file_name(dataset: Dataset, image_id: str, config: ExperimentConfig) -> str:
    try:
        return dataset.relative_path(image_id)
    except KeyError:
        raise LabelsError(
            f"image {image_id!r} is not in the data set at data.root={config.data.root!r} "
            "any more: the data changed since the run"
        ) from None


def _info(run: RunDir, config: ExperimentConfig, stage: str, split: str) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc)
    data = config.data
    synthetic = data.kind == "synthetic"
    return {
        "description": f"MaskDistill pseudo labels: stage {stage}, split {split!r} of {run.uri}",
        "version": __version__,
        "year": now.year,
        "date_created": now.isoformat(timespec="seconds"),
        "run": run.uri,
        "stage": stage,
        "split": split,
        "maskdistill": __version__,
        "data_kind": data.kind,
        "data_root": data.root,
        "image_root": (
            "the folder of this file (synthetic scenes rendered there)" if synthetic else data.root
        ),
    }


def _render(dataset: Dataset, images: Sequence[dict[str, Any]], folder: str) -> int:
    """Write each listed image's pixels to `folder/<file_name>` (synthetic scenes have no files)."""
    for image in images:
        pixels = dataset.load(image["maskdistill_id"]).image
        storage.write_bytes(f"{folder.rstrip('/')}/{image['file_name']}", png_bytes(pixels))
    return len(images)


def _check_target(out: str, *, overwrite: bool) -> None:
    filesystem, path = storage.resolve(out)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        raise LabelsError(
            f"{out}: a folder; OUT is the JSON file to write (e.g. {out}/labels.json)"
        )
    if kind != pafs.FileType.NotFound and not overwrite:
        raise LabelsError(f"{out}: exists; choose another path, or --overwrite to replace it")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskdistill export-labels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="run directory (local path or URI)")
    parser.add_argument("out", help="the COCO JSON file to write (local path or URI)")
    parser.add_argument(
        "--stage",
        choices=STAGES,
        required=True,
        help="mine: the mined masks (Sec 3.2); distill: the detector's confident masks (Sec 3.3)",
    )
    parser.add_argument("--split", help="the split to export (default: the run's train split)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        report = export_labels(
            args.run_dir, args.out, stage=args.stage, split=args.split, overwrite=args.overwrite
        )
    except (FileNotFoundError, ValueError) as err:  # LabelsError, ConfigError, NamesError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
