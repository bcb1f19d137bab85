"""The evaluate stage's work (Sec 4.1, A.2-A.4; Tables 1-3, S2): every stage against ground truth.

On the labelled val split it scores, in the form of the paper's Table 1: the mined masks painted
with their clusters ("mined masks, clustered"), the confident Mask R-CNN pseudo labels
("+ Mask R-CNN") and the segmenter's predictions at the original resolution ("+ DeepLab-v3"),
each Hungarian-matched to the classes (majority vote with `evaluation.matching=majority`, for
overclustering); with `evaluation.crf` also the segmenter after a dense CRF (`crf:`), and
with `evaluation.linear_probe` a 1x1 conv on the frozen segmenter (A.2), trained on the train split
first and scored in the same single pass over val (its class ids need no matching). Table 2's
"+CRF" rows (S1): with CRF self-training on (stage refine) the last round's segmenter ("+ CRF
self-training"), it with a dense CRF on val ("+ CRF at evaluation") and a second probe trained
on its features whose softmax goes through the CRF ("linear probe (A.2) + CRF"; without
self-training that row comes with `evaluation.crf`, from the one probe). Mask AP (A.4,
Table 3) covers the mined masks and the detector's candidates: `single` and `multi`,
class-agnostic and semantic, on `evaluation.mask_ap_split` (the val split unless set; PASCAL: the
2913 trainval images, a second pass that needs no segmenter), the mined masks scored by attention
or 1 (`evaluation.mined_score`). The metrics themselves are in `maskdistill.evaluation`.

`evaluate(config)` writes under `run_dir/evaluate/`: `metrics.json`, `table1.md`, `table2.md`,
`per_class.md` (Table S2 form, the segmenter row), `mask_ap.md`, `confusion.png`, `overlays.png`
(image | ground truth | prediction, with a legend) and `class_names.json` (the matched class of
each segmenter label, which the HTTP service shows). Ray-free: `jobs/evaluate.py` runs it as one
Ray task on a GPU worker.

At any size a split is scored in shards of `mining.shard_size` sorted image ids (the mine parts'
cut): each shard's rows of the cluster and distill tables are read alone (`RowsById`), scored
into the summed confusion matrices and dropped; what stays per image is mask AP's compact
record (RLE strings, classes, scores: COCO's AP ranks every detection of the split), and the
skipped images leave the task shard by shard (`evaluate_stream`). The linear probe's memory is
its feature cache, capped by `evaluation.probe_max_images`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from maskdistill import crf, outputs, probe
from maskdistill.config import CRFConfig, ExperimentConfig
from maskdistill.console import PROGRESS_FILE, ProgressFile
from maskdistill.data import dataset_of
from maskdistill.data.base import IGNORE_INDEX, Dataset, Sample, SkipLog
from maskdistill.engine import CurveWriter
from maskdistill.evaluation import (
    InstanceSet,
    confusion_matrix,
    confusion_picture,
    instance_mask_ap,
    per_class_table,
    remap_confusion,
    segmentation_scores,
)
from maskdistill.inference import Segmenter
from maskdistill.loader import decoded
from maskdistill.masks import decode_rle
from maskdistill.pseudolabels import decode_label_map
from maskdistill.release import default_class_names
from maskdistill.rows_by_id import RowsById
from maskdistill.rundir import RunDir
from maskdistill.selection import read_selection
from maskdistill.shards import shard_ids
from maskdistill.stages import EVALUATE, refine_wanted
from maskdistill.stages import SEGMENTER as SEGMENTER_STAGE
from maskdistill.visualize import labelled_overlays, png_bytes

MINED, DETECTOR, SEGMENTER, CRF = (
    "mined masks, clustered",
    "+ Mask R-CNN",
    "+ DeepLab-v3",
    "+ DeepLab-v3 + CRF",
)
PROBE = "linear probe (A.2)"
# metrics.json key of `segmenter.select: best_on_val`'s record: its rows were picked on this set
SELECTION = "segmenter selection"
# Table 2 "+CRF" (S1): the segmenter after CRF self-training (stage refine), that model with a
# dense CRF on val, and the linear probe's softmax through the CRF
SELF_TRAINED, CRF_EVAL, PROBE_CRF = (
    "+ CRF self-training",
    "+ CRF at evaluation",
    "linear probe (A.2) + CRF",
)
MASK_AP_SET = "mask AP images"  # {"split", "images"}: where Table 3's mask AP was measured
MINED_COLUMNS = ("mask_rle", "cluster", "score")
PSEUDO_COLUMNS = ("label_png", "candidate_rle", "candidate_class", "candidate_score")
Rows = dict[str, dict[str, dict[str, Any]]]  # MINED / DETECTOR -> image id -> row


def mined_label_map(row: dict[str, Any] | None, size: tuple[int, int]) -> np.ndarray:
    """Sec 3.2's one mask of an image painted with its cluster: 0 background, 1 + cluster."""
    labels = np.zeros(size, dtype=np.int64)
    if row is not None:
        mask = decode_rle({"size": list(size), "counts": row["mask_rle"]})
        labels[mask] = 1 + int(row["cluster"])
    return labels


