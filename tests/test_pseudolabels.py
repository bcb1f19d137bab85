import io

import numpy as np
import pytest
from PIL import Image

from maskdistill.pseudolabels import (
    PseudoLabel,
    confident_masks,
    decode_label_map,
    encode_label_map,
    pseudo_label,
    semantic_map,
)

SHAPE = (4, 5)


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """A bool 4x5 mask, True on rows top..bottom-1 and columns left..right-1."""
    mask = np.zeros(SHAPE, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def candidates(*items: tuple[np.ndarray, float, int]) -> tuple[np.ndarray, ...]:
    """(masks [M, 4, 5], scores [M], classes [M]) of (mask, score, class) triples."""
    if not items:
        return np.zeros((0, *SHAPE), bool), np.zeros(0), np.zeros(0, np.int64)
    masks, scores, classes = zip(*items, strict=True)
    return np.stack(masks), np.array(scores), np.array(classes)


def reference_map(
    masks: np.ndarray, scores: np.ndarray, classes: np.ndarray, tau: float
) -> np.ndarray:
    """Per-pixel loop: 1 + class of the most confident accepted mask covering it, else 0."""
    accepted = [i for i in range(len(scores)) if scores[i] > tau]
    if not accepted and len(scores):
        accepted = [int(np.argmax(scores))]
    expected = np.zeros(masks.shape[1:], dtype=np.int64)
    for y in range(masks.shape[1]):
        for x in range(masks.shape[2]):
            best = None
            for i in accepted:
                if masks[i, y, x] and (best is None or scores[i] > scores[best]):
                    best = i
            if best is not None:
                expected[y, x] = 1 + classes[best]
    return expected


# --- confident_masks --------------------------------------------------------------------------


def test_confident_masks_sorted_by_descending_score_ties_stable() -> None:
    scores = np.array([0.91, 0.99, 0.95, 0.99, 0.3])
    kept = confident_masks(scores)
    assert kept.dtype == np.int64
    np.testing.assert_array_equal(kept, [1, 3, 2, 0])


def test_confident_masks_ties_stay_stable_beyond_small_sort_sizes() -> None:
    scores = np.tile([0.95, 0.99, 0.5], 40)  # 120 candidates: many ties, past insertion sort
    indices = np.arange(120)
    expected = np.concatenate([indices[1::3], indices[0::3]])
    np.testing.assert_array_equal(confident_masks(scores), expected)


def test_confident_masks_tau_is_strict() -> None:
    np.testing.assert_array_equal(confident_masks(np.array([0.9, 0.9 + 1e-6])), [1])
    np.testing.assert_array_equal(confident_masks(np.array([0.5, 0.7]), tau=0.5), [1])


def test_confident_masks_falls_back_to_the_best() -> None:
    scores = np.array([0.5, 0.9, 0.8])
    np.testing.assert_array_equal(confident_masks(scores), [1])
    none = confident_masks(scores, keep_best_when_none=False)
    assert none.dtype == np.int64
    assert none.shape == (0,)


def test_confident_masks_fallback_ties_take_the_lower_index() -> None:
    np.testing.assert_array_equal(confident_masks(np.array([0.2, 0.6, 0.6])), [1])


def test_confident_masks_without_candidates() -> None:
    kept = confident_masks(np.zeros(0))
    assert kept.dtype == np.int64
    assert kept.shape == (0,)


@pytest.mark.parametrize("tau", [-0.1, 1.0, 1.5, float("nan")])
def test_confident_masks_rejects_tau_outside_unit_interval(tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        confident_masks(np.array([0.95]), tau=tau)


def test_confident_masks_rejects_bad_scores() -> None:
    with pytest.raises(ValueError, match=r"scores must have shape \[M\]"):
        confident_masks(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        confident_masks(np.array([0.95, np.nan]))


# --- semantic_map -----------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
def test_overlap_goes_to_the_most_confident(reverse: bool) -> None:
    items = [(box(0, 0, 3, 3), 0.95, 3), (box(1, 2, 4, 5), 0.97, 1)]
    masks, scores, classes = candidates(*(items[::-1] if reverse else items))
    expected = np.array(
        [
            [4, 4, 4, 0, 0],
            [4, 4, 2, 2, 2],
            [4, 4, 2, 2, 2],
            [0, 0, 2, 2, 2],
        ]
    )
    label_map = semantic_map(masks, scores, classes)
    assert label_map.dtype == np.int64
    np.testing.assert_array_equal(label_map, expected)


def test_fallback_paints_only_the_best_candidate() -> None:
    masks, scores, classes = candidates(
        (box(0, 0, 2, 2), 0.5, 0), (box(2, 3, 4, 5), 0.9, 2), (box(0, 3, 2, 5), 0.8, 1)
    )
    expected = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 3, 3],
            [0, 0, 0, 3, 3],
        ]
    )
    np.testing.assert_array_equal(semantic_map(masks, scores, classes), expected)


def test_without_fallback_nothing_is_painted() -> None:
    masks, scores, classes = candidates((box(0, 0, 2, 2), 0.5, 0), (box(2, 3, 4, 5), 0.9, 2))
    label = pseudo_label(masks, scores, classes, keep_best_when_none=False)
    np.testing.assert_array_equal(label.label_map, np.zeros(SHAPE, np.int64))
    assert label.kept == 0
    assert label.best_score == 0.9


def test_score_equal_to_tau_is_rejected_just_above_is_accepted() -> None:
    masks, scores, classes = candidates((box(0, 0, 4, 2), 0.9, 0), (box(0, 3, 4, 5), 0.9 + 1e-6, 1))
    expected = np.array([[0, 0, 0, 2, 2]] * 4)
    np.testing.assert_array_equal(semantic_map(masks, scores, classes), expected)


