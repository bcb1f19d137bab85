import numpy as np
import pytest

from maskdistill.evaluation import InstanceSet, mask_ap


def _square(y: int, x: int, side: int, size: int = 20) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


def _set(
    image_id: str, masks: list[np.ndarray], classes: list[int], scores: list[float]
) -> InstanceSet:
    return InstanceSet(image_id, np.stack(masks), np.array(classes), np.array(scores))


TRUTH = [
    _set("a", [_square(0, 0, 10), _square(12, 12, 6)], [1, 2], [1.0, 1.0]),
    _set("b", [_square(5, 5, 8)], [2], [1.0]),
]


def test_perfect_predictions_score_one() -> None:
    for agnostic in (True, False):
        scores = mask_ap(TRUTH, TRUTH, class_agnostic=agnostic)
        assert scores == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})


def test_a_loose_mask_counts_at_iou_50_but_not_75() -> None:
    # IoU of a 10x10 square with its 10x8 part is 0.8 > 0.75; with a 10x6 part 0.6.
    loose = _square(0, 0, 10)
    loose[:, 6:] = False
    predictions = [_set("a", [loose], [1], [0.9])]
    truth = [_set("a", [_square(0, 0, 10)], [1], [1.0])]
    scores = mask_ap(truth, predictions, class_agnostic=True)
    assert scores["AP50"] == pytest.approx(1.0)
    assert scores["AP75"] == 0.0


def test_wrong_class_only_hurts_the_semantic_score() -> None:
    predictions = [_set("b", [_square(5, 5, 8)], [1], [0.9])]
    truth = [TRUTH[1]]
    assert mask_ap(truth, predictions, class_agnostic=True)["AP50"] == pytest.approx(1.0)
    assert mask_ap(truth, predictions, class_agnostic=False)["AP50"] == 0.0


def test_no_predictions_score_zero_and_unknown_images_are_errors() -> None:
    assert mask_ap(TRUTH, [], class_agnostic=True) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with pytest.raises(KeyError, match="'c'"):
        mask_ap(TRUTH, [_set("c", [_square(0, 0, 3)], [1], [0.5])], class_agnostic=True)


def test_confidence_order_matters() -> None:
    # One true object, two predictions: the wrong one ranked first halves the precision there.
    truth = [_set("a", [_square(0, 0, 10)], [1], [1.0])]
    good_first = [_set("a", [_square(0, 0, 10), _square(12, 12, 6)], [1, 1], [0.9, 0.1])]
    bad_first = [_set("a", [_square(0, 0, 10), _square(12, 12, 6)], [1, 1], [0.1, 0.9])]
    assert mask_ap(truth, good_first, class_agnostic=True)["AP50"] == pytest.approx(1.0)
    assert mask_ap(truth, bad_first, class_agnostic=True)["AP50"] == pytest.approx(0.5, abs=0.02)
