"""Predictions in COCO's results format, the one CutLER's and detectron2's users load.

COCO results are a list of {image_id, category_id, segmentation (RLE), bbox [x, y, w, h],
score}; pycocotools reads them against a dataset that lists the images
(`COCO(images_file).loadRes(results_file)`), which `image_table` writes. Category ids are the
segmenter's labels (1 + cluster id); background (0) is never a category. Semantic maps give one
segment per class present and no score (COCO-Stuff's results format).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maskdistill.inference import Instance
from maskdistill.masks import encode_rle, mask_to_box


def categories(names: Sequence[str]) -> list[dict[str, Any]]:
    """Every non-background label as a COCO category {id, name}."""
    return [{"id": label, "name": name} for label, name in enumerate(names) if label > 0]


def instance_results(image_id: int, instances: Sequence[Instance]) -> list[dict[str, Any]]:
    """One COCO result per detected instance, its box as [x, y, width, height]."""
    return [
        {
            "image_id": image_id,
            "category_id": instance.label,
            "segmentation": encode_rle(instance.mask),
            "bbox": [
                instance.box[0],
                instance.box[1],
                instance.box[2] - instance.box[0],
                instance.box[3] - instance.box[1],
            ],
            "score": instance.score,
        }
        for instance in instances
    ]


def semantic_results(image_id: int, labels: np.ndarray) -> list[dict[str, Any]]:
    """One COCO result per non-background class present in an int label map [H, W]."""
    results = []
    for label in np.unique(labels).tolist():
        if label == 0:
            continue
        mask = labels == label
        x0, y0, x1, y1 = mask_to_box(mask)
        results.append(
            {
                "image_id": image_id,
                "category_id": int(label),
                "segmentation": encode_rle(mask),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
            }
        )
    return results


def image_table(
    images: Sequence[tuple[int, str, int, int]], names: Sequence[str]
) -> dict[str, Any]:
    """A COCO dataset without annotations: (id, file_name, height, width) per image and the
    categories, what pycocotools needs to load results."""
    return {
        "images": [
            {"id": image_id, "file_name": name, "height": height, "width": width}
            for image_id, name, height, width in images
        ],
        "categories": categories(names),
        "annotations": [],
    }