def test_class_zero_becomes_label_one_and_uncovered_pixels_are_background() -> None:
    masks, scores, classes = candidates((box(1, 1, 3, 4), 0.95, 0))
    expected = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(semantic_map(masks, scores, classes), expected)


def test_rejected_candidate_does_not_touch_the_map() -> None:
    accepted = (box(0, 0, 2, 3), 0.95, 0)
    rejected = (box(1, 1, 4, 5), 0.5, 5)
    alone = semantic_map(*candidates(accepted))
    with_rejected = semantic_map(*candidates(rejected, accepted))
    np.testing.assert_array_equal(with_rejected, alone)
    np.testing.assert_array_equal(alone, np.array([[1, 1, 1, 0, 0]] * 2 + [[0] * 5] * 2))


def test_no_candidates_gives_an_all_background_map_of_the_mask_shape() -> None:
    label_map = semantic_map(*candidates())
    assert label_map.dtype == np.int64
    np.testing.assert_array_equal(label_map, np.zeros(SHAPE, np.int64))


def test_labels_beyond_255_are_kept_exactly() -> None:
    masks, scores, classes = candidates((box(0, 0, 4, 1), 0.95, 254), (box(0, 1, 4, 2), 0.96, 999))
    np.testing.assert_array_equal(semantic_map(masks, scores, classes)[0], [255, 1000, 0, 0, 0])


def test_pseudo_label_reports_kept_and_best_score() -> None:
    masks, scores, classes = candidates(
        (box(0, 0, 1, 1), 0.95, 0), (box(1, 1, 2, 2), 0.99, 1), (box(2, 2, 3, 3), 0.4, 2)
    )
    label = pseudo_label(masks, scores, classes)
    assert isinstance(label, PseudoLabel)
    assert label.kept == 2
    assert label.best_score == 0.99
    np.testing.assert_array_equal(label.label_map, semantic_map(masks, scores, classes))
    empty = pseudo_label(*candidates())
    assert empty.kept == 0
    assert np.isnan(empty.best_score)


def test_semantic_map_rejects_invalid_inputs() -> None:
    masks, scores, classes = candidates((box(0, 0, 1, 1), 0.95, 0), (box(1, 1, 2, 2), 0.99, 1))
    with pytest.raises(ValueError, match=r"masks must have shape \[M, H, W\]"):
        semantic_map(masks[0], scores, classes)
    with pytest.raises(ValueError, match="masks must be bool"):
        semantic_map(masks.astype(np.float32), scores, classes)
    with pytest.raises(ValueError, match="2 masks, 3 scores, 2 classes"):
        semantic_map(masks, np.append(scores, 0.5), classes)
    with pytest.raises(ValueError, match="2 masks, 2 scores, 1 classes"):
        semantic_map(masks, scores, classes[:1])
    with pytest.raises(ValueError, match=r"classes must have shape \[M\]"):
        semantic_map(masks, scores, classes[:, None])
    with pytest.raises(ValueError, match="classes must be integer"):
        semantic_map(masks, scores, classes.astype(np.float64))
    with pytest.raises(ValueError, match="-1"):
        semantic_map(masks, scores, np.array([0, -1]))
    with pytest.raises(ValueError, match="tau"):
        semantic_map(masks, scores, classes, tau=1.0)


@pytest.mark.parametrize("seed", range(20))
def test_every_pixel_takes_the_most_confident_covering_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(0, 7))
    height, width = (int(n) for n in rng.integers(1, 9, size=2))
    masks = rng.random((count, height, width)) < rng.uniform(0.2, 0.8)
    scores = np.round(rng.uniform(0.8, 1.0, size=count), 2)  # rounding makes ties likely
    classes = rng.integers(0, 300, size=count)
    expected = reference_map(masks, scores, classes, tau=0.9)
    np.testing.assert_array_equal(semantic_map(masks, scores, classes), expected)


# --- encode_label_map / decode_label_map ------------------------------------------------------


def test_round_trip_8_bit() -> None:
    label_map = np.arange(20, dtype=np.int64).reshape(SHAPE) * 13  # 0..247
    label_map[0, 0] = 255
    data = encode_label_map(label_map)
    assert data.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(data)).mode == "L"
    decoded = decode_label_map(data)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, label_map)


def test_round_trip_16_bit() -> None:
    label_map = np.array([[0, 1, 255], [256, 1000, 65535]], dtype=np.int64)
    data = encode_label_map(label_map)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode_label_map(data)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, label_map)


def test_round_trip_of_a_semantic_map() -> None:
    masks, scores, classes = candidates((box(0, 0, 3, 3), 0.95, 3), (box(1, 2, 4, 5), 0.97, 1))
    label_map = semantic_map(masks, scores, classes)
    np.testing.assert_array_equal(decode_label_map(encode_label_map(label_map)), label_map)


@pytest.mark.parametrize(
    ("label_map", "message"),
    [
        (np.array([[0, -1]]), r"0\.\.65535.*-1\.\.0"),
        (np.array([[0, 65536]]), r"0\.\.65535.*0\.\.65536"),
        (np.zeros((2, 2, 2), np.int64), r"\[H, W\]"),
        (np.zeros((0, 3), np.int64), r"\[H, W\]"),
        (np.zeros((2, 2), np.float32), "integer"),
    ],
)
def test_encode_rejects_unstorable_maps(label_map: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_label_map(label_map)


def test_decode_rejects_non_label_png() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="mode RGB"):
        decode_label_map(buffer.getvalue())