def mined_instances(
    row: dict[str, Any] | None, image_id: str, size: tuple[int, int], *, score_one: bool = False
) -> InstanceSet:
    """The mined mask as an instance: class = its cluster, score = its CLS attention share, or 1
    with `score_one` (A.4: the paper takes the initial masks as given)."""
    if row is None:
        return _no_instances(image_id, size)
    rles = _rles([row["mask_rle"]], size)
    score = 1.0 if score_one else row["score"]
    return InstanceSet(image_id, size, rles, np.array([row["cluster"]]), np.array([score]))


def candidate_instances(
    row: dict[str, Any] | None, image_id: str, size: tuple[int, int]
) -> InstanceSet:
    """Every Mask R-CNN candidate of an image, with its cluster and detector score (RLEs kept)."""
    if row is None:
        return _no_instances(image_id, size)
    return InstanceSet(
        image_id,
        size,
        _rles(row["candidate_rle"], size),
        np.asarray(row["candidate_class"], dtype=np.int64),
        np.asarray(row["candidate_score"], dtype=np.float64),
    )


def _rles(counts: Sequence[str], size: tuple[int, int]) -> list[dict[str, Any]]:
    """The rows' RLE strings as pycocotools dicts of the image's size, not decoded."""
    return [{"size": list(size), "counts": c} for c in counts]


def truth_instances(sample: Sample) -> InstanceSet:
    """The image's objects (score 1) and its crowd regions, which mask AP ignores (A.4, COCO)."""
    assert sample.instance_masks is not None and sample.instance_classes is not None
    masks, classes = sample.instance_masks, sample.instance_classes
    crowd = np.zeros(len(masks), bool)
    if sample.crowd_masks is not None and sample.crowd_classes is not None:
        masks = np.concatenate([masks, sample.crowd_masks])
        classes = np.concatenate([classes, sample.crowd_classes])
        crowd = np.concatenate([crowd, np.ones(len(sample.crowd_masks), bool)])
    return InstanceSet.from_masks(sample.image_id, masks, classes, np.ones(len(masks)), crowd)


def _no_instances(image_id: str, size: tuple[int, int]) -> InstanceSet:
    return InstanceSet(image_id, size, [], np.zeros(0, np.int64), np.zeros(0))


