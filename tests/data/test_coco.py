"""COCOInstances on a tiny instances_train2014.json: classes, masks, crowds, COCO20k lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskdistill.config import DataConfig
from maskdistill.data import build_dataset
from maskdistill.data.coco import COCOInstances

H, W = 24, 32
CAR_ID, CAT_ID = 3, 17  # COCO category ids; contiguous classes: car 1, cat 2
CAR, CAT = 1, 2
IMAGE_IDS = (25, 9, 30)  # 30 has no annotations; listed out of id order on purpose


def stem(coco_id: int) -> str:
    return f"COCO_train2014_{coco_id:012d}"


def rect(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Column-major run lengths, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


CAR_MASK = rect(slice(8, 14), slice(10, 16))
CAT_MASK = rect(slice(2, 20), slice(2, 22))  # what polygon (2,2)-(22,20) rasterizes to
CROWD_MASK = rect(slice(18, 24), slice(20, 32))  # overlaps the cat at rows 18-19, cols 20-21


def annotation(
    ann_id: int, image_id: int, category: int, segmentation: Any, crowd: int = 0
) -> dict[str, Any]:
    return {
        "id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": crowd,
        "segmentation": segmentation, "area": 0.0, "bbox": [0, 0, 1, 1],
    }  # fmt: skip


def instances_json() -> dict[str, Any]:
    """Image 9: a small car (RLE, lower ann id) on a big cat (polygon) and a crowd; 25: a cat."""
    return {
        "images": [
            {"id": i, "file_name": f"{stem(i)}.jpg", "height": H, "width": W} for i in IMAGE_IDS
        ],
        "categories": [{"id": CAT_ID, "name": "cat"}, {"id": CAR_ID, "name": "car"}],
        "annotations": [
            annotation(1, 9, CAR_ID, compressed_rle(CAR_MASK)),
            annotation(2, 9, CAT_ID, [[2, 2, 22, 2, 22, 20, 2, 20]]),
            annotation(3, 9, CAR_ID, uncompressed_rle(CROWD_MASK), crowd=1),
            annotation(4, 25, CAT_ID, [[5, 5, 15, 5, 15, 15, 5, 15]]),
        ],
    }


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2014.json").write_text(json.dumps(instances_json()))
    (tmp_path / "train2014").mkdir()
    for coco_id in IMAGE_IDS:
        pixels = np.full((H, W, 3), coco_id, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "train2014" / f"{stem(coco_id)}.jpg")
    return tmp_path


def open_coco(root: Path, **kwargs: Any) -> COCOInstances:
    return COCOInstances(
        str(root), annotations=str(root / "annotations/instances_train2014.json"), **kwargs
    )


def test_classes_contiguous_in_category_id_order(coco_root: Path) -> None:
    assert list(open_coco(coco_root).class_names) == ["car", "cat"]


def test_image_ids_are_stems_in_coco_id_order(coco_root: Path) -> None:
    assert open_coco(coco_root).image_ids() == [stem(9), stem(25), stem(30)]


def test_annotations_path_may_be_relative_to_root(coco_root: Path) -> None:
    dataset = COCOInstances(str(coco_root), annotations="annotations/instances_train2014.json")
    assert dataset.image_ids() == [stem(9), stem(25), stem(30)]


def test_instances_exclude_crowd_and_follow_annotation_ids(coco_root: Path) -> None:
    sample = open_coco(coco_root).load(stem(9))
    assert sample.image.shape == (H, W, 3)
    assert sample.instance_classes is not None and sample.instance_masks is not None
    assert sample.instance_classes.dtype == np.int64
    assert sample.instance_classes.tolist() == [CAR, CAT]
    assert sample.instance_masks.dtype == bool
    np.testing.assert_array_equal(sample.instance_masks[0], CAR_MASK.astype(bool))
    np.testing.assert_array_equal(sample.instance_masks[1], CAT_MASK.astype(bool))


def test_semantic_map_smaller_on_top_and_crowd_ignored(coco_root: Path) -> None:
    sample = open_coco(coco_root).load(stem(9))
    sem = sample.semantic
    assert sem is not None and sem.dtype == np.uint8
    assert (sem[0, 0], sem[3, 3], sem[10, 12], sem[22, 30], sem[19, 21]) == (0, CAT, CAR, 255, 255)
    np.testing.assert_array_equal(sem == 255, CROWD_MASK.astype(bool))


def test_instance_masks_agree_with_semantic_map(coco_root: Path) -> None:
    sample = open_coco(coco_root).load(stem(9))
    assert sample.semantic is not None and sample.instance_masks is not None
    assert sample.instance_classes is not None
    areas = sample.instance_masks.sum(axis=(1, 2))
    for mask, cls, area in zip(sample.instance_masks, sample.instance_classes, areas, strict=True):
        covered = sample.instance_masks[areas < area].any(axis=0) | CROWD_MASK.astype(bool)
        assert (sample.semantic[mask & ~covered] == cls).all()
        assert (mask & ~covered).any()


def test_image_without_annotations(coco_root: Path) -> None:
    sample = open_coco(coco_root).load(stem(30))
    assert sample.instance_masks is not None and sample.instance_masks.shape == (0, H, W)
    assert sample.instance_classes is not None and sample.instance_classes.shape == (0,)
    assert sample.semantic is not None and not sample.semantic.any()


def test_coco20k_list_accepts_ids_and_file_names(coco_root: Path) -> None:
    ids_file = coco_root / "coco20k.txt"
    ids_file.write_text(f"30\n\ntrain2014/{stem(9)}.jpg\n{stem(30)}\n")
    dataset = open_coco(coco_root, image_ids_file=str(ids_file))
    assert dataset.image_ids() == [stem(9), stem(30)]
    with pytest.raises(KeyError):
        dataset.load(stem(25))


def test_coco20k_unknown_ids_are_listed(coco_root: Path) -> None:
    ids_file = coco_root / "coco20k.txt"
    unknown = ["12345", "COCO_train2014_000000000777.jpg"] + [str(n) for n in range(100, 105)]
    ids_file.write_text("\n".join(["9", *unknown]) + "\n")
    with pytest.raises(ValueError, match="7 entries") as err:
        open_coco(coco_root, image_ids_file=str(ids_file))
    message = str(err.value)
    assert str(ids_file) in message
    assert "12345" in message and "COCO_train2014_000000000777.jpg" in message
    assert "103" not in message  # only the first 5 are listed


def test_explicit_image_dir(coco_root: Path) -> None:
    (coco_root / "train2014").rename(coco_root / "elsewhere")
    dataset = open_coco(coco_root, image_dir=str(coco_root / "elsewhere"))
    classes = dataset.load(stem(25)).instance_classes
    assert classes is not None and classes.tolist() == [CAT]


def test_image_size_mismatch_names_file(coco_root: Path) -> None:
    path = coco_root / "train2014" / f"{stem(25)}.jpg"
    Image.new("RGB", (W, H + 8)).save(path)
    with pytest.raises(ValueError, match="instances_train2014.json") as err:
        open_coco(coco_root).load(stem(25))
    assert str(path) in str(err.value)


def test_relative_path_is_the_image_folder_and_file_name_under_root(coco_root: Path) -> None:
    dataset = open_coco(coco_root)
    name = dataset.relative_path(stem(9))
    assert name == f"train2014/{stem(9)}.jpg" and (coco_root / name).is_file()
    (coco_root / "train2014").rename(coco_root / "images")
    moved = open_coco(coco_root, image_dir=str(coco_root / "images"))
    assert moved.relative_path(stem(25)) == f"images/{stem(25)}.jpg"
    with pytest.raises(KeyError, match="nope"):
        moved.relative_path("nope")


def test_crowd_regions_come_with_their_classes(coco_root: Path) -> None:
    sample = open_coco(coco_root).load(stem(9))
    assert sample.crowd_masks is not None and sample.crowd_classes is not None
    assert sample.crowd_masks.shape == (1, H, W) and sample.crowd_classes.tolist() == [CAR]
    np.testing.assert_array_equal(sample.crowd_masks[0], CROWD_MASK.astype(bool))
    plain = open_coco(coco_root).load(stem(25))
    assert plain.crowd_masks is not None and plain.crowd_masks.shape == (0, H, W)


def _data(root: Path, **overrides: Any) -> DataConfig:
    return DataConfig(
        kind="coco",
        root=str(root),
        coco_annotations="annotations/instances_train2014.json",
        **overrides,
    )


def test_split_named_like_the_image_folder_is_every_image_other_names_the_list(
    coco_root: Path,
) -> None:
    # Sec 4.1: K-means on all train2014 images, training and testing on the COCO20k list.
    (coco_root / "coco20k.txt").write_text("25\n")
    config = _data(coco_root, coco_image_ids=str(coco_root / "coco20k.txt"))
    assert build_dataset(config, "train2014").image_ids() == [stem(9), stem(25), stem(30)]
    assert build_dataset(config, "coco20k").image_ids() == [stem(25)]
    assert build_dataset(config, "any_name").image_ids() == [stem(25)]


def test_a_split_other_than_the_image_folder_needs_the_id_list(coco_root: Path) -> None:
    with pytest.raises(ValueError, match="split 'coco20k' needs data.coco_image_ids") as err:
        build_dataset(_data(coco_root), "coco20k")
    assert "'train2014' is every image of instances_train2014.json" in str(err.value)
    assert len(build_dataset(_data(coco_root), "train2014").image_ids()) == 3
