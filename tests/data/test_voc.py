"""PascalVOC on a tiny VOC2012 tree: splits, labels, instances, train_aug, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from maskdistill.data.base import SkipLog, UnreadableImage, iter_samples
from maskdistill.data.voc import PascalVOC

H, W = 24, 32
AEROPLANE, DOG, PERSON = 1, 12, 15
VOC_TRAIN = ["2007_000001", "2007_000002"]
VOC_VAL = ["2007_000003"]
PALETTE = [v for i in range(256) for v in (i, (7 * i) % 256, (13 * i) % 256)]


def semantic_map() -> np.ndarray:
    """An aeroplane and a person (with a few dog pixels), each inside a 255 boundary."""
    sem = np.zeros((H, W), dtype=np.uint8)
    sem[3:12, 3:14] = 255
    sem[4:11, 4:13] = AEROPLANE
    sem[13:23, 17:31] = 255
    sem[14:22, 18:30] = PERSON
    sem[14:16, 18:21] = DOG
    return sem


def object_map() -> np.ndarray:
    """Instance 1 is the person, instance 2 the aeroplane."""
    obj = np.zeros((H, W), dtype=np.uint8)
    obj[3:12, 3:14] = 255
    obj[4:11, 4:13] = 2
    obj[13:23, 17:31] = 255
    obj[14:22, 18:30] = 1
    return obj


def write_png(path: Path, values: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8))
    if mode == "P":
        img.putpalette(PALETTE)
    img.save(path)


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """tmp_path/VOCdevkit/VOC2012 with train, val, trainval; 2007_000002 lacks an object png."""
    voc_dir = tmp_path / "VOCdevkit" / "VOC2012"
    for seed, image_id in enumerate(VOC_TRAIN + VOC_VAL):
        write_jpeg(voc_dir / "JPEGImages" / f"{image_id}.jpg", seed)
        write_png(voc_dir / "SegmentationClass" / f"{image_id}.png", semantic_map())
        if image_id != "2007_000002":
            write_png(voc_dir / "SegmentationObject" / f"{image_id}.png", object_map())
    lists = voc_dir / "ImageSets" / "Segmentation"
    write_list(lists / "train.txt", VOC_TRAIN)
    write_list(lists / "val.txt", VOC_VAL)
    write_list(lists / "trainval.txt", VOC_TRAIN + VOC_VAL)
    return voc_dir


def test_class_names_are_the_20_voc_classes(voc: Path) -> None:
    names = PascalVOC(str(voc)).class_names
    assert len(names) == 20
    assert (names[0], names[AEROPLANE - 1], names[PERSON - 1]) == ("aeroplane",) * 2 + ("person",)
    assert (names[DOG - 1], names[-1]) == ("dog", "tvmonitor")


def test_root_may_be_devkit_parent_or_voc2012_folder(voc: Path) -> None:
    from_parent = PascalVOC(str(voc.parent.parent), split="trainval")
    from_voc2012 = PascalVOC(str(voc), split="trainval")
    assert from_parent.image_ids() == from_voc2012.image_ids() == VOC_TRAIN + VOC_VAL
    assert PascalVOC(str(voc), split="train").image_ids() == VOC_TRAIN


def test_semantic_map_golden_values(voc: Path) -> None:
    sample = PascalVOC(str(voc), split="val").load("2007_000003")
    assert sample.image.shape == (H, W, 3)
    assert sample.semantic is not None and sample.semantic.dtype == np.uint8
    sem = sample.semantic
    assert (sem[0, 0], sem[7, 8], sem[3, 3], sem[18, 25], sem[14, 18]) == (
        0, AEROPLANE, 255, PERSON, DOG,
    )  # fmt: skip


def test_instances_sorted_by_index_with_majority_class(voc: Path) -> None:
    sample = PascalVOC(str(voc), split="val").load("2007_000003")
    assert sample.instance_masks is not None and sample.instance_classes is not None
    assert sample.instance_classes.dtype == np.int64
    assert sample.instance_classes.tolist() == [PERSON, AEROPLANE]
    assert sample.instance_masks.dtype == bool and sample.instance_masks.shape == (2, H, W)
    np.testing.assert_array_equal(sample.instance_masks[0], object_map() == 1)
    np.testing.assert_array_equal(sample.instance_masks[1], object_map() == 2)
    assert sample.semantic is not None
    for mask, cls in zip(sample.instance_masks, sample.instance_classes, strict=True):
        assert np.isin(sample.semantic[mask], [cls, DOG]).all()


def test_instances_absent_without_object_png(voc: Path) -> None:
    sample = PascalVOC(str(voc), split="train").load("2007_000002")
    assert sample.semantic is not None
    assert sample.instance_masks is None and sample.instance_classes is None


def test_missing_split_file_names_path_and_available_splits(voc: Path) -> None:
    (voc / "ImageSets" / "Segmentation" / "trainval.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        PascalVOC(str(voc), split="trainval")
    message = str(err.value)
    assert str(voc / "ImageSets" / "Segmentation" / "trainval.txt") in message
    assert "splits available: train, val" in message


def test_unknown_split_is_rejected(voc: Path) -> None:
    with pytest.raises(ValueError, match="train_aug"):
        PascalVOC(str(voc), split="test")


def test_label_shape_mismatch_names_file(voc: Path) -> None:
    label = voc / "SegmentationClass" / "2007_000003.png"
    write_png(label, np.zeros((H, W - 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="differs from image") as err:
        PascalVOC(str(voc), split="val").load("2007_000003")
    assert str(label) in str(err.value)


def test_out_of_range_label_values_name_file_and_values(voc: Path) -> None:
    label = voc / "SegmentationClass" / "2007_000003.png"
    values = semantic_map()
    values[0, 0], values[0, 1] = 21, 100
    write_png(label, values)
    with pytest.raises(ValueError, match=r"\[21, 100\]") as err:
        PascalVOC(str(voc), split="val").load("2007_000003")
    assert str(label) in str(err.value)


def test_rgb_label_is_rejected(voc: Path) -> None:
    label = voc / "SegmentationClass" / "2007_000003.png"
    Image.new("RGB", (W, H)).save(label)
    with pytest.raises(ValueError, match="mode RGB") as err:
        PascalVOC(str(voc), split="val").load("2007_000003")
    assert str(label) in str(err.value)


def test_unreadable_image_is_skippable(voc: Path) -> None:
    (voc / "JPEGImages" / "2007_000001.jpg").write_bytes(b"not a jpeg")
    dataset = PascalVOC(str(voc), split="trainval")
    with pytest.raises(UnreadableImage):
        dataset.load("2007_000001")
    skips = SkipLog()
    loaded = [s.image_id for s in iter_samples(dataset, skips=skips)]
    assert loaded == ["2007_000002", "2007_000003"]
    assert list(skips.reasons()) == ["2007_000001"]


def test_train_aug_from_list_file_reads_segmentation_class_aug(voc: Path) -> None:
    aug_id = "2008_000010"
    write_jpeg(voc / "JPEGImages" / f"{aug_id}.jpg", 7)
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        f"2007_000001\n/JPEGImages/{aug_id}.jpg /SegmentationClassAug/{aug_id}.png\n"
    )
    aug_label = np.full((H, W), 7, dtype=np.uint8)  # differs from SegmentationClass
    for image_id in ("2007_000001", aug_id):
        write_png(voc / "SegmentationClassAug" / f"{image_id}.png", aug_label, mode="L")
    dataset = PascalVOC(str(voc), split="train_aug")
    assert dataset.image_ids() == ["2007_000001", aug_id]
    sample = dataset.load("2007_000001")
    assert sample.semantic is not None
    np.testing.assert_array_equal(sample.semantic, aug_label)
    assert sample.instance_masks is None


SBD_TRAIN = ["2008_000100", "2008_000101", "2007_000003"]
SBD_VAL = ["2008_000102", "2007_000001"]


def write_sbd(dataset_dir: Path) -> None:
    """SBD lists and .mat labels (class 7 everywhere but a corner of 0)."""
    write_list(dataset_dir / "train.txt", SBD_TRAIN)
    write_list(dataset_dir / "val.txt", SBD_VAL)
    label = np.full((H, W), 7, dtype=np.uint8)
    label[:2, :2] = 0
    for image_id in SBD_TRAIN + SBD_VAL:
        (dataset_dir / "cls").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(
            dataset_dir / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": label}}
        )


@pytest.mark.parametrize("sbd_dir", ["VOCdevkit/benchmark_RELEASE/dataset", "SBD/dataset"])
def test_train_aug_built_from_sbd(voc: Path, sbd_dir: str) -> None:
    root = voc.parent.parent
    write_sbd(root / sbd_dir)
    for seed, image_id in enumerate(SBD_TRAIN + SBD_VAL):
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", seed)
    dataset = PascalVOC(str(root), split="train_aug")
    expected = (set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL)
    assert dataset.image_ids() == sorted(expected)
    assert "2007_000003" not in dataset.image_ids()
    from_mat = dataset.load("2008_000100").semantic
    assert from_mat is not None and (from_mat[0, 0], from_mat[5, 5]) == (0, 7)
    from_png = dataset.load("2007_000001").semantic  # VOC png wins over the SBD .mat
    assert from_png is not None
    np.testing.assert_array_equal(from_png, semantic_map())


def test_sbd_label_out_of_range_names_mat_file(voc: Path) -> None:
    write_sbd(voc.parent / "benchmark_RELEASE" / "dataset")
    write_jpeg(voc / "JPEGImages" / "2008_000100.jpg", 0)
    mat = voc.parent / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000100.mat"
    scipy.io.savemat(mat, {"GTcls": {"Segmentation": np.full((H, W), 30, dtype=np.uint8)}})
    with pytest.raises(ValueError, match=r"\[30\]") as err:
        PascalVOC(str(voc), split="train_aug").load("2008_000100")
    assert str(mat) in str(err.value)


def test_train_aug_without_list_or_sbd_names_what_was_searched(voc: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        PascalVOC(str(voc), split="train_aug")
    message = str(err.value)
    assert "train_aug.txt" in message and "benchmark_RELEASE" in message
    assert "splits available: train, val, trainval" in message


@pytest.mark.parametrize("above", [0, 2], ids=["root-is-VOC2012", "root-above-VOCdevkit"])
def test_relative_path_is_the_jpeg_under_the_root_as_given(voc: Path, above: int) -> None:
    root = voc.parents[above - 1] if above else voc
    dataset = PascalVOC(str(root), split="val")
    name = dataset.relative_path(VOC_VAL[0])
    prefix = "VOCdevkit/VOC2012/" if above else ""
    assert name == f"{prefix}JPEGImages/{VOC_VAL[0]}.jpg"
    assert (root / name).is_file()
    with pytest.raises(KeyError, match=VOC_TRAIN[0]):
        dataset.relative_path(VOC_TRAIN[0])  # not in val
