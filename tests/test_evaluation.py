import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskdistill.evaluation import (
    InstanceSet,
    ObjectSetting,
    _cluster_class_overlap,
    _grid_origin,
    confusion_matrix,
    confusion_picture,
    instance_mask_ap,
    mask_ap,
    per_class_table,
    remap_confusion,
    segmentation_scores,
)
from maskdistill.masks import encode_rle


def _square(y: int, x: int, side: int, size: int = 20) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


def _set(
    image_id: str, masks: list[np.ndarray], classes: list[int], scores: list[float]
) -> InstanceSet:
    return InstanceSet.from_masks(image_id, np.stack(masks), np.array(classes), np.array(scores))


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


def test_confusion_matrix_golden_with_ignore_pixels() -> None:
    truth = np.array([[0, 1, 255, 2], [1, 1, 0, 255], [2, 2, 0, 1]])
    predicted = np.array([[1, 1, 0, 0], [0, 1, 1, 2], [2, 2, 1, 0]])
    # Kept (p, g) pairs: (1,0) (1,1) (0,2) | (0,1) (1,1) (1,0) | (2,2) (2,2) (1,0) (0,1).
    expected = np.array([[0, 2, 1], [3, 2, 0], [0, 0, 2]])
    confusion = confusion_matrix(predicted, truth, num_predicted=3, num_classes=3)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, expected)


def test_confusion_matrix_errors_name_the_value() -> None:
    truth = np.array([[0, 1], [2, 255]])
    with pytest.raises(ValueError, match="predicted value 3"):
        confusion_matrix(np.array([[0, 3], [1, 0]]), truth, num_predicted=3, num_classes=3)
    with pytest.raises(ValueError, match="truth value 7"):
        confusion_matrix(
            np.zeros((2, 2), int), np.array([[7, 0], [0, 0]]), num_predicted=1, num_classes=3
        )
    with pytest.raises(ValueError, match="predicted value -1"):
        confusion_matrix(np.full((2, 2), -1), truth, num_predicted=3, num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), truth, num_predicted=3, num_classes=3)


def test_permuted_perfect_prediction_scores_one() -> None:
    truth = np.random.default_rng(0).integers(0, 4, size=(16, 16))
    permutation = np.array([2, 0, 3, 1])
    confusion = confusion_matrix(permutation[truth], truth, num_predicted=4, num_classes=4)
    scores = segmentation_scores(confusion)
    assert scores["miou"] == pytest.approx(1.0)
    np.testing.assert_allclose(scores["iou"], 1.0)
    np.testing.assert_array_equal(scores["mapping"], np.argsort(permutation))


# Rows: predictions 0..2, columns: classes 0..2.
KNOWN = np.array([[0, 8, 2], [10, 1, 0], [1, 1, 5]])


def test_known_confusion_hand_computed_miou() -> None:
    # Hungarian: p1->0 (10), p0->1 (8), p2->2 (5) = 23 matched, the maximum.
    # Truth pixels per class: 11, 10, 7; predicted per class: 11, 10, 7.
    # IoU = TP / (pred + truth - TP): 10/12, 8/12, 5/9; mIoU = (15/18 + 12/18 + 10/18) / 3 = 37/54.
    scores = segmentation_scores(KNOWN)
    np.testing.assert_array_equal(scores["mapping"], [1, 0, 2])
    np.testing.assert_allclose(scores["iou"], [10 / 12, 8 / 12, 5 / 9])
    assert scores["miou"] == pytest.approx(37 / 54)


# Six clusters onto three classes: two clusters per class.
OVERCLUSTERED = np.array([[9, 1, 0], [5, 0, 1], [0, 8, 0], [1, 4, 1], [0, 0, 7], [0, 2, 3]])


