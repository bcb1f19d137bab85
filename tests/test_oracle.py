from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.mine import GroundTruthMiner
from maskdistill.config import load_config
from maskdistill.data.base import Sample
from maskdistill.masks import decode_rle
from maskdistill.oracle import NO_OBJECT, largest_object

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _sample(masks: np.ndarray | None, classes: list[int] | None) -> Sample:
    image = np.zeros((6, 8, 3), dtype=np.uint8)
    labels = None if classes is None else np.array(classes, dtype=np.int64)
    return Sample("img", image, None, masks, labels)


def _two_objects() -> np.ndarray:
    masks = np.zeros((2, 6, 8), dtype=bool)
    masks[0, 0, 0:2] = True  # class 1, 2 pixels
    masks[1, 1:5, 5] = True  # class 3, an L of 6 pixels: rows 1-4 of column 5 ...
    masks[1, 4, 3:5] = True  # ... and row 4, columns 3-4
    return masks


def test_the_largest_object_with_its_one_hot_class_centre_seed_and_patch() -> None:
    found = largest_object(
        _sample(_two_objects(), [1, 3]), num_classes=3, patch_size=2, short_side=3
    )
    assert found is not None
    assert found.mask.sum() == 6 and found.mask[4, 3]
    assert found.box == (3, 1, 6, 5)  # columns 3-5, rows 1-4, pixel edges
    assert found.score == 1.0
    assert found.cls_token.tolist() == [0.0, 0.0, 1.0]  # class 3 of 3
    # centroid (row 3, col 4.5) lies outside the L; the nearest mask pixel is (3, 5), at
    # squared distance 0.25 (the others: >= 1.25). Mined at 3x4 (short side 3): row 3 -> mined
    # row floor(3.5 * 3 / 6) = 1, col 5 -> floor(5.5 * 4 / 8) = 2; patches of 2: (0, 1).
    assert found.seed_patch == (0, 1)
    # original pixels whose nearest mined pixel lies in that patch: rows 0-3, columns 4-7
    assert found.seed_box == (4, 0, 8, 4)
    assert found.grid == (2, 2)
    assert (found.height, found.width) == (6, 8)


def test_an_image_without_objects_gives_none_and_unlabelled_data_an_error() -> None:
    empty = _sample(np.zeros((0, 6, 8), dtype=bool), [])
    assert largest_object(empty, num_classes=3, patch_size=2, short_side=3) is None
    with pytest.raises(ValueError, match="mining.source=ground_truth needs instance"):
        largest_object(_sample(None, None), num_classes=3, patch_size=2, short_side=3)
    with pytest.raises(ValueError, match="class 3 outside 1..2"):
        largest_object(_sample(_two_objects(), [1, 3]), num_classes=2, patch_size=2, short_side=3)


class _Emptied:
    """A data set whose image `empty` has no labelled object."""

    def __init__(self, dataset: Any, empty: str) -> None:
        self.dataset, self.empty = dataset, empty

    def load(self, image_id: str) -> Sample:
        sample = self.dataset.load(image_id)
        if image_id == self.empty:
            sample.instance_masks = sample.instance_masks[:0]
            sample.instance_classes = sample.instance_classes[:0]
        return sample


def test_ground_truth_miner_writes_the_oracle_and_skips_with_reasons(tmp_path: Path) -> None:
    config = load_config(
        DEMO,
        [
            f"run_dir={tmp_path}",
            "data.synthetic.image_size=[48, 64]",
            "backbone.arch=test_vit",
            "mining.short_side=48",
            "mining.source=ground_truth",
        ],
    )
    miner = GroundTruthMiner(config, "train")
    dataset = miner.dataset
    miner.dataset = _Emptied(dataset, "train_000002")
    batch = {
        "image_id": np.array(["train_000000", "train_000001", "train_000002", "train_000003"]),
        "shard": np.zeros(4, dtype=np.int64),
        "reason": np.array(["", "truncated", "", ""]),
    }
    out = miner(batch)
    # readable images with an object first, then the skipped ones with their reasons
    assert out["image_id"].tolist() == [
        "train_000000",
        "train_000003",
        "train_000001",
        "train_000002",
    ]
    assert out["reason"].tolist() == ["", "", "truncated", NO_OBJECT]
    assert out["feature"].shape == (4, 6)  # one-hot over the demo's 6 classes, zeros when skipped
    for row, image_id in enumerate(["train_000000", "train_000003"]):
        sample = dataset.load(image_id)
        largest = int(np.argmax(sample.instance_masks.sum((1, 2))))
        mask = decode_rle({"size": [48, 64], "counts": str(out["mask_rle"][row])})
        assert (mask == sample.instance_masks[largest]).all()
        assert int(np.argmax(out["feature"][row])) == sample.instance_classes[largest] - 1
        assert out["score"][row] == 1.0
    assert not out["feature"][2:].any()
