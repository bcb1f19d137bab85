"""An upper-bound diagnostic: ground truth in place of Sec 3.2's mined mask and CLS feature.

`largest_object` gives an image's largest labelled object in the form mining gives its mask
(`MinedMask`, score 1) and a one-hot of the object's true class as its feature, so K-means
with K = the class count recovers the classes. `mining.source: ground_truth` writes it as the
mine stage's output, and `benchmarks/detector_oracle.py` trains the detector on it: what the
stages after mining (Mask R-CNN, confident masks, DeepLab-v3) make of perfect initial masks,
which no unsupervised run can exceed. Not unsupervised: never report it as MaskDistill.
"""

from __future__ import annotations

import numpy as np

from maskdistill.data.base import Sample
from maskdistill.masks import mask_to_box, nearest_index, patch_grid
from maskdistill.mining import MinedMask, mined_size, patch_box

NO_OBJECT = "no ground-truth object"  # the skip reason of an image without labelled objects


def largest_object(
    sample: Sample, *, num_classes: int, patch_size: int, short_side: int
) -> MinedMask | None:
    """The sample's largest ground-truth object as a mined mask; None when it has none.

    score 1 (given, as the paper treats initial masks); `cls_token` the one-hot [num_classes]
    of its class; the seed is the mask pixel nearest the mask's centroid, `seed_patch` its patch
    on the grid mining would use (`patch_size` pixels at shorter side `short_side`) and
    `seed_box` that patch on the image, as mining draws it. Raises ValueError when the sample
    has no instance ground truth at all (an unlabelled data set) or a class outside 1..C.
    """
    if sample.instance_masks is None or sample.instance_classes is None:
        raise ValueError(
            f"{sample.image_id}: mining.source=ground_truth needs instance ground truth; "
            "this data set has none (use mining.source=vit)"
        )
    if len(sample.instance_masks) == 0:
        return None
    largest = int(np.argmax(sample.instance_masks.sum((1, 2))))
    mask = np.asarray(sample.instance_masks[largest], dtype=bool)
    if not mask.any():
        return None
    class_id = int(sample.instance_classes[largest])
    if not 1 <= class_id <= num_classes:
        raise ValueError(f"{sample.image_id}: class {class_id} outside 1..{num_classes}")
    original = (sample.height, sample.width)
    mined = mined_size(*original, short_side)
    seed_patch = _seed_patch(mask, original, mined, patch_size)
    feature = np.zeros(num_classes, dtype=np.float32)
    feature[class_id - 1] = 1.0
    return MinedMask(
        height=original[0],
        width=original[1],
        mask=mask,
        box=mask_to_box(mask),
        score=1.0,
        seed_patch=seed_patch,
        seed_box=patch_box(seed_patch, patch_size, original, mined),
        grid=patch_grid(mined, patch_size),
        cls_token=feature,
    )


def _seed_patch(
    mask: np.ndarray, original: tuple[int, int], mined: tuple[int, int], patch_size: int
) -> tuple[int, int]:
    """(row, col) of the patch holding the mask pixel nearest the mask's centroid."""
    rows, cols = np.nonzero(mask)
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    row = int(nearest_index(mined[0], original[0])[rows[nearest]]) // patch_size
    col = int(nearest_index(mined[1], original[1])[cols[nearest]]) // patch_size
    return row, col
