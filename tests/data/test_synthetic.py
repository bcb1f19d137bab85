"""Synthetic scenes: determinism, exact ground truth, fair class/colour/layout distributions."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import pytest

from maskdistill.data.base import Sample
from maskdistill.data.synthetic import CLASS_TABLE, SyntheticScenes

SWEEP = 300
SMALL = (96, 96)


@pytest.fixture(scope="module")
def sweep() -> list[Sample]:
    ds = SyntheticScenes(num_images=SWEEP, image_size=SMALL, seed=11)
    return [ds.load(i) for i in ds.image_ids()]


def truth(s: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """semantic, instance_masks, instance_classes, which synthetic samples always have."""
    assert s.semantic is not None and s.instance_masks is not None
    assert s.instance_classes is not None
    return s.semantic, s.instance_masks, s.instance_classes


def assert_same(a: Sample, b: Sample) -> None:
    for name in ("image", "semantic", "instance_masks", "instance_classes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def within_5_se(counts: np.ndarray, probs: np.ndarray) -> None:
    n = counts.sum()
    se = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) <= 5 * se), (counts, n * probs)


def test_same_seed_is_bit_identical_and_other_seed_differs() -> None:
    a, b = SyntheticScenes(seed=5), SyntheticScenes(seed=5)
    for image_id in a.image_ids()[:4]:
        assert_same(a.load(image_id), b.load(image_id))
    other = SyntheticScenes(seed=6)
    for image_id in a.image_ids()[:4]:
        assert not np.array_equal(a.load(image_id).image, other.load(image_id).image)


def test_an_index_generated_alone_equals_the_same_index_in_a_sweep() -> None:
    alone = SyntheticScenes(num_images=10, seed=2).load("train_000007")
    ds = SyntheticScenes(num_images=10, seed=2)
    swept = {image_id: ds.load(image_id) for image_id in reversed(ds.image_ids())}
    assert_same(alone, swept["train_000007"])


def test_train_and_val_are_different_streams() -> None:
    train, val = SyntheticScenes(split="train"), SyntheticScenes(split="val")
    assert val.image_ids()[0] == "val_000000"
    for i in range(4):
        t, v = train.load(f"train_{i:06d}"), val.load(f"val_{i:06d}")
        assert not np.array_equal(t.image, v.image)


def test_instances_agree_with_semantic_map(sweep: list[Sample]) -> None:
    for s in sweep[:60]:
        assert s.image.dtype == np.uint8 and s.image.shape == (*SMALL, 3)
        semantic, masks, classes = truth(s)
        assert semantic.dtype == np.uint8 and semantic.shape == SMALL
        assert masks.dtype == bool and classes.dtype == np.int64
        assert masks.sum(0).max() <= 1  # disjoint
        for mask, class_id in zip(masks, classes, strict=True):
            assert mask.any() and np.all(semantic[mask] == class_id)
        assert np.all(semantic[~masks.any(0)] == 0)


def test_every_instance_keeps_min_visible_of_its_in_image_area() -> None:
    ds = SyntheticScenes(
        num_images=40, image_size=SMALL, min_objects=3, max_objects=6, min_visible=0.5, seed=4
    )
    for image_id in ds.image_ids():
        scene = ds.scene(image_id)
        full = scene.full_masks
        above = np.cumsum(full[::-1], axis=0)[::-1]  # above[i]: union of objects i..N-1
        occluders = np.concatenate([above[1:], np.zeros_like(full[:1])]).astype(bool)
        np.testing.assert_array_equal(scene.visible_masks, full & ~occluders)
        assert np.all(full.any((1, 2)))
        assert np.all(scene.visible_fractions() >= 0.5), scene.visible_fractions()
        _, masks, classes = truth(ds.load(image_id))
        np.testing.assert_array_equal(masks, scene.visible_masks)
        assert classes.tolist() == [o.class_id for o in scene.objects]


def test_object_counts_are_uniform_in_range(sweep: list[Sample]) -> None:
    counts = np.array([len(truth(s)[2]) for s in sweep])
    assert counts.min() >= 1 and counts.max() <= 4
    within_5_se(np.bincount(counts - 1, minlength=4), np.full(4, 0.25))


def test_class_frequencies_are_uniform(sweep: list[Sample]) -> None:
    classes = np.concatenate([truth(s)[2] for s in sweep])
    assert classes.min() >= 1 and classes.max() <= 6
    within_5_se(np.bincount(classes - 1, minlength=6), np.full(6, 1 / 6))


def test_class_weights_skew_the_class_frequencies() -> None:
    weights = (8.0, 1.0, 1.0)
    ds = SyntheticScenes(num_images=150, image_size=(48, 48), num_classes=3, class_weights=weights)
    classes = np.concatenate([truth(ds.load(i))[2] for i in ds.image_ids()])
    within_5_se(np.bincount(classes - 1, minlength=3), np.array(weights) / sum(weights))


def test_colour_does_not_decide_class(sweep: list[Sample]) -> None:
    hues: dict[int, list[float]] = {c: [] for c in range(1, 7)}
    for s in sweep:
        _, masks, classes = truth(s)
        for mask, class_id in zip(masks, classes, strict=True):
            r, g, b = s.image[mask].mean(0) / 255
            hues[int(class_id)].append(colorsys.rgb_to_hsv(r, g, b)[0])
    for class_id, values in hues.items():
        ordered = np.sort(values)
        gaps = np.diff(np.concatenate([ordered, ordered[:1] + 1]))
        assert 1 - gaps.max() > 0.5, f"class {class_id} hues span only {1 - gaps.max():.2f}"


def test_brightness_does_not_separate_objects_from_background(sweep: list[Sample]) -> None:
    brighter = []
    for s in sweep:
        luma = s.image.astype(float) @ np.array([0.299, 0.587, 0.114])
        semantic, masks, _ = truth(s)
        background = luma[semantic == 0].mean()
        brighter += [luma[m].mean() > background for m in masks]
    assert 0.2 < np.mean(brighter) < 0.8


def test_non_square_image_size() -> None:
    s = SyntheticScenes(image_size=(96, 160)).load("train_000003")
    semantic, masks, _ = truth(s)
    assert s.image.shape == (96, 160, 3) and semantic.shape == (96, 160)
    assert masks.shape[1:] == (96, 160)


def test_ids_and_class_names() -> None:
    ds = SyntheticScenes(split="val", num_images=3, num_classes=len(CLASS_TABLE))
    assert ds.image_ids() == ["val_000000", "val_000001", "val_000002"]
    assert ds.class_names[:2] == ("disc-stripes", "square-checker")
    assert len(set(ds.class_names)) == len(CLASS_TABLE) >= 10
    assert len({shape for shape, _ in CLASS_TABLE}) == len({p for _, p in CLASS_TABLE}) == 10


@pytest.mark.parametrize("image_id", ["train_000003", "val_3", "val_000003x", "val_0000003", "x"])
def test_unknown_id_raises_key_error_naming_it(image_id: str) -> None:
    with pytest.raises(KeyError, match=image_id):
        SyntheticScenes(split="val", num_images=3).load(image_id)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"split": "holdout"}, "split"),
        ({"num_images": 0}, "num_images"),
        ({"image_size": (8, 64)}, "image_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": len(CLASS_TABLE) + 1}, "num_classes"),
        ({"min_objects": 0}, "min_objects"),
        ({"min_objects": 3, "max_objects": 2}, "max_objects"),
        ({"seed": -1}, "seed"),
        ({"scale_range": (0.5, 0.2)}, "scale_range"),
        ({"scale_range": (0.0, 0.2)}, "scale_range"),
        ({"min_visible": 1.5}, "min_visible"),
        ({"num_classes": 2, "class_weights": (1.0,)}, "class_weights"),
        ({"num_classes": 2, "class_weights": (1.0, 0.0)}, "class_weights"),
        ({"num_classes": 2, "class_weights": (1.0, float("nan"))}, "class_weights"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SyntheticScenes(**kwargs)


def test_impossible_layout_says_what_to_change() -> None:
    ds = SyntheticScenes(
        image_size=(16, 16), min_objects=10, max_objects=10, scale_range=(1.0, 1.0), min_visible=1.0
    )
    with pytest.raises(RuntimeError, match="min_visible"):
        ds.load("train_000000")


def test_the_test_split_is_held_out_from_train_and_val() -> None:
    images = {
        split: SyntheticScenes(split=split, num_images=2, image_size=(32, 32)).load(
            f"{split}_000000"
        )
        for split in ("train", "val", "test")
    }
    assert not np.array_equal(images["test"].image, images["train"].image)
    assert not np.array_equal(images["test"].image, images["val"].image)


def test_relative_path_names_a_png_per_split_and_id() -> None:
    ds = SyntheticScenes(split="val", num_images=3)
    assert ds.relative_path("val_000002") == "val/val_000002.png"
    with pytest.raises(KeyError, match="val_000003"):
        ds.relative_path("val_000003")
