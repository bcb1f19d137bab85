"""PascalVOC on a tiny VOC2012 tree: splits, labels, instances, train_aug, errors; VOC2007
beside it (voc07_trainval) and both years read as one training set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from maskdistill.config import DataConfig
from maskdistill.data import build_dataset
from maskdistill.data.base import SkipLog, UnreadableImage, iter_samples
from maskdistill.data.union import SplitUnion
from maskdistill.data.voc import VOC_CLASSES, PascalVOC, PascalVOC2007

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


# A whole VOC tree for the PASCAL protocol (A.4): VOC2012 with SegmentationClassAug and every
# list, VOC2007 beside it; tests/jobs/test_pascal_protocol.py runs the pipeline on it.
TREE_TRAIN = ["2007_000032", "2008_000002", "2008_000003"]
TREE_VAL = ["2008_000004", "2009_000005"]
TREE_AUG_ONLY = ["2010_000006", "2011_000007"]  # SBD images: in train_aug only
TREE_VOC07 = ["000005", "000007", "000009"]
TREE_CLASSES = (AEROPLANE, DOG, PERSON)


def scene(index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, class map and object map of one bright object (class by index) on dark noise."""
    h, w = size
    image = np.random.default_rng(index).integers(0, 60, (h, w, 3), dtype=np.uint8)
    top, left = (5 * index) % (h // 2), (7 * index) % (w // 2)
    box = (slice(top, top + h // 2), slice(left, left + w // 2))
    cls = TREE_CLASSES[index % len(TREE_CLASSES)]
    image[box] = (200 + 5 * (index % 3), 40 * (index % 3), 180)
    semantic, objects = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    semantic[box], objects[box] = cls, 1
    return image, semantic, objects


def write_voc_tree(root: Path, size: tuple[int, int] = (H, W)) -> dict[str, list[str]]:
    """root/VOCdevkit/{VOC2012,VOC2007}; returns each split's ids."""
    voc12, voc07 = root / "VOCdevkit" / "VOC2012", root / "VOCdevkit" / "VOC2007"
    for index, image_id in enumerate(TREE_TRAIN + TREE_VAL + TREE_AUG_ONLY + TREE_VOC07):
        image, semantic, objects = scene(index, size)
        folder = voc07 if image_id in TREE_VOC07 else voc12
        (folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "JPEGImages" / f"{image_id}.jpg", quality=95)
        if image_id in TREE_TRAIN + TREE_VAL:
            write_png(voc12 / "SegmentationClass" / f"{image_id}.png", semantic)
            write_png(voc12 / "SegmentationObject" / f"{image_id}.png", objects)
        if image_id in TREE_TRAIN + TREE_AUG_ONLY:
            write_png(voc12 / "SegmentationClassAug" / f"{image_id}.png", semantic, mode="L")
    splits = {
        "train": TREE_TRAIN,
        "val": TREE_VAL,
        "trainval": TREE_TRAIN + TREE_VAL,
        "train_aug": sorted(TREE_TRAIN + TREE_AUG_ONLY),
    }
    for name, ids in splits.items():
        write_list(voc12 / "ImageSets" / "Segmentation" / f"{name}.txt", ids)
    write_list(voc07 / "ImageSets" / "Main" / "trainval.txt", TREE_VOC07)
    return splits | {"voc07_trainval": TREE_VOC07}


def voc_data(root: Path) -> DataConfig:
    return DataConfig(kind="voc", root=str(root), train_split="train_aug")


def test_voc07_trainval_reads_voc2007_beside_voc2012(tmp_path: Path) -> None:
    write_voc_tree(tmp_path)
    dataset = build_dataset(voc_data(tmp_path), "voc07_trainval")
    assert isinstance(dataset, PascalVOC2007) and dataset.class_names == VOC_CLASSES
    assert dataset.image_ids() == TREE_VOC07
    sample = dataset.load("000007")
    expected = np.asarray(Image.open(tmp_path / "VOCdevkit/VOC2007/JPEGImages/000007.jpg"))
    np.testing.assert_array_equal(sample.image, expected)
    assert sample.semantic is None and sample.instance_masks is None  # not in its seg. set
    assert dataset.relative_path("000007") == "VOCdevkit/VOC2007/JPEGImages/000007.jpg"
    with pytest.raises(KeyError, match="2008_000002"):
        dataset.load("2008_000002")  # a VOC2012 id


def test_voc07_segmented_image_has_class_map_and_instances(tmp_path: Path) -> None:
    write_voc_tree(tmp_path)
    voc07 = tmp_path / "VOCdevkit" / "VOC2007"
    image, semantic, objects = scene(10, (H, W))  # TREE_CLASSES[10 % 3]: a dog
    Image.fromarray(image).save(voc07 / "JPEGImages" / "000009.jpg", quality=95)
    write_png(voc07 / "SegmentationClass" / "000009.png", semantic)
    write_png(voc07 / "SegmentationObject" / "000009.png", objects)
    sample = build_dataset(voc_data(tmp_path), "voc07_trainval").load("000009")
    assert sample.semantic is not None and sample.instance_classes is not None
    np.testing.assert_array_equal(sample.semantic, semantic)
    assert sample.instance_classes.tolist() == [DOG]
    np.testing.assert_array_equal(sample.instance_masks, (objects == 1)[None])


def test_voc07_and_voc2012_ids_never_collide_in_one_training_set(tmp_path: Path) -> None:
    splits = write_voc_tree(tmp_path)
    voc12 = build_dataset(voc_data(tmp_path), "train_aug")
    voc07 = build_dataset(voc_data(tmp_path), "voc07_trainval")
    assert not set(voc12.image_ids()) & set(voc07.image_ids())
    both = SplitUnion({"train_aug": voc12, "voc07_trainval": voc07})
    assert both.image_ids() == splits["train_aug"] + TREE_VOC07
    assert [both.split_of(i) for i in ("2007_000032", "000005")] == ["train_aug", "voc07_trainval"]
    np.testing.assert_array_equal(both.load("000005").image, voc07.load("000005").image)
    assert both.relative_path("2007_000032") == "VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg"


def test_split_union_keeps_a_shared_image_once_and_refuses_ambiguous_ids(tmp_path: Path) -> None:
    write_voc_tree(tmp_path)
    data = voc_data(tmp_path)
    shared = SplitUnion({s: build_dataset(data, s) for s in ("train_aug", "trainval")})
    assert shared.image_ids() == sorted(TREE_TRAIN + TREE_AUG_ONLY) + TREE_VAL  # train once
    voc07 = tmp_path / "VOCdevkit" / "VOC2007"
    write_jpeg(voc07 / "JPEGImages" / "2008_000002.jpg", 3)  # a VOC2007 file with a VOC12 id
    write_list(voc07 / "ImageSets" / "Main" / "trainval.txt", [*TREE_VOC07, "2008_000002"])
    with pytest.raises(ValueError, match="2008_000002") as err:
        SplitUnion({s: build_dataset(data, s) for s in ("train_aug", "voc07_trainval")})
    message = str(err.value)
    assert "VOC2012/JPEGImages/2008_000002.jpg" in message
    assert "VOC2007/JPEGImages/2008_000002.jpg" in message


def test_voc07_missing_folder_or_list_says_what_was_searched(tmp_path: Path) -> None:
    write_voc_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="splits available: voc07_trainval"):
        build_dataset(voc_data(tmp_path), "voc07_test")  # no ImageSets/Main/test.txt
    voc12_only = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(voc_data(voc12_only), "voc07_trainval")  # root = the VOC2012 folder
    assert str(voc12_only / "VOCdevkit" / "VOC2007") in str(err.value)
    with pytest.raises(ValueError, match="voc07_trainval, voc07_test"):
        build_dataset(voc_data(tmp_path), "test")  # the unknown-split message names both years
