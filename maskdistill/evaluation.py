"""Evaluation protocols (Sec 4.1, A.4). So far: COCO-style mask AP through pycocotools."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


@dataclass
class InstanceSet:
    """Masks of one image: bool [M, H, W], classes [M] (any ids), scores [M] (1 for truth)."""

    image_id: str
    masks: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


def mask_ap(
    truth: Sequence[InstanceSet], predictions: Sequence[InstanceSet], *, class_agnostic: bool
) -> dict[str, float]:
    """A.4: COCO mask AP, AP50 and AP75 (0..1) of `predictions` against `truth`, by image id.

    class_agnostic: every mask is one class (Table 3 a, b); else classes must already be matched
    to the ground-truth ids (Hungarian matching happens before). No prediction gives 0, not -1.
    """
    images = {t.image_id: i + 1 for i, t in enumerate(truth)}
    ground = COCO()
    ground.dataset = {
        "images": [
            {"id": i, "height": t.masks.shape[1], "width": t.masks.shape[2]}
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
        for mask, cls, score in zip(
            instance_set.masks, instance_set.classes, instance_set.scores, strict=True
        ):
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotation: dict[str, object] = {
                "id": len(annotations) + 1,
                "image_id": images[instance_set.image_id],
                "category_id": 1 if class_agnostic else int(cls),
                "segmentation": rle,
                "area": float(coco_mask.area(rle)),
                "bbox": list(coco_mask.toBbox(rle)),
                "iscrowd": 0,
            }
            if with_scores:
                annotation["score"] = float(score)
            annotations.append(annotation)
    return annotations