def test_majority_vote_merges_clusters() -> None:
    # Majority: p0,p1->0, p2,p3->1, p4,p5->2. Truth per class 15, 15, 12; predicted 16, 14, 12;
    # TP 14, 12, 10. IoU 14/17, 12/17, 10/14; mIoU = (26/17 + 5/7) / 3 = 267/357 = 89/119.
    scores = segmentation_scores(OVERCLUSTERED, matching="majority")
    np.testing.assert_array_equal(scores["mapping"], [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(scores["iou"], [14 / 17, 12 / 17, 10 / 14])
    assert scores["miou"] == pytest.approx(89 / 119)


def test_hungarian_on_overclustering_leaves_clusters_unmapped() -> None:
    # Hungarian: p0->0 (9), p2->1 (8), p4->2 (7); p1, p3, p5 map to nothing and count as misses.
    # IoU 9/(10+15-9) = 9/16, 8/15, 7/12.
    scores = segmentation_scores(OVERCLUSTERED, matching="hungarian")
    np.testing.assert_array_equal(scores["mapping"], [0, -1, 1, -1, 2, -1])
    np.testing.assert_allclose(scores["iou"], [9 / 16, 8 / 15, 7 / 12])
    assert scores["miou"] == pytest.approx((9 / 16 + 8 / 15 + 7 / 12) / 3)
    assert scores["miou"] < segmentation_scores(OVERCLUSTERED, matching="majority")["miou"]


def test_class_never_predicted_scores_zero_and_counts() -> None:
    # Two predictions, three classes: class 2 gets no cluster. IoU 5/7, 4/7, 0; mIoU 9/21.
    confusion = np.array([[5, 0, 2], [0, 4, 3]])
    scores = segmentation_scores(confusion)
    np.testing.assert_array_equal(scores["mapping"], [0, 1])
    np.testing.assert_allclose(scores["iou"], [5 / 7, 4 / 7, 0.0])
    assert scores["miou"] == pytest.approx(3 / 7)


def test_class_absent_everywhere_is_nan_and_excluded() -> None:
    # Class 2 has no truth pixels and no predictions. IoU 4/5, 5/6; mIoU (4/5 + 5/6) / 2 = 49/60.
    confusion = np.array([[4, 1, 0], [0, 5, 0], [0, 0, 0]])
    scores = segmentation_scores(confusion)
    assert np.isnan(scores["iou"][2])
    np.testing.assert_allclose(scores["iou"][:2], [4 / 5, 5 / 6])
    assert scores["miou"] == pytest.approx(49 / 60)


def test_bad_matching_names_allowed_values() -> None:
    with pytest.raises(ValueError, match="'greedy'.*hungarian.*majority"):
        segmentation_scores(KNOWN, matching="greedy")


def test_remap_confusion_sums_rows_into_classes() -> None:
    mapping = np.array([0, 0, 1, 1, 2, 2])
    expected = np.array([[14, 1, 1], [1, 12, 1], [0, 2, 10]])
    np.testing.assert_array_equal(remap_confusion(OVERCLUSTERED, mapping), expected)


def test_per_class_table_has_names_and_percentages() -> None:
    scores = segmentation_scores(KNOWN)
    table = per_class_table(scores, ["background", "aero", "bike"])
    lines = table.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    values = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert header == ["", "background", "aero", "bike", "mIoU"]
    # 10/12 = 83.33 %, 8/12 = 66.67 %, 5/9 = 55.56 %, 37/54 = 68.52 %.
    assert values == ["IoU (%)", "83.3", "66.7", "55.6", "68.5"]
    assert set(lines[1].replace("|", "").split()) <= {"-" * n + ":" for n in range(1, 20)}
    with pytest.raises(ValueError, match="2 class names for 3"):
        per_class_table(scores, ["a", "b"])


def test_per_class_table_marks_absent_classes() -> None:
    scores = segmentation_scores(np.array([[4, 1, 0], [0, 5, 0], [0, 0, 0]]))
    values = [
        c.strip() for c in per_class_table(scores, ["a", "b", "c"]).splitlines()[2].split("|")
    ]
    assert values[1:-1] == ["IoU (%)", "80.0", "83.3", "-", "81.7"]


def test_confusion_picture_diagonal_is_hot() -> None:
    names = ["background", "aeroplane", "bike"]
    picture = confusion_picture(np.diag([50, 30, 20]), names)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert min(picture.shape[:2]) >= 200
    top, left = _grid_origin(names)
    assert top + 3 * 24 <= picture.shape[0] and left + 3 * 24 <= picture.shape[1]
    brightness = [
        [picture[top + 24 * r + 12, left + 24 * c + 12].astype(int).sum() for c in range(3)]
        for r in range(3)
    ]
    diagonal = min(brightness[i][i] for i in range(3))
    off_diagonal = max(brightness[r][c] for r in range(3) for c in range(3) if r != c)
    assert diagonal > off_diagonal + 200


def test_confusion_picture_normalises_truth_rows() -> None:
    # remapped[c, g]: truth class 0 (100 pixels) is all predicted 1, truth class 1 (1000 pixels)
    # too; normalised per truth row, both cells in column 1 are equally hot (fraction 1).
    remapped = np.array([[0, 0], [100, 1000]])
    names = ["a", "b"]
    picture = confusion_picture(remapped, names).astype(int)
    top, left = _grid_origin(names)
    row0 = [picture[top + 12, left + 24 * c + 12].sum() for c in range(2)]
    row1_diag = picture[top + 36, left + 36].sum()
    assert row0[1] > row0[0] + 200
    assert row1_diag == row0[1]
    with pytest.raises(ValueError, match="classes squared"):
        confusion_picture(remapped, ["a", "b", "c"])


def test_identity_matching_keeps_class_ids() -> None:
    # Hungarian would swap the two predictions; identity scores them as they are.
    # IoU 1 / (6 + 7 - 1) = 1/12 and 2 / (8 + 7 - 2) = 2/13.
    confusion = np.array([[1, 5], [6, 2]])
    scores = segmentation_scores(confusion, matching="identity")
    np.testing.assert_array_equal(scores["mapping"], [0, 1])
    np.testing.assert_allclose(scores["iou"], [1 / 12, 2 / 13])
    assert scores["miou"] == pytest.approx((1 / 12 + 2 / 13) / 2)
    assert segmentation_scores(confusion)["miou"] > scores["miou"]
    with pytest.raises(ValueError, match=r"identity.*square.*\(3, 2\)"):
        segmentation_scores(np.ones((3, 2), int), matching="identity")


def _coco_direct(
    truth: list[InstanceSet], predictions: list[InstanceSet], *, agnostic: bool
) -> list[float]:
    """AP, AP50, AP75 from pycocotools on hand-built COCO dicts (the reference)."""
    ids = {t.image_id: n for n, t in enumerate(truth, start=1)}

    def encoded(mask: np.ndarray) -> dict:
        return coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))

    annotations, results = [], []
    for t in truth:
        for mask, cls in zip(t.masks(), t.classes, strict=True):
            rle = encoded(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": ids[t.image_id],
                    "category_id": 1 if agnostic else int(cls),
                    "segmentation": rle,
                    "area": float(mask.sum()),
                    "bbox": coco_mask.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    for p in predictions:
        for mask, cls, score in zip(p.masks(), p.classes, p.scores, strict=True):
            results.append(
                {
                    "image_id": ids[p.image_id],
                    "category_id": 1 if agnostic else int(cls),
                    "segmentation": encoded(mask),
                    "score": float(score),
                }
            )
    categories = {a["category_id"] for a in annotations} | {r["category_id"] for r in results}
    ground = COCO()
    ground.dataset = {
        "images": [{"id": n, "height": 20, "width": 20} for n in ids.values()],
        "annotations": annotations,
        "categories": [{"id": c} for c in sorted(categories)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground.createIndex()
        evaluator = COCOeval(ground, ground.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:3]]


# Three images, classes 1 and 2; predictions shifted by 0..3 pixels, one false positive, one
# object missed, scores out of order, classes as clusters 7 (for 1) and 4 (for 2).
AP_TRUTH = [
    _set("a", [_square(0, 0, 10), _square(12, 12, 6)], [1, 2], [1.0, 1.0]),
    _set("b", [_square(5, 5, 8), _square(0, 14, 5)], [2, 1], [1.0, 1.0]),
    _set("c", [_square(2, 2, 12)], [1], [1.0]),
]
AP_PREDICTIONS = [
    _set("a", [_square(1, 0, 10), _square(12, 13, 6)], [1, 2], [0.9, 0.4]),
    _set("b", [_square(6, 6, 8), _square(0, 0, 4)], [2, 2], [0.8, 0.7]),
    _set("c", [_square(5, 3, 12)], [1], [0.6]),
]
CLUSTERS = {1: 7, 2: 4}


def _as_clusters(sets: list[InstanceSet]) -> list[InstanceSet]:
    return [
        InstanceSet(
            s.image_id, s.size, s.rles, np.array([CLUSTERS[c] for c in s.classes]), s.scores
        )
        for s in sets
    ]


def test_multi_agrees_with_pycocotools_called_directly() -> None:
    for agnostic in (True, False):
        expected = _coco_direct(AP_TRUTH, AP_PREDICTIONS, agnostic=agnostic)
        # Semantic: cluster ids 7 and 4 must be matched back to classes 1 and 2 first.
        predictions = AP_PREDICTIONS if agnostic else _as_clusters(AP_PREDICTIONS)
        scores = instance_mask_ap(AP_TRUTH, predictions, setting="multi", class_agnostic=agnostic)
        assert [scores["AP"], scores["AP50"], scores["AP75"]] == pytest.approx(expected)
        assert 0.0 < scores["AP75"] < scores["AP50"] < 1.0


def test_single_agrees_with_pycocotools_on_the_selected_pairs() -> None:
    # Top predictions: a's first (0.9), b's first (0.8), c's only; the objects with the largest
    # box IoU with them: a's class-1 square, b's class-2 square, c's square.
    truth = [
        _set("a", [_square(0, 0, 10)], [1], [1.0]),
        _set("b", [_square(5, 5, 8)], [2], [1.0]),
        AP_TRUTH[2],
    ]
    predictions = [
        _set("a", [_square(1, 0, 10)], [1], [0.9]),
        _set("b", [_square(6, 6, 8)], [2], [0.8]),
        AP_PREDICTIONS[2],
    ]
    for agnostic in (True, False):
        expected = _coco_direct(truth, predictions, agnostic=agnostic)
        scores = instance_mask_ap(
            AP_TRUTH, _as_clusters(AP_PREDICTIONS), setting="single", class_agnostic=agnostic
        )
        assert [scores["AP"], scores["AP50"], scores["AP75"]] == pytest.approx(expected)


def test_single_forgives_missed_objects_that_multi_counts() -> None:
    # One object of two found: multi recall 1/2, so AP50 = 51/101 (101-point interpolation).
    truth = [_set("a", [_square(0, 0, 8), _square(10, 10, 8)], [1, 1], [1.0, 1.0])]
    predictions = [_set("a", [_square(10, 10, 8)], [1], [0.9])]
    multi = instance_mask_ap(truth, predictions, setting="multi", class_agnostic=True)
    single = instance_mask_ap(truth, predictions, setting="single", class_agnostic=True)
    assert multi["AP50"] == pytest.approx(51 / 101)
    # The second object has the largest box IoU with the prediction, so single scores 1.
    assert single == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})