@dataclass
class Findings:
    """What the pass over the val split gathers: confusions per Table 1 row, instances, pictures."""

    num_predicted: int
    num_classes: int
    num_overlays: int
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    truth: list[InstanceSet] = field(default_factory=list)
    mined: list[InstanceSet] = field(default_factory=list)
    candidates: list[InstanceSet] = field(default_factory=list)
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    skips: SkipLog = field(default_factory=SkipLog)
    scored: int = 0
    instances_on_val: bool = True  # mask AP's instances come from the val pass
    mined_score_one: bool = False  # `evaluation.mined_score: one`

    def add_instances(
        self, sample: Sample, mined: dict[str, Any] | None, pseudo: dict[str, Any] | None
    ) -> bool:
        """Mask AP's ground truth, mined mask and detector candidates of one image; False
        when it has no instance ground truth."""
        if sample.instance_masks is None or sample.instance_classes is None:
            return False
        size = (sample.height, sample.width)
        self.truth.append(truth_instances(sample))
        self.mined.append(
            mined_instances(mined, sample.image_id, size, score_one=self.mined_score_one)
        )
        self.candidates.append(candidate_instances(pseudo, sample.image_id, size))
        return True

    def add(
        self,
        row: str,
        predicted: np.ndarray,
        truth: np.ndarray,
        *,
        num_predicted: int | None = None,
    ) -> None:
        """Count one image into `row`; `num_predicted` labels (the segmenter's by default)."""
        labels = self.num_predicted if num_predicted is None else num_predicted
        counts = confusion_matrix(
            predicted, truth, num_predicted=labels, num_classes=self.num_classes
        )
        self.confusion[row] = self.confusion.get(row, 0) + counts


def labelled(samples: Iterable[Sample], skips: SkipLog) -> list[Sample]:
    """The samples with semantic ground truth; the others go to `skips`."""
    kept = []
    for sample in samples:
        if sample.semantic is None:
            skips.add(sample.image_id, "no semantic ground truth")
        else:
            kept.append(sample)
    return kept


def _chunks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while chunk := list(itertools.islice(samples, size)):
        yield chunk


@dataclass(frozen=True)
class SplitTables:
    """A split's clustered masks and pseudo labels, read one shard of image ids at a time."""

    mined: RowsById
    pseudo: RowsById

    @classmethod
    def of(cls, run: RunDir, split: str) -> SplitTables:
        return cls(
            outputs.labeled_by_id(run, split, MINED_COLUMNS),
            outputs.pseudo_by_id(run, split, PSEUDO_COLUMNS),
        )

    def rows(self, image_ids: Sequence[str]) -> Rows:
        """The shard's rows by image id, of each table."""
        return {MINED: self.mined.rows(image_ids), DETECTOR: self.pseudo.rows(image_ids)}


def split_shards(
    config: ExperimentConfig, dataset: Dataset, skips: SkipLog
) -> Iterator[tuple[list[str], Iterator[Sample]]]:
    """The split's readable samples by shards of `mining.shard_size` sorted ids (the mine
    parts' cut, so one row group of the cluster table each): (shard's ids, its samples), all
    decoded ahead in one stream; a shard without readable images is left out."""
    shards = shard_ids(dataset.image_ids(), config.mining.shard_size)
    starts = [shard[0] for shard in shards]
    workers = config.evaluation.resources.loader_workers
    ordered = [image_id for shard in shards for image_id in shard]
    samples = decoded(dataset, ordered, skips, workers=workers)
    by_shard = itertools.groupby(samples, key=lambda s: bisect.bisect_right(starts, s.image_id))
    for shard, members in by_shard:
        yield shards[shard - 1], members


def score_batch(
    findings: Findings,
    segmenter: Segmenter,
    samples: Sequence[Sample],
    tables: Rows,
    *,
    dense_crf: CRFConfig | None,
    linear_probe: nn.Conv2d | None = None,
) -> None:
    """Add one batch of val images to every Table 1 row, the instance sets and the overlays.

    With `linear_probe` (A.2, trained on the train split) its class ids join as the probe row,
    a [num_classes, num_classes] confusion.
    """
    images = [s.image for s in samples]
    refined: list[np.ndarray | None] = [None] * len(samples)
    if dense_crf:  # needs every class's score on the CPU; otherwise only the argmax leaves it
        logits = segmenter.logits(images)
        predictions = [t.argmax(dim=0).numpy() for t in logits]
        refined = [
            crf.crf_labels(s.image, t.softmax(dim=0).numpy(), dense_crf)
            for s, t in zip(samples, logits, strict=True)
        ]
    else:
        predictions = segmenter.segment(images)
    for sample, prediction, crf_map in zip(samples, predictions, refined, strict=True):
        assert sample.semantic is not None
        size = (sample.height, sample.width)
        mined, pseudo = tables[MINED].get(sample.image_id), tables[DETECTOR].get(sample.image_id)
        detector = (
            np.zeros(size, np.int64) if pseudo is None else decode_label_map(pseudo["label_png"])
        )
        findings.scored += 1
        findings.add(MINED, mined_label_map(mined, size), sample.semantic)
        findings.add(DETECTOR, detector, sample.semantic)
        findings.add(SEGMENTER, prediction, sample.semantic)
        if crf_map is not None:
            findings.add(CRF, crf_map, sample.semantic)
        if linear_probe is not None:
            probed = probe.probe_prediction(segmenter.model, linear_probe, sample.image, size)
            findings.add(PROBE, probed, sample.semantic, num_predicted=findings.num_classes)
        if findings.instances_on_val:
            findings.add_instances(sample, mined, pseudo)
        if len(findings.overlays) < findings.num_overlays:
            findings.overlays.append((sample.image, sample.semantic, prediction))


