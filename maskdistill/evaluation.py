"""Evaluation protocols (Sec 4.1, A.3, A.4).

Semantic segmentation (Sec 4.1 "Clustering", A.3): a confusion matrix of predicted clusters against
ground-truth classes, Hungarian (or, for overclustering, majority) matching, per-class IoU and mIoU,
a Table S2 style per-class table and a confusion heat map; the linear probe's predictions are
already class ids (`matching="identity"`, A.2). Instances (A.4, Table 3): COCO-style mask AP
through pycocotools in the `single` and `multi` object settings, class-agnostic or semantic.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

Rle = dict[str, Any]


@dataclass
class InstanceSet:
    """The instances of one image as COCO RLEs: `size` (H, W), `rles` [M], classes [M], scores [M].

    RLEs, not dense masks, because the evaluate stage keeps every val image's truth, mined masks
    and up to 100 detector candidates until the end: at 375x500 a dense bool mask is 187.5 kB, its
    RLE a few hundred bytes. `rles` are pycocotools dicts; `counts` may be text (as in the Parquet
    rows) or bytes and is stored as bytes. Classes are any ids; scores are 1 for ground truth.
    `crowd` bool [M] (default all False) marks ground-truth crowd regions (COCO's iscrowd): no
    object to find, and a detection matched to one is ignored, neither TP nor FP (COCOeval).
    """

    image_id: str
    size: tuple[int, int]
    rles: list[Rle]
    classes: np.ndarray
    scores: np.ndarray
    crowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        height, width = (int(s) for s in self.size)
        self.size = (height, width)
        self.classes, self.scores = np.asarray(self.classes), np.asarray(self.scores)
        flags = np.asarray(self.crowd, dtype=bool)
        self.crowd = np.zeros(len(self.rles), bool) if flags.size == 0 else flags
        counts = (len(self.rles), len(self.classes), len(self.scores))
        if len(set(counts)) != 1:
            raise ValueError(
                f"image {self.image_id!r}: {counts[0]} masks, {counts[1]} classes and "
                f"{counts[2]} scores; each mask needs one class and one score"
            )
        if len(self.crowd) != counts[0]:
            raise ValueError(
                f"image {self.image_id!r}: {counts[0]} masks, {len(self.crowd)} crowd flags"
            )
        shared = [height, width]  # one list for every RLE of the image; pycocotools only reads it
        self.rles = [_normalised(rle, shared, self.image_id) for rle in self.rles]

    @classmethod
    def from_masks(
        cls,
        image_id: str,
        masks: np.ndarray,
        classes: np.ndarray,
        scores: np.ndarray,
        crowd: np.ndarray | None = None,
    ) -> InstanceSet:
        """The set of bool [M, H, W] masks (M may be 0; the size comes from the array)."""
        if masks.ndim != 3:
            raise ValueError(f"image {image_id!r}: masks must be [M, H, W], got {masks.shape}")
        planes = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
        rles = coco_mask.encode(planes) if len(masks) else []
        flags = np.zeros(len(masks), bool) if crowd is None else crowd
        return cls(image_id, (masks.shape[1], masks.shape[2]), rles, classes, scores, flags)

    def masks(self) -> np.ndarray:
        """The bool [M, H, W] masks, decoded (for tests and pictures; evaluation needs none)."""
        if not self.rles:
            return np.zeros((0, *self.size), dtype=bool)
        return np.ascontiguousarray(coco_mask.decode(self.rles).transpose(2, 0, 1).astype(bool))


def _normalised(rle: Rle, size: list[int], image_id: str) -> Rle:
    if [int(s) for s in rle["size"]] != size:
        raise ValueError(f"image {image_id!r} is {size[0]}x{size[1]}, an RLE is {rle['size']}")
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise TypeError(f"image {image_id!r}: RLE counts must be str or bytes, got {type(counts)}")
    return {"size": size, "counts": counts}


ObjectSetting = Literal["single", "multi"]


def instance_mask_ap(
    truth: Sequence[InstanceSet],
    predictions: Sequence[InstanceSet],
    *,
    setting: ObjectSetting,
    class_agnostic: bool,
) -> dict[str, float]:
    """A.4, Table 3: COCO mask AP, AP50 and AP75 (0..1) in the `single` or `multi` object setting.

    multi: every prediction is evaluated against every ground-truth mask. single: per image only
    the most confident prediction is kept, with the ground-truth object whose bounding box has
    the largest IoU with its box (ties: the first). An image without predictions keeps its
    largest object, as a miss; an image without objects keeps its top prediction, as a false
    positive (dropping either would reward predicting nothing on hard images).
    class_agnostic False (semantic): prediction classes are cluster ids unrelated to the ground
    truth's; after the single selection, clusters are matched one-to-one to classes by the
    Hungarian algorithm on their summed pixel overlap over the evaluated masks (per image, the
    union of a cluster's masks against the union of a class's masks; Sec 4.1's clustering
    protocol on instance masks). A cluster left unmatched (more clusters than classes) is scored
    as false positives of the class it overlaps most (lowest class id on ties), never as true
    positives, so overclustering costs precision instead of vanishing from the evaluation.
    Crowd regions of the truth (`InstanceSet.crowd`) are never objects: the single selection
    and the cluster matching skip them, and a prediction matched to one is ignored (COCOeval).
    """
    if setting not in get_args(ObjectSetting):
        raise ValueError(f"setting {setting!r} is not one of {list(get_args(ObjectSetting))}")
    predicted = _by_image(truth, predictions)
    if setting == "single":
        truth, predictions = _single_object(truth, predicted)
    else:
        predictions = list(predicted.values())
    if not class_agnostic:
        truth, predictions = _match_clusters(truth, predictions)
    return mask_ap(truth, predictions, class_agnostic=class_agnostic)


def _by_image(
    truth: Sequence[InstanceSet], predictions: Sequence[InstanceSet]
) -> dict[str, InstanceSet]:
    """Predictions by image id; ValueError for repeated ids, KeyError for unknown images."""
    known: set[str] = set()
    for instance_set in truth:
        if instance_set.image_id in known:
            raise ValueError(f"ground truth lists image {instance_set.image_id!r} twice")
        known.add(instance_set.image_id)
    sizes = {t.image_id: t.size for t in truth}
    predicted: dict[str, InstanceSet] = {}
    for instance_set in predictions:
        if instance_set.image_id not in known:
            raise KeyError(f"prediction for {instance_set.image_id!r}, which has no ground truth")
        if instance_set.image_id in predicted:
            raise ValueError(f"predictions list image {instance_set.image_id!r} twice")
        if instance_set.crowd.any():
            raise ValueError(f"predictions for {instance_set.image_id!r} are marked crowd")
        if instance_set.size != sizes[instance_set.image_id]:
            raise ValueError(
                f"predictions for image {instance_set.image_id!r} are {instance_set.size}, "
                f"its ground truth {sizes[instance_set.image_id]}"
            )
        predicted[instance_set.image_id] = instance_set
    return predicted


def _take(instance_set: InstanceSet, index: np.ndarray, image_id: str | None = None) -> InstanceSet:
    return InstanceSet(
        instance_set.image_id if image_id is None else image_id,
        instance_set.size,
        [instance_set.rles[i] for i in index],
        instance_set.classes[index],
        instance_set.scores[index],
        instance_set.crowd[index],
    )


def _single_object(
    truth: Sequence[InstanceSet], predicted: dict[str, InstanceSet]
) -> tuple[list[InstanceSet], list[InstanceSet]]:
    # A.4 single: the most confident mask and the object with the largest box IoU with it;
    # crowd regions are no candidates but stay, so that a top mask on a crowd is ignored.
    kept_truth: list[InstanceSet] = []
    kept_predictions: list[InstanceSet] = []
    for image in truth:
        objects, crowds = np.flatnonzero(~image.crowd), np.flatnonzero(image.crowd)
        rles = [image.rles[i] for i in objects]
        prediction = predicted.get(image.image_id)
        if prediction is None or len(prediction.scores) == 0:
            order = np.argsort(-_areas(rles), kind="stable")
        else:
            top = int(np.argmax(prediction.scores))
            kept_predictions.append(_take(prediction, np.array([top])))
            overlaps = _box_iou(_boxes(prediction.rles[top : top + 1])[0], _boxes(rles))
            order = np.argsort(-overlaps, kind="stable")
        kept_truth.append(_take(image, np.concatenate([objects[order[:1]], crowds])))
    return kept_truth, kept_predictions


def _areas(rles: list[Rle]) -> np.ndarray:
    """int64 [M] pixel counts (pycocotools gives uint32, which negation would wrap)."""
    return np.asarray(coco_mask.area(rles) if rles else [], dtype=np.int64)


def _boxes(rles: list[Rle]) -> np.ndarray:
    """float64 [M, 4] (top, left, bottom, right), bottom/right exclusive; all 0 for empty masks."""
    if not rles:
        return np.zeros((0, 4))
    x, y, w, h = np.asarray(coco_mask.toBbox(rles), dtype=np.float64).reshape(-1, 4).T
    return np.stack([y, x, y + h, x + w], axis=1)


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0)
    top, left = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    bottom, right = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = areas + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_clusters(
    truth: Sequence[InstanceSet], predictions: Sequence[InstanceSet]
) -> tuple[list[InstanceSet], list[InstanceSet]]:
    """A.4: predictions relabelled with the ground-truth class Hungarian-matched to their cluster.

    Masks of unmatched clusters move to a companion image without objects (same size, the
    image's crowd regions kept), labelled with the class they overlap most: there they can only
    be false positives of that class (or ignored on its crowd).
    """
    clusters, classes, overlap = _cluster_class_overlap(truth, predictions)
    if classes.size == 0 or clusters.size == 0:
        return list(truth), list(predictions)
    mapping = _hungarian_mapping(overlap)
    matched = mapping >= 0
    target = np.where(matched, mapping, overlap.argmax(axis=1))
    by_id = {t.image_id: t for t in truth}
    taken = set(by_id)
    truth_out, predictions_out = list(truth), []
    for prediction in predictions:
        index = np.searchsorted(clusters, prediction.classes)
        relabelled = InstanceSet(
            prediction.image_id,
            prediction.size,
            prediction.rles,
            classes[target[index]],
            prediction.scores,
        )
        predictions_out.append(_take(relabelled, np.flatnonzero(matched[index])))
        if matched[index].all():
            continue
        companion = _unused_name(f"{prediction.image_id}#unmatched", taken)
        image = by_id[prediction.image_id]
        truth_out.append(_take(image, np.flatnonzero(image.crowd), companion))
        predictions_out.append(_take(relabelled, np.flatnonzero(~matched[index]), companion))
    return truth_out, predictions_out


def _unused_name(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "#"
    taken.add(name)
    return name


def _cluster_class_overlap(
    truth: Sequence[InstanceSet], predictions: Sequence[InstanceSet]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted cluster ids [K], sorted class ids [C] and the pixels each pair shares [K, C].

    Per image, the union of a cluster's masks against the union of a class's masks (overlapping
    masks of one cluster count once), summed over the images; unions and their intersections are
    taken on the RLEs (pycocotools merge), never decoded. Crowd regions are left out.
    """
    objects = {t.image_id: _take(t, np.flatnonzero(~t.crowd)) for t in truth}
    clusters = _unique_ids([p.classes for p in predictions])
    classes = _unique_ids([t.classes for t in objects.values()])
    overlap = np.zeros((len(clusters), len(classes)))
    for prediction in predictions:
        ground = objects[prediction.image_id]
        rows, predicted = _class_unions(prediction, clusters)
        columns, true = _class_unions(ground, classes)
        for row, cluster_union in zip(rows, predicted, strict=True):
            for column, class_union in zip(columns, true, strict=True):
                shared = coco_mask.merge([cluster_union, class_union], intersect=True)
                overlap[row, column] += float(coco_mask.area(shared))
    return clusters, classes, overlap


def _unique_ids(arrays: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate([np.zeros(0, np.int64), *arrays]).astype(np.int64))


def _class_unions(instance_set: InstanceSet, ids: np.ndarray) -> tuple[np.ndarray, list[Rle]]:
    """Positions in `ids` of the set's classes and the RLE union of each one's masks."""
    present = np.unique(instance_set.classes).astype(np.int64)
    unions = [
        coco_mask.merge([instance_set.rles[i] for i in np.flatnonzero(instance_set.classes == c)])
        for c in present
    ]
    return np.searchsorted(ids, present), unions


def mask_ap(
    truth: Sequence[InstanceSet], predictions: Sequence[InstanceSet], *, class_agnostic: bool
) -> dict[str, float]:
    """A.4: COCO mask AP, AP50 and AP75 (0..1) of `predictions` against `truth`, by image id.

    The lower-level call behind `instance_mask_ap`: every prediction is evaluated.
    class_agnostic: every mask is one class (Table 3 a, b); else classes must already be
    matched to the ground-truth ids (Hungarian matching happens before). No prediction gives
    0, not -1.
    """
    images = {t.image_id: i + 1 for i, t in enumerate(truth)}
    ground = COCO()
    ground.dataset = {
        "images": [
            {"id": i, "height": t.size[0], "width": t.size[1]}
            for t, i in zip(truth, images.values(), strict=True)
        ],
        "annotations": _annotations(truth, images, class_agnostic, with_scores=False),
        "categories": [{"id": c} for c in _categories(truth, predictions, class_agnostic)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground.createIndex()
    detections = _annotations(predictions, images, class_agnostic, with_scores=True)
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        found = ground.loadRes(detections)
        evaluator = COCOeval(ground, found, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(0.0, float(s)) for s in evaluator.stats[:3]]
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}


def _categories(
    truth: Sequence[InstanceSet], predictions: Sequence[InstanceSet], class_agnostic: bool
) -> list[int]:
    if class_agnostic:
        return [1]
    ids = {int(c) for s in (*truth, *predictions) for c in s.classes}
    return sorted(ids)


def _annotations(
    sets: Sequence[InstanceSet], images: dict[str, int], class_agnostic: bool, *, with_scores: bool
) -> list[dict[str, object]]:
    annotations: list[dict[str, object]] = []
    for instance_set in sets:
        if instance_set.image_id not in images:
            raise KeyError(f"prediction for {instance_set.image_id!r}, which has no ground truth")
        for rle, cls, score, crowd in zip(
            instance_set.rles,
            instance_set.classes,
            instance_set.scores,
            instance_set.crowd,
            strict=True,
        ):
            annotation: dict[str, object] = {
                "id": len(annotations) + 1,
                "image_id": images[instance_set.image_id],
                "category_id": 1 if class_agnostic else int(cls),
                "segmentation": rle,
                "area": float(coco_mask.area(rle)),
                "bbox": list(coco_mask.toBbox(rle)),
                "iscrowd": int(crowd),  # COCOeval: IoU = overlap / detection area, a match ignored
            }
            if with_scores:
                annotation["score"] = float(score)
            annotations.append(annotation)
    return annotations


def confusion_matrix(
    predicted: np.ndarray,
    truth: np.ndarray,
    *,
    num_predicted: int,
    num_classes: int,
    ignore_index: int = 255,
) -> np.ndarray:
    """Sec 4.1: int64 [num_predicted, num_classes]; [p, g] counts pixels predicted p, truly g.

    Pixels whose truth is `ignore_index` are left out (their prediction is still range-checked).
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted shape {predicted.shape} != truth shape {truth.shape}")
    keep = truth != ignore_index
    _check_range(predicted, num_predicted, "predicted")
    _check_range(truth[keep], num_classes, "truth")
    pairs = predicted[keep].astype(np.int64) * num_classes + truth[keep].astype(np.int64)
    counts = np.bincount(pairs, minlength=num_predicted * num_classes)
    return counts.reshape(num_predicted, num_classes)


def _check_range(values: np.ndarray, size: int, name: str) -> None:
    outside = values[(values < 0) | (values >= size)]
    if outside.size:
        raise ValueError(f"{name} value {outside.flat[0]} outside 0..{size - 1}")


def _hungarian_mapping(confusion: np.ndarray) -> np.ndarray:
    # Sec 4.1 (ii): one-to-one matching of clusters to classes maximising the matched pixels.
    rows, columns = linear_sum_assignment(-confusion)
    mapping = np.full(confusion.shape[0], -1, dtype=np.int64)
    mapping[rows] = columns
    return mapping


def _majority_mapping(confusion: np.ndarray) -> np.ndarray:
    # Overclustering: each cluster goes to the class it overlaps most; empty clusters to none.
    return np.where(confusion.sum(axis=1) > 0, confusion.argmax(axis=1), -1).astype(np.int64)


def _identity_mapping(confusion: np.ndarray) -> np.ndarray:
    # A.2: the linear probe is trained on the ground-truth classes; prediction p is class p.
    if confusion.shape[0] != confusion.shape[1]:
        raise ValueError(
            f"matching 'identity' needs a square confusion (predictions are class ids), "
            f"got shape {confusion.shape}"
        )
    return np.arange(confusion.shape[0], dtype=np.int64)


_MATCHINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hungarian": _hungarian_mapping,
    "majority": _majority_mapping,
    "identity": _identity_mapping,
}


def remap_confusion(confusion: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """int64 [num_classes, num_classes]: rows summed by `mapping` into classes; -1 rows dropped."""
    num_predicted, num_classes = confusion.shape
    mapped = np.flatnonzero(mapping >= 0)
    assign = np.zeros((num_predicted, num_classes), dtype=np.int64)
    assign[mapped, mapping[mapped]] = 1
    return assign.T @ confusion.astype(np.int64)


def segmentation_scores(confusion: np.ndarray, *, matching: str = "hungarian") -> dict[str, Any]:
    """Sec 4.1 (ii), A.3: match clusters to classes, then IoU per class and their mean.

    matching: "hungarian" (one-to-one, Sec 4.1), "majority" (overclustering) or "identity"
    (predictions already are class ids, as the linear probe's, A.2; square confusion only).
    `confusion[p, g]` as from `confusion_matrix`. Returns `miou` (float, 0..1), `iou` (float
    [num_classes]) and `mapping` (int [num_predicted], the class of each prediction, -1 for none).
    Pixels of unmapped predictions count as misses of their true class. A class absent from the
    ground truth has IoU NaN and is left out of `miou`; a present class never predicted scores 0.
    """
    if matching not in _MATCHINGS:
        raise ValueError(f"matching {matching!r} is not one of {sorted(_MATCHINGS)}")
    if confusion.ndim != 2:
        raise ValueError(f"confusion must be 2-D [predicted, truth], got shape {confusion.shape}")
    mapping = _MATCHINGS[matching](confusion)
    iou = _class_iou(remap_confusion(confusion, mapping), confusion.sum(axis=0))
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else float("nan")
    return {"miou": miou, "iou": iou, "mapping": mapping}


def _class_iou(remapped: np.ndarray, truth_pixels: np.ndarray) -> np.ndarray:
    # Sec 4.1: IoU = TP / (TP + FP + FN) = TP / (predicted + truth - TP) per class.
    hits = np.diag(remapped).astype(np.float64)
    union = remapped.sum(axis=1) + truth_pixels - hits
    iou = np.full(len(truth_pixels), np.nan)
    present = truth_pixels > 0
    iou[present] = hits[present] / union[present]
    return iou


def per_class_table(scores: dict[str, Any], class_names: Sequence[str]) -> str:
    """Table S2 layout: a header of class names and "mIoU", one row of IoU in percent (Markdown).

    Classes absent from the ground truth (NaN) show as "-".
    """
    iou = np.asarray(scores["iou"], dtype=np.float64)
    if len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} IoU values")
    header = ["", *class_names, "mIoU"]
    values = ["IoU (%)", *(_percent(v) for v in iou), _percent(float(scores["miou"]))]
    widths = [max(len(h), len(v)) for h, v in zip(header, values, strict=True)]
    rule = ["-" * (w - 1) + ":" for w in widths]
    rows = [header, rule, values]
    return "\n".join(
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    )


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


_CELL = 24
_PAD = 6
_MIN_SIDE = 200
_WHITE = (255, 255, 255)
_HEAT_STOPS = np.array([0.0, 0.5, 1.0])
_HEAT_COLOURS = np.array([[20, 24, 82], [214, 46, 38], [255, 236, 96]], dtype=np.float64)


def confusion_picture(confusion_remapped: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """uint8 RGB heat map of the remapped confusion, truth rows normalised to sum 1 (Sec 4.1).

    `confusion_remapped[c, g]` is `remap_confusion`'s [predicted class, truth class]; the picture
    shows it transposed: truth rows, predicted-class columns, dark blue (0) to yellow (1).
    """
    side = len(class_names)
    if confusion_remapped.shape != (side, side):
        raise ValueError(f"confusion shape {confusion_remapped.shape} != {side} classes squared")
    shown = confusion_remapped.T.astype(np.float64)
    fractions = shown / np.maximum(shown.sum(axis=1, keepdims=True), 1.0)
    top, left = _grid_origin(class_names)
    height = max(_MIN_SIDE, top + side * _CELL + _PAD)
    width = max(_MIN_SIDE, left + side * _CELL + _PAD)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    cells = np.repeat(np.repeat(_heat(fractions), _CELL, axis=0), _CELL, axis=1)
    canvas[top : top + side * _CELL, left : left + side * _CELL] = cells
    picture = Image.fromarray(canvas)
    _draw_labels(picture, class_names, top, left)
    return np.asarray(picture, dtype=np.uint8)


def _heat(fractions: np.ndarray) -> np.ndarray:
    channels = [np.interp(fractions, _HEAT_STOPS, _HEAT_COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _text_size(text: str) -> tuple[int, int]:
    _, _, right, bottom = ImageFont.load_default().getbbox(text)
    return math.ceil(right), math.ceil(bottom)


def _grid_origin(class_names: Sequence[str]) -> tuple[int, int]:
    """(top, left) pixel of the grid: past the column labels (rotated) and the row labels."""
    longest = max((_text_size(n)[0] for n in class_names), default=0)
    return 2 * _PAD + longest, 2 * _PAD + longest


def _draw_labels(picture: Image.Image, class_names: Sequence[str], top: int, left: int) -> None:
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    for i, name in enumerate(class_names):
        width, height = _text_size(name)
        centre = i * _CELL + (_CELL - height) // 2
        draw.text((left - _PAD - width, top + centre), name, fill=(0, 0, 0), font=font)
        label = Image.new("RGB", (max(width, 1), max(height, 1)), _WHITE)
        ImageDraw.Draw(label).text((0, 0), name, fill=(0, 0, 0), font=font)
        rotated = label.rotate(90, expand=True)
        picture.paste(rotated, (left + centre, top - _PAD - rotated.height))