def test_single_keeps_only_the_most_confident_prediction() -> None:
    # A confident miss ranked above the hit: multi AP50 = 1/2, single keeps only the miss.
    truth = [_set("a", [_square(0, 0, 10)], [1], [1.0])]
    predictions = [_set("a", [_square(12, 12, 6), _square(0, 0, 10)], [1, 1], [0.9, 0.5])]
    multi = instance_mask_ap(truth, predictions, setting="multi", class_agnostic=True)
    single = instance_mask_ap(truth, predictions, setting="single", class_agnostic=True)
    assert multi["AP50"] == pytest.approx(0.5)
    assert single["AP50"] == 0.0


def test_single_counts_an_image_without_predictions_as_a_miss() -> None:
    truth = [_set("a", [_square(0, 0, 10)], [1], [1.0]), _set("b", [_square(5, 5, 8)], [1], [1.0])]
    predictions = [_set("a", [_square(0, 0, 10)], [1], [0.9])]
    single = instance_mask_ap(truth, predictions, setting="single", class_agnostic=True)
    assert single["AP50"] == pytest.approx(51 / 101)


def test_permuted_cluster_perfect_prediction_scores_one_semantically() -> None:
    clustered = _as_clusters(AP_TRUTH)
    for setting in ("single", "multi"):
        scores = instance_mask_ap(AP_TRUTH, clustered, setting=setting, class_agnostic=False)
        assert scores == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    # Without the matching, cluster ids are wrong classes.
    assert mask_ap(AP_TRUTH, clustered, class_agnostic=False)["AP50"] == 0.0