def score_crf_rows(
    findings: Findings,
    segmenter: Segmenter,
    samples: Sequence[Sample],
    settings: CRFConfig,
    *,
    self_trained: bool,
    linear_probe: nn.Conv2d | None,
) -> None:
    """Table 2's "+CRF" rows for one batch: with `self_trained` (`segmenter` is the last
    self-training round's) its argmax and its dense CRF; with `linear_probe` (trained on this
    `segmenter`) the probe's softmax through the dense CRF."""
    if self_trained:
        logits = segmenter.logits([s.image for s in samples])
        for sample, scores in zip(samples, logits, strict=True):
            assert sample.semantic is not None
            findings.add(SELF_TRAINED, scores.argmax(dim=0).numpy(), sample.semantic)
            refined = crf.crf_labels(sample.image, scores.softmax(dim=0).numpy(), settings)
            findings.add(CRF_EVAL, refined, sample.semantic)
    if linear_probe is None:
        return
    for sample in samples:
        assert sample.semantic is not None
        size = (sample.height, sample.width)
        softmax = probe.probe_probabilities(segmenter.model, linear_probe, sample.image, size)
        probed = crf.crf_labels(sample.image, softmax, settings)
        findings.add(PROBE_CRF, probed, sample.semantic, num_predicted=findings.num_classes)


