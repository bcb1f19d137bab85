"""Mask AP with COCO crowd regions (A.4, Table 3 COCO20k): a detection on a crowd is ignored."""

import numpy as np
import pytest

from maskdistill.data.base import Sample
from maskdistill.evaluate import truth_instances
from maskdistill.evaluation import InstanceSet, instance_mask_ap, mask_ap


def _square(y: int, x: int, side: int, size: int = 20) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


OBJECT = _square(0, 0, 10)  # 100 px
CROWD = _square(10, 10, 10)  # 100 px, far from the object
ON_CROWD = _square(11, 11, 8)  # 64 px inside the crowd: IoU 0.64 as an object, 1.0 as a crowd


def _set(
    masks: list[np.ndarray],
    classes: list[int],
    scores: list[float],
    crowd: list[bool] | None = None,
) -> InstanceSet:
    flags = None if crowd is None else np.array(crowd)
    return InstanceSet.from_masks(
        "a", np.stack(masks), np.array(classes), np.array(scores, dtype=float), flags
    )


TRUTH = [_set([OBJECT, CROWD], [1, 1], [1.0, 1.0], [False, True])]
# The detection on the crowd ranks first (0.9), the perfect one on the object second (0.5).
DETECTIONS = [_set([ON_CROWD, OBJECT], [7, 7], [0.9, 0.5])]
# Crowd treated as a normal object: 2 objects. At IoU thresholds 0.50, 0.55, 0.60 both
# detections are hits (AP 1); at the 7 thresholds 0.65..0.95 the first is a false positive, so
# precision is 0 then 1/2 at recall 0 and 1/2; interpolated 1/2 at the 51 recall points 0..0.50
# of 101: 25.5/101. AP = (3 * 1 + 7 * 25.5 / 101) / 10 = 481.5 / 1010.
AS_OBJECT = {"AP": 481.5 / 1010, "AP50": 1.0, "AP75": 25.5 / 101}
# Crowd dropped from the truth (1 object): the first detection is a false positive at every
# threshold, the second a hit: precision 0 then 1/2 at recall 0 and 1, interpolated 1/2 at all.
AS_NOTHING = {"AP": 0.5, "AP50": 0.5, "AP75": 0.5}
PERFECT = {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}


def test_a_detection_on_a_crowd_is_ignored_neither_hit_nor_false_positive() -> None:
    # COCOeval's crowd IoU is overlap / detection area = 64 / 64: the detection matches the
    # crowd and is ignored, leaving the perfect detection alone: AP 1 at every threshold.
    ignored = mask_ap(TRUTH, DETECTIONS, class_agnostic=True)
    assert ignored == pytest.approx(PERFECT)
    without = mask_ap(TRUTH[:1], [_set([OBJECT], [7], [0.5])], class_agnostic=True)
    assert ignored == pytest.approx(without)
    as_object = [_set([OBJECT, CROWD], [1, 1], [1.0, 1.0])]
    assert mask_ap(as_object, DETECTIONS, class_agnostic=True) == pytest.approx(AS_OBJECT)
    only_object = [_set([OBJECT], [1], [1.0])]
    assert mask_ap(only_object, DETECTIONS, class_agnostic=True) == pytest.approx(AS_NOTHING)


def test_crowd_is_ignored_in_multi_class_agnostic_and_semantic() -> None:
    # Semantic: cluster 7 matches class 1 on the object alone; the crowd (class 1) then ignores
    # the cluster-7 detection on it, as the class-agnostic evaluation does.
    for agnostic in (True, False):
        scores = instance_mask_ap(TRUTH, DETECTIONS, setting="multi", class_agnostic=agnostic)
        assert scores == pytest.approx(PERFECT)


def test_a_crowd_of_another_class_ignores_nothing_semantically() -> None:
    # COCOeval evaluates per category: a class-1 detection on a class-2 crowd is a false
    # positive of class 1 (ranked first), as if the crowd were absent; class-agnostic, ignored.
    truth = [_set([OBJECT, CROWD], [1, 2], [1.0, 1.0], [False, True])]
    semantic = instance_mask_ap(truth, DETECTIONS, setting="multi", class_agnostic=False)
    assert semantic == pytest.approx(AS_NOTHING)
    agnostic = instance_mask_ap(truth, DETECTIONS, setting="multi", class_agnostic=True)
    assert agnostic == pytest.approx(PERFECT)


def test_single_never_picks_a_crowd_as_the_object() -> None:
    # Single keeps the top detection (on the crowd) and the object with the largest box IoU
    # among non-crowd ones: the far object, missed; the crowd stays and the detection on it is
    # ignored: no hit, AP 0. Had the crowd been the picked object, IoU 0.64 would give AP50 1.
    scores = instance_mask_ap(TRUTH, DETECTIONS, setting="single", class_agnostic=True)
    assert scores == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    flipped = [_set([ON_CROWD, OBJECT], [7, 7], [0.5, 0.9])]
    best = instance_mask_ap(TRUTH, flipped, setting="single", class_agnostic=True)
    assert best == pytest.approx(PERFECT)


def test_unmatched_cluster_on_a_crowd_of_its_class_is_ignored() -> None:
    # Two clusters, one class: 7 covers the object (matched), 3 only the crowd (unmatched, its
    # class by most overlap: 1). Its mask moves to a companion image that keeps the crowd, so
    # it is ignored there instead of counting as a false positive.
    predictions = [_set([ON_CROWD, OBJECT], [3, 7], [0.9, 0.5])]
    scores = instance_mask_ap(TRUTH, predictions, setting="multi", class_agnostic=False)
    assert scores == pytest.approx(PERFECT)
    as_object = [_set([OBJECT, _square(15, 0, 5)], [1, 1], [1.0, 1.0], [False, True])]
    missed = instance_mask_ap(as_object, predictions, setting="multi", class_agnostic=False)
    assert missed == pytest.approx(AS_NOTHING)  # a crowd elsewhere ignores nothing


def test_predictions_cannot_be_crowd_and_flags_must_match() -> None:
    with pytest.raises(ValueError, match="predictions for 'a' are marked crowd"):
        instance_mask_ap(TRUTH, TRUTH, setting="multi", class_agnostic=True)
    with pytest.raises(ValueError, match="'a': 1 masks, 2 crowd flags"):
        _set([OBJECT], [1], [1.0], [False, True])


def test_truth_instances_append_the_crowd_regions_flagged() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    sample = Sample(
        "a", image, None, OBJECT[None], np.array([4]), CROWD[None], np.array([2], np.int64)
    )
    instances = truth_instances(sample)
    assert instances.classes.tolist() == [4, 2] and instances.crowd.tolist() == [False, True]
    np.testing.assert_array_equal(instances.masks(), np.stack([OBJECT, CROWD]))
    plain = truth_instances(Sample("b", image, None, OBJECT[None], np.array([4])))
    assert plain.crowd.tolist() == [False] and plain.scores.tolist() == [1.0]