def test_unmatched_cluster_counts_as_false_positives() -> None:
    # One class, two clusters: 5 covers both objects (matched), 9 only b's. 9's perfect but
    # unmatched mask is a false positive ranked first: precision 1/2 then 2/3 at recall 1/2 and 1,
    # so AP50 = 2/3. Dropped, it would leave 1.0; matched by majority, also 1.0.
    truth = [_set("a", [_square(0, 0, 10)], [1], [1.0]), _set("b", [_square(5, 5, 8)], [1], [1.0])]
    predictions = [
        _set("a", [_square(0, 0, 10)], [5], [0.5]),
        _set("b", [_square(5, 5, 8), _square(5, 5, 8)], [9, 5], [0.9, 0.4]),
    ]
    scores = instance_mask_ap(truth, predictions, setting="multi", class_agnostic=False)
    assert scores["AP50"] == pytest.approx(2 / 3)
    assert scores["AP"] == pytest.approx(2 / 3)
    agnostic = instance_mask_ap(truth, predictions, setting="multi", class_agnostic=True)
    assert agnostic["AP50"] == pytest.approx(1.0)


def test_instance_mask_ap_errors() -> None:
    with pytest.raises(ValueError, match="'both'.*single.*multi"):
        instance_mask_ap(TRUTH, TRUTH, setting="both", class_agnostic=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ground truth lists image 'a' twice"):
        instance_mask_ap([TRUTH[0], TRUTH[0]], [], setting="multi", class_agnostic=True)
    with pytest.raises(ValueError, match="predictions list image 'b' twice"):
        instance_mask_ap(TRUTH, [TRUTH[1], TRUTH[1]], setting="multi", class_agnostic=True)
    with pytest.raises(KeyError, match="'z'"):
        instance_mask_ap(
            TRUTH,
            [_set("z", [_square(0, 0, 3)], [1], [0.5])],
            setting="single",
            class_agnostic=True,
        )


def test_from_masks_round_trips_through_rles() -> None:
    masks = np.random.default_rng(1).random((3, 7, 9)) < 0.4
    masks[2] = False
    instances = InstanceSet.from_masks("a", masks, np.array([1, 2, 3]), np.ones(3))
    assert instances.size == (7, 9) and len(instances.rles) == 3
    assert all(isinstance(rle["counts"], bytes) for rle in instances.rles)
    decoded = instances.masks()
    assert decoded.dtype == bool and decoded.shape == (3, 7, 9)
    np.testing.assert_array_equal(decoded, masks)
    empty = InstanceSet.from_masks("b", np.zeros((0, 4, 5), bool), np.zeros(0), np.zeros(0))
    assert empty.size == (4, 5) and empty.rles == []
    assert empty.masks().shape == (0, 4, 5) and empty.masks().dtype == bool


def _random_case(seed: int) -> tuple[list[InstanceSet], list[InstanceSet], list[InstanceSet]]:
    """Three 12x16 images, three rectangles each; predictions: the objects plus a duplicate of
    the first, with 15 % of pixels flipped, random clusters 0..3 and scores. Returns the truth,
    the predictions from dense masks and the same predictions from text RLEs (as in the rows)."""
    rng = np.random.default_rng(seed)
    truth, dense, rows = [], [], []
    for image in "abc":
        masks = np.zeros((3, 12, 16), dtype=bool)
        for mask, (y, x, h, w) in zip(masks, rng.integers(0, 8, size=(3, 4)), strict=True):
            mask[y : y + 4 + h, x : x + 4 + w] = True
        truth.append(InstanceSet.from_masks(image, masks, rng.integers(1, 4, 3), np.ones(3)))
        noisy = np.concatenate([masks, masks[:1]]) ^ (rng.random((4, 12, 16)) < 0.15)
        clusters, scores = rng.integers(0, 4, 4), rng.random(4)
        dense.append(InstanceSet.from_masks(image, noisy, clusters, scores))
        text = [{"size": [12, 16], "counts": encode_rle(m)["counts"]} for m in noisy]
        rows.append(InstanceSet(image, (12, 16), text, clusters, scores))
    return truth, dense, rows


# instance_mask_ap of _random_case(0) by the dense-mask implementation this one replaced:
# [AP, AP50, AP75] per (setting, class_agnostic).
RANDOM_CASE_AP: dict[tuple[ObjectSetting, bool], list[float]] = {
    ("single", True): [0.2105610561, 0.4422442244, 0.1122112211],
    ("single", False): [0.2378712871, 0.5, 0.1262376238],
    ("multi", True): [0.2203300330, 0.6270627063, 0.1029702970],
    ("multi", False): [0.2896039604, 0.6188118812, 0.1633663366],
}


def test_text_rles_from_rows_score_as_dense_masks_in_every_setting() -> None:
    truth, dense, rows = _random_case(0)
    assert all(isinstance(r["counts"], str) for r in (encode_rle(m) for m in dense[0].masks()))
    for from_dense, from_rows in zip(dense, rows, strict=True):
        assert from_rows.rles == from_dense.rles
    for (setting, agnostic), expected in RANDOM_CASE_AP.items():
        for predictions in (dense, rows):
            scores = instance_mask_ap(truth, predictions, setting=setting, class_agnostic=agnostic)
            assert [scores["AP"], scores["AP50"], scores["AP75"]] == pytest.approx(expected)


def test_cluster_class_overlap_counts_the_pixels_of_the_unions() -> None:
    # Per image: union of a cluster's masks against union of a class's masks, pixels summed.
    truth, _, predictions = _random_case(0)
    clusters, classes, overlap = _cluster_class_overlap(truth, predictions)
    expected = np.zeros((len(clusters), len(classes)))
    for t, p in zip(truth, predictions, strict=True):
        for row, cluster in enumerate(clusters):
            predicted = p.masks()[p.classes == cluster].any(axis=0)
            for column, cls in enumerate(classes):
                expected[row, column] += (predicted & t.masks()[t.classes == cls].any(axis=0)).sum()
    np.testing.assert_array_equal(overlap, expected)
    assert expected.sum() > 0


def test_instance_set_errors_name_the_image() -> None:
    rle = encode_rle(_square(0, 0, 3))
    with pytest.raises(ValueError, match="'x': 1 masks, 2 classes and 1 scores"):
        InstanceSet("x", (20, 20), [rle], np.array([1, 2]), np.ones(1))
    with pytest.raises(ValueError, match="'x' is 10x20, an RLE is \\[20, 20\\]"):
        InstanceSet("x", (10, 20), [rle], np.array([1]), np.ones(1))
    with pytest.raises(ValueError, match="masks must be \\[M, H, W\\]"):
        InstanceSet.from_masks("x", _square(0, 0, 3), np.array([1]), np.ones(1))
    small = _set("a", [np.ones((10, 20), bool)], [1], [0.5])
    with pytest.raises(ValueError, match="'a' are \\(10, 20\\), its ground truth \\(20, 20\\)"):
        instance_mask_ap(TRUTH, [small], setting="multi", class_agnostic=True)