def _pairs(samples: Iterable[Sample]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image, semantic) of the samples with semantic ground truth, as they are decoded."""
    return ((s.image, s.semantic) for s in samples if s.semantic is not None)


def _linear_probe(
    config: ExperimentConfig,
    segmenter: Segmenter,
    num_classes: int,
    bar: ProgressFile,
    tag: str = "probe",
) -> nn.Conv2d:
    """A.2: a 1x1 conv on the frozen segmenter, trained on the labelled train split (the
    first `evaluation.probe_max_images`), streamed into the probe's feature cache (the images
    are not kept); its curves under `tensorboard/<tag>`."""
    ev = config.evaluation
    train = dataset_of(config.data, config.data.train_split)
    train_ids = train.image_ids()[: ev.probe_max_images]
    workers = ev.resources.loader_workers
    pairs = _pairs(decoded(train, train_ids, SkipLog(), workers=workers))
    first = next(pairs, None)
    if first is None:
        raise ValueError(f"linear probe: split {config.data.train_split!r} has no ground truth")
    curves = CurveWriter(RunDir(config.run_dir).uri_of(EVALUATE, "tensorboard", tag))
    bar.start(f"{EVALUATE}:{tag}", ev.probe_epochs, "epoch")

    def progress(epoch: int, loss: float, lr: float) -> None:
        print(f"linear probe epoch {epoch + 1}/{ev.probe_epochs}: loss {loss:.4f}, lr {lr:.3g}")
        curves.add(epoch, {"loss_probe": loss, "lr": lr})  # one point per epoch
        bar.update(epoch + 1)

    try:
        return probe.fit_linear_probe(
            segmenter.model,
            itertools.chain([first], pairs),
            num_classes=num_classes,
            epochs=ev.probe_epochs,
            batch_size=ev.probe_batch_size,
            lr=ev.probe_lr,
            milestones=ev.probe_milestones,
            seed=config.seed,
            progress=progress,
        )
    finally:
        curves.close()


def _mask_ap(findings: Findings) -> dict[str, dict[str, float]]:
    """A.4, Table 3: mined masks and detector candidates, each setting, agnostic and semantic."""
    results = {}
    for source, sets in (("mined", findings.mined), ("detector", findings.candidates)):
        for setting in ("multi", "single"):
            for agnostic in (True, False):
                name = f"{source} {setting} {'class-agnostic' if agnostic else 'semantic'}"
                results[name] = instance_mask_ap(
                    findings.truth, sets, setting=setting, class_agnostic=agnostic
                )
    return results


Result = tuple[dict[str, Any], Findings, list[str]]  # metrics, what was gathered, class names


def evaluate_split(config: ExperimentConfig) -> Result:
    """Score every stage on the val split: (metrics, what was gathered, class names). How far
    it got is in `evaluate/progress.json` (the driver's bar)."""
    steps = scored_shards(config)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            result: Result = end.value
            return result


def scored_shards(config: ExperimentConfig) -> Generator[Findings, None, Result]:
    """`evaluate_split` one shard at a time: its findings after each shard of the val split
    (then of the mask AP split), so their skips can leave as they come; returns its result."""
    ev, run, split = config.evaluation, RunDir(config.run_dir), config.data.val_split
    if split is None:
        raise ValueError("evaluation needs data.val_split: a split with ground truth")
    dataset = dataset_of(config.data, split)
    class_names = ["background", *dataset.class_names]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    segmenter = Segmenter.load(run.uri, device=device, config=config, folder=SEGMENTER_STAGE)
    tables = SplitTables.of(run, split)
    ap_split = outputs.mask_ap_split(config)
    findings = Findings(
        segmenter.num_classes,
        len(class_names),
        ev.num_overlays,
        instances_on_val=ap_split == split,
        mined_score_one=ev.mined_score == "one",
    )
    bar = ProgressFile(run.uri_of(EVALUATE, PROGRESS_FILE))
    linear_probe = (
        _linear_probe(config, segmenter, len(class_names), bar) if ev.linear_probe else None
    )
    # Table 2 "+CRF": the last self-training round's segmenter (stage refine), a probe on it
    refined = (
        Segmenter.load(
            run.uri, device=device, config=config, folder=outputs.final_segmenter(config)
        )
        if refine_wanted(config)
        else None
    )
    probe_crf = linear_probe if ev.crf else None
    if refined is not None and linear_probe is not None:
        probe_crf = _linear_probe(config, refined, len(class_names), bar, tag="probe_crf")
    total = len(dataset.image_ids())
    bar.start(f"{EVALUATE}:{split}", total, "img")
    done = 0
    for shard, samples in split_shards(config, dataset, findings.skips):
        rows = tables.rows(shard)  # one shard's rows at a time, dropped with it
        for chunk in _chunks(samples, ev.resources.batch_size):
            batch = labelled(chunk, findings.skips)
            score_batch(
                findings,
                segmenter,
                batch,
                rows,
                dense_crf=config.crf if ev.crf else None,
                linear_probe=linear_probe,
            )
            score_crf_rows(
                findings,
                refined or segmenter,
                batch,
                config.crf,
                self_trained=refined is not None,
                linear_probe=probe_crf,
            )
            done += len(chunk)
            bar.update(done)
        yield findings
    bar.update(total, force=True)
    if SEGMENTER not in findings.confusion:
        raise ValueError(f"split {split!r}: no image with semantic ground truth to evaluate")
    metrics: dict[str, Any] = {
        row: _jsonable(
            segmentation_scores(
                confusion, matching="identity" if row in (PROBE, PROBE_CRF) else ev.matching
            )
        )
        for row, confusion in findings.confusion.items()
    }
    if ev.mask_ap and ap_split is not None and ap_split != split:
        yield from gather_instances(config, findings, ap_split, bar)
    if ev.mask_ap and findings.truth:
        metrics["mask AP"] = _mask_ap(findings)
        metrics[MASK_AP_SET] = {"split": ap_split, "images": len(findings.truth)}
    return metrics, findings, class_names


def gather_instances(
    config: ExperimentConfig, findings: Findings, split: str, bar: ProgressFile
) -> Iterator[Findings]:
    """A.4, Table 3 on a split of its own (PASCAL: the 2913 trainval images): every image's
    instances, mined mask and detector candidates, `findings` after each shard; images without
    instances are skipped."""
    dataset = dataset_of(config.data, split)
    tables = SplitTables.of(RunDir(config.run_dir), split)
    total = len(dataset.image_ids())
    bar.start(f"{EVALUATE}:{split}", total, "img")
    done = 0
    for shard, samples in split_shards(config, dataset, findings.skips):
        rows = tables.rows(shard)
        for sample in samples:
            image_id = sample.image_id
            mined, pseudo = rows[MINED].get(image_id), rows[DETECTOR].get(image_id)
            if not findings.add_instances(sample, mined, pseudo):
                findings.skips.add(image_id, f"no instance ground truth (mask AP on {split})")
            done += 1
            bar.update(done)
        yield findings
    bar.update(total, force=True)


def _jsonable(scores: dict[str, Any]) -> dict[str, Any]:
    return {
        "miou": float(scores["miou"]),
        "iou": [None if np.isnan(v) else float(v) for v in scores["iou"]],
        "mapping": [int(m) for m in scores["mapping"]],
    }


def table1(metrics: dict[str, Any]) -> str:
    """The paper's Table 1 form: one mIoU (%) per stage of the pipeline."""
    lines = ["| method | mIoU (%) |", "| --- | ---: |"]
    for row in (MINED, DETECTOR, SEGMENTER, CRF, SELF_TRAINED, CRF_EVAL, PROBE, PROBE_CRF):
        if row in metrics:
            mark = " *" if SELECTION in metrics and row not in (MINED, DETECTOR) else ""
            lines.append(f"| {row}{mark} | {100 * metrics[row]['miou']:.1f} |")
    return "\n".join(lines + _selection_footnote(metrics))


def _selection_footnote(metrics: dict[str, Any]) -> list[str]:
    """Under a table whose segmenter rows come from weights chosen on the evaluation set."""
    if SELECTION not in metrics:
        return []
    record = metrics[SELECTION]
    compared = len(record["scores"])
    return ["", f"\\* {record['note']}; iteration {record['iteration']} of {compared} compared."]


def table2(metrics: dict[str, Any]) -> str:
    """The paper's Table 2 form: MaskDistill and MaskDistill+CRF, linear probe and clustering
    mIoU (%); "-" where the run has no such row."""

    def cell(row: str) -> str:
        return f"{100 * metrics[row]['miou']:.1f}" if row in metrics else "-"

    lines = [
        "| method | linear probe mIoU (%) | clustering mIoU (%) |",
        "| --- | ---: | ---: |",
        f"| MaskDistill | {cell(PROBE)} | {cell(SEGMENTER)} |",
    ]
    if SELF_TRAINED in metrics:
        lines.append(f"| MaskDistill+CRF (self-training) | - | {cell(SELF_TRAINED)} |")
        crf_clustering = cell(CRF_EVAL)
    else:
        crf_clustering = cell(CRF)
    if PROBE_CRF in metrics or crf_clustering != "-":
        lines.append(f"| MaskDistill+CRF | {cell(PROBE_CRF)} | {crf_clustering} |")
    return "\n".join(lines + _selection_footnote(metrics))


def mask_ap_table(results: dict[str, dict[str, float]]) -> str:
    """Table 3 form: AP, AP50, AP75 (%) per source, setting and class handling."""
    lines = ["| masks | AP | AP50 | AP75 |", "| --- | ---: | ---: | ---: |"]
    for name, ap in results.items():
        lines.append(
            f"| {name} | {100 * ap['AP']:.1f} | {100 * ap['AP50']:.1f} | {100 * ap['AP75']:.1f} |"
        )
    return "\n".join(lines)


def label_names(mapping: Sequence[int], class_names: Sequence[str]) -> list[str]:
    """The name of each segmenter label: its matched class, else "cluster k" (label 1 + k)."""
    fallback = default_class_names(len(mapping))
    return [class_names[m] if m >= 0 else fallback[label] for label, m in enumerate(mapping)]


def write_outputs(
    run: RunDir, metrics: dict[str, Any], findings: Findings, class_names: Sequence[str]
) -> str:
    """Tables, pictures and `metrics.json` under `evaluate/`; returns the printed report."""
    segmenter = metrics[SEGMENTER]
    mapping = np.asarray(segmenter["mapping"])
    per_class = per_class_table(
        {"iou": np.array(segmenter["iou"], dtype=float), "miou": segmenter["miou"]}, class_names
    )
    report = [table1(metrics), "", "Per class (Table S2 form), + DeepLab-v3:", per_class]
    run.write_bytes((table1(metrics) + "\n").encode(), *outputs.TABLE1_FILE)
    run.write_bytes((table2(metrics) + "\n").encode(), *outputs.TABLE2_FILE)
    run.write_bytes((per_class + "\n").encode(), EVALUATE, "per_class.md")
    if "mask AP" in metrics:
        ap = mask_ap_table(metrics["mask AP"])
        run.write_bytes((ap + "\n").encode(), EVALUATE, "mask_ap.md")
        measured = metrics[MASK_AP_SET]
        report += [
            "",
            f"Mask AP (Table 3 form) on {measured['split']}, {measured['images']} images:",
            ap,
        ]
    remapped = remap_confusion(findings.confusion[SEGMENTER], mapping)
    run.write_bytes(png_bytes(confusion_picture(remapped, class_names)), EVALUATE, "confusion.png")
    if findings.overlays:
        as_classes = np.where(mapping >= 0, mapping, IGNORE_INDEX)
        rows = [
            (image, truth, as_classes[predicted]) for image, truth, predicted in findings.overlays
        ]
        picture = labelled_overlays(rows, class_names)
        run.write_bytes(png_bytes(picture), EVALUATE, "overlays.png")
    run.write_json(
        {
            "names": label_names(mapping.tolist(), class_names),
            "matching": "segmenter val confusion",
        },
        *outputs.CLASS_NAMES_FILE,
    )
    run.write_json(metrics, *outputs.METRICS_FILE)
    return "\n".join(report)


@dataclass(frozen=True)
class Evaluated:
    """The last item of `evaluate_stream`: the metrics and the number of images scored."""

    metrics: dict[str, Any]
    scored: int


Skips = list[tuple[str, str]]  # (image id, reason) of skipped images


def evaluate_stream(config: ExperimentConfig) -> Iterator[Skips | Evaluated]:
    """The whole stage's work on one worker as it goes: each shard's skipped images, so that no
    list of a split's skips builds up, then `Evaluated` once the files are written."""
    steps = scored_shards(config)
    while True:
        try:
            findings = next(steps)
        except StopIteration as end:
            metrics, findings, class_names = end.value
            break
        yield _drained(findings.skips)
    if (selection := read_selection(RunDir(config.run_dir))) is not None:
        metrics[SELECTION] = selection  # segmenter.select: best_on_val, chosen on this split
    print(write_outputs(RunDir(config.run_dir), metrics, findings, class_names))
    yield _drained(findings.skips)
    yield Evaluated(metrics, findings.scored)


def _drained(skips: SkipLog) -> Skips:
    entries = [(s.image_id, s.reason) for s in skips.skipped]
    skips.skipped.clear()
    return entries


def evaluate(config: ExperimentConfig) -> tuple[dict[str, Any], Skips, int]:
    """`evaluate_stream` in this process, gathered: (metrics, skipped images, images scored)."""
    skipped: Skips = []
    for item in evaluate_stream(config):
        if isinstance(item, Evaluated):
            return item.metrics, skipped, item.scored
        skipped += item
    raise RuntimeError("evaluate_stream ended without its result")
