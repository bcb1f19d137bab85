from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdistill.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, to_model_input
from maskdistill.clustering import (
    FeatureTransform,
    KMeansResult,
    KScore,
    ObjectFeatures,
    assign,
    choose_k,
    fit_kmeans,
    num_clusters_for,
    object_features,
    object_view_native,
    object_views,
    resize_weights,
    sample_positions,
    silhouette,
    sweep_k,
    take_positions,
)
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.masks import mask_to_box

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _blobs(
    centres: np.ndarray, per_blob: int, spread: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian points around each centre and the index of the centre each came from."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(centres)), per_blob)
    points = centres[truth] + spread * rng.standard_normal((len(truth), centres.shape[1]))
    return points.astype(np.float32), truth


def _is_permutation_of(labels: np.ndarray, truth: np.ndarray, k: int) -> bool:
    """Each cluster holds exactly one true group and each true group lies in one cluster."""
    table = np.zeros((k, k), dtype=np.int64)
    np.add.at(table, (labels, truth), 1)
    nonzero = table > 0
    return bool((nonzero.sum(axis=0) == 1).all() and (nonzero.sum(axis=1) == 1).all())


# Object views

VIEW_ATOL = 1e-4  # batched views vs the per-object crop + resize (object_views' docstring)


def _batch(
    images: list[np.ndarray], masks: list[np.ndarray], boxes: list[tuple[int, int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of mixed sizes as mining hands them over: normalised and zero-padded to the
    largest, masks likewise, boxes and sizes as long tensors."""
    height = max(i.shape[0] for i in images)
    width = max(i.shape[1] for i in images)
    pixels = torch.zeros(len(images), 3, height, width)
    padded = torch.zeros(len(images), height, width, dtype=torch.bool)
    for b, (image, mask) in enumerate(zip(images, masks, strict=True)):
        h, w = mask.shape
        pixels[b, :, :h, :w] = to_model_input(torch.from_numpy(image)[None])[0]
        padded[b, :h, :w] = torch.from_numpy(mask)
    sizes = torch.tensor([m.shape for m in masks])
    return pixels, padded, torch.tensor(boxes), sizes


def _reference_view(
    image: np.ndarray, mask: np.ndarray, box: tuple[int, ...], mode: str, size: int
) -> torch.Tensor:
    """The per-object CPU view the batched one replaced: crop (or masked image), normalise,
    F.interpolate(bilinear, antialias) to size x size."""
    normalised = to_model_input(torch.from_numpy(image)[None])[0]
    if mode == "crop":
        x0, y0, x1, y1 = box
        view = normalised[:, y0:y1, x0:x1]
    else:
        view = torch.where(torch.from_numpy(mask), normalised, 0.0)
    return F.interpolate(view[None], size=(size, size), mode="bilinear", antialias=True)[0]


def _objects() -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, int, int, int]]]:
    """Random and synthetic-scene images of mixed sizes, each with a mask and its box: crops
    from 3 x 4 (upscaled) to 60 x 90 (downscaled)."""
    scenes = SyntheticScenes(num_images=2, image_size=(60, 90), seed=1)
    images = [_image(40, 50), _image(25, 70, seed=1)]
    images += [scenes.load(i).image for i in scenes.image_ids()]
    masks = []
    for b, (y0, x0, y1, x1) in enumerate([(7, 5, 27, 30), (2, 10, 5, 14), (0, 0, 60, 90)]):
        mask = np.zeros(images[b].shape[:2], dtype=bool)
        mask[y0:y1, x0:x1] = True
        masks.append(mask)
    masks.append(scenes.load(scenes.image_ids()[1]).semantic > 0)
    return images, masks, [mask_to_box(m) for m in masks]


@pytest.mark.parametrize("mode", ["crop", "masked"])
@pytest.mark.parametrize("size", [16, 64])
def test_batched_views_equal_the_per_object_crop_and_resize(mode: str, size: int) -> None:
    images, masks, boxes = _objects()
    views = object_views(*_batch(images, masks, boxes), mode=mode, size=size)
    assert views.shape == (4, 3, size, size) and views.dtype == torch.float32
    for b in range(4):
        expected = _reference_view(images[b], masks[b], boxes[b], mode, size)
        assert (views[b] - expected).abs().max() <= VIEW_ATOL


def test_batched_features_equal_the_per_object_ones_within_the_tolerance() -> None:
    vit = build_backbone("test_vit")
    images, masks, boxes = _objects()
    spec = ObjectFeatures(backbone=vit, mode="crop", size=32)
    with torch.no_grad():
        features = object_features(spec, *_batch(images, masks, boxes))
        expected = vit.cls_features(
            torch.stack(
                [
                    _reference_view(*obj, "crop", 32)
                    for obj in zip(images, masks, boxes, strict=True)
                ]
            )
        )
    assert features.shape == (4, 64)
    assert (features - expected).abs().max() <= 1e-4  # mining's FEATURE_ATOL
    assert F.cosine_similarity(features, expected).min() >= 0.9999


def test_resize_weights_golden() -> None:
    # 4 pixels -> 2: scale 2, centres 1 and 3, pixel t weighs 1 - |t + 0.5 - c| / 2:
    # output 0: 0.75, 0.75, 0.25, 0 (sum 1.75); output 1: 0, 0.25, 0.75, 0.75. Placed at
    # pixel 1 of an axis of 6, the weights shift by one and the rest stay 0.
    weights = resize_weights(torch.tensor([1]), torch.tensor([4]), 2, 6)
    expected = torch.tensor([[0, 3, 3, 1, 0, 0], [0, 0, 1, 3, 3, 0]]) / 7
    torch.testing.assert_close(weights[0], expected.float())
    # 2 pixels -> 4 (upscaling): plain bilinear, edges clamped: 1, 3/4 + 1/4, 1/4 + 3/4, 1
    up = resize_weights(torch.tensor([0]), torch.tensor([2]), 4, 2)
    torch.testing.assert_close(up[0], torch.tensor([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]))


def test_crop_view_of_constant_colour_is_its_normalised_value() -> None:
    image = np.full((30, 30, 3), (255, 0, 128), dtype=np.uint8)
    mask = np.ones((30, 30), dtype=bool)
    view = object_views(*_batch([image], [mask], [(3, 4, 20, 25)]), mode="crop", size=8)[0]
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    torch.testing.assert_close(view, expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-5, rtol=0)


def test_masked_view_at_its_own_size_zeroes_outside_and_keeps_inside() -> None:
    image = _image(32, 32, seed=1)
    mask = np.random.default_rng(2).random((32, 32)) > 0.5
    view = object_views(*_batch([image], [mask], [mask_to_box(mask)]), mode="masked", size=32)[0]
    outside = torch.from_numpy(~mask)
    assert bool((view[:, outside].abs() <= 1e-6).all())
    normalised = (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - MEAN) / STD
    torch.testing.assert_close(view[:, ~outside], normalised[:, ~outside], atol=1e-5, rtol=0)


def test_masked_view_resized_blends_towards_zero_outside() -> None:
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[:, :32] = True
    view = object_views(*_batch([image], [mask], [mask_to_box(mask)]), mode="masked", size=16)[0]
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(view[:, :, 0], white.view(3, 1).expand(3, 16), atol=1e-5, rtol=0)
    assert bool((view[:, :, -1] == 0).all())


def test_object_features_reject_bad_mode_crop_and_box() -> None:
    vit = build_backbone("test_vit")
    with pytest.raises(ValueError, match=r"'cropped'.*allowed: crop, masked"):
        ObjectFeatures(backbone=vit, mode="cropped")
    with pytest.raises(ValueError, match=r"unknown crop 'square'; allowed: resize, native"):
        ObjectFeatures(backbone=vit, mode="crop", crop="square")
    image, mask = torch.zeros(3, 10, 10), torch.ones(10, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside the 10x10 image"):
        object_view_native(image, mask, (0, 0, 11, 10), mode="crop", patch_size=8)
    with pytest.raises(ValueError, match="empty or outside"):
        object_view_native(image, mask, (4, 0, 4, 10), mode="crop", patch_size=8)
    with pytest.raises(ValueError, match="need images"):
        object_views(image[None], mask, torch.zeros(1, 4), torch.zeros(1, 2), mode="crop")


# K-means


@pytest.mark.parametrize("l2_normalize", [False, True])
@pytest.mark.parametrize("whiten", ["none", "pca", "std"])
def test_kmeans_recovers_separated_blobs(whiten: str, l2_normalize: bool) -> None:
    # Centres along different axes, so the blobs stay apart after L2 normalisation too.
    centres = 10.0 * np.eye(5, 8) + 1.0
    features, truth = _blobs(centres, per_blob=40, spread=0.3)
    result = fit_kmeans(features, 5, seed=0, whiten=whiten, l2_normalize=l2_normalize)
    assert isinstance(result, KMeansResult)
    assert result.labels.dtype == np.int64 and result.labels.shape == (200,)
    assert result.centroids.dtype == np.float32 and result.centroids.shape[0] == 5
    assert _is_permutation_of(result.labels, truth, 5)
    np.testing.assert_array_equal(assign(features, result), result.labels)


def test_kmeans_inertia_is_sum_of_squared_distances_to_own_centroid() -> None:
    features, _ = _blobs(np.array([[0.0, 0.0], [5.0, 5.0]]), per_blob=30, spread=1.0)
    result = fit_kmeans(features, 2, l2_normalize=False)
    points = result.transform.apply(features)
    expected = ((points - result.centroids[result.labels]) ** 2).sum()
    assert result.inertia == pytest.approx(float(expected), rel=1e-5)


def test_same_seed_gives_identical_result() -> None:
    features = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    first = fit_kmeans(features, 7, n_init=3, seed=11, whiten="pca")
    second = fit_kmeans(features, 7, n_init=3, seed=11, whiten="pca")
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    assert first.inertia == second.inertia


def test_n_init_keeps_the_lowest_inertia_run() -> None:
    # Uniform noise has many local optima, so restarts matter.
    features = np.random.default_rng(1).random((400, 4)).astype(np.float32)
    singles = [
        fit_kmeans(features, 12, n_init=1, iterations=20, seed=3 + i, l2_normalize=False)
        for i in range(5)
    ]
    best = fit_kmeans(features, 12, n_init=5, iterations=20, seed=3, l2_normalize=False)
    assert best.inertia <= singles[0].inertia
    assert best.inertia == min(single.inertia for single in singles)
    assert len({single.inertia for single in singles}) > 1, "restarts should differ here"


def test_whitening_gives_identity_covariance_on_support() -> None:
    rng = np.random.default_rng(2)
    mixing = rng.standard_normal((6, 6)) * np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    support = (rng.standard_normal((500, 6)) @ mixing + 3.0).astype(np.float32)
    result = fit_kmeans(support, 4, whiten="pca", l2_normalize=False)
    whitened = result.transform.apply(support)
    assert whitened.shape == (500, 6)
    np.testing.assert_allclose(whitened.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(6), atol=1e-4)


def test_whitening_drops_directions_without_variance() -> None:
    rng = np.random.default_rng(3)
    support = (rng.standard_normal((100, 3)) @ rng.standard_normal((3, 8))).astype(np.float32)
    transform = FeatureTransform.fit(support, whiten="pca", l2_normalize=False)
    assert transform.matrix is not None and transform.matrix.shape == (8, 3)
    whitened = transform.apply(support)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(3), atol=1e-4)


def test_l2_normalisation_gives_unit_rows_and_unit_centroids() -> None:
    features = (5.0 * np.random.default_rng(4).standard_normal((200, 10))).astype(np.float32)
    result = fit_kmeans(features, 6, whiten="pca", l2_normalize=True)
    np.testing.assert_allclose(
        np.linalg.norm(result.transform.apply(features), axis=1), 1.0, atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)


def test_without_l2_features_keep_their_norm() -> None:
    features = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 1.0]], dtype=np.float32)
    result = fit_kmeans(features, 2, l2_normalize=False)
    np.testing.assert_array_equal(result.transform.apply(features), features)


def test_support_set_fits_the_model_and_labels_follow_assign() -> None:
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]])
    support, _ = _blobs(centres, per_blob=100, spread=1.0, seed=5)
    small = support[::40]  # 10 points, fewer than some settings of K below would allow
    on_support = fit_kmeans(support, 4, seed=2, whiten="pca")
    result = fit_kmeans(small, 4, seed=2, whiten="pca", support=support)
    assert result.labels.shape == (10,)
    np.testing.assert_array_equal(result.labels, assign(small, result))
    np.testing.assert_array_equal(result.centroids, on_support.centroids)
    np.testing.assert_array_equal(result.transform.mean, on_support.transform.mean)
    assert result.inertia == on_support.inertia
    more_clusters_than_small = fit_kmeans(small[:3], 4, support=support)
    assert more_clusters_than_small.labels.shape == (3,)


def test_kmeans_with_one_point_per_cluster() -> None:
    features = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    result = fit_kmeans(features, 3)
    assert sorted(result.labels.tolist()) == [0, 1, 2]
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_kmeans_errors_name_the_problem() -> None:
    features = np.random.default_rng(6).standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"num_clusters=6 .*5 support points"):
        fit_kmeans(features, 6)
    with pytest.raises(ValueError, match=r"num_clusters=9 .*8 support points"):
        fit_kmeans(features, 9, support=np.zeros((8, 4), dtype=np.float32))
    bad = features.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="features has 1 rows with non-finite"):
        fit_kmeans(bad, 2)
    with pytest.raises(ValueError, match="support has 1 rows with non-finite"):
        fit_kmeans(features, 2, support=bad)
    with pytest.raises(ValueError, match="features is empty"):
        fit_kmeans(np.zeros((0, 4), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="support has dimension 3, features have 4"):
        fit_kmeans(features, 2, support=np.zeros((6, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no variance"):
        fit_kmeans(np.ones((6, 4), dtype=np.float32), 2, whiten="pca")


def test_assign_rejects_wrong_dimension() -> None:
    features = np.random.default_rng(7).standard_normal((20, 4)).astype(np.float32)
    plain = fit_kmeans(features, 3)
    whitened = fit_kmeans(features, 3, whiten="pca")
    with pytest.raises(ValueError, match="dimension 5"):
        assign(np.zeros((2, 5), dtype=np.float32), plain)
    with pytest.raises(ValueError, match="dimension 5, the transform expects 4"):
        assign(np.zeros((2, 5), dtype=np.float32), whitened)


@pytest.mark.parametrize(
    ("configured", "num_classes", "overclustering", "expected"),
    [
        (None, 20, 1.0, 20),
        (None, 20, 2.0, 40),
        (None, 80, 1.0, 80),
        (30, 20, 1.0, 30),
        (30, 20, 2.0, 60),
        (None, 3, 1.5, 5),  # 4.5 rounds half up
        (None, 20, 1.15, 23),
    ],
)
def test_num_clusters_for(
    configured: int | None, num_classes: int, overclustering: float, expected: int
) -> None:
    assert num_clusters_for(configured, num_classes, overclustering) == expected


def test_silhouette_golden_on_two_pairs() -> None:
    # Points 0, 1 | 4, 5. Point 0: a = 1, b = (4 + 5) / 2 = 4.5, s = 3.5 / 4.5;
    # point 1: a = 1, b = (3 + 4) / 2 = 3.5, s = 2.5 / 3.5; 4 and 5 mirror 1 and 0.
    points = np.array([[0.0], [1.0], [4.0], [5.0]])
    expected = (3.5 / 4.5 + 2.5 / 3.5) / 2
    assert silhouette(points, np.array([0, 0, 1, 1])) == pytest.approx(expected)
    # A point alone in its cluster scores 0: point 5 alone; 0, 1, 4 together.
    alone = silhouette(points, np.array([0, 0, 0, 1]))
    a = [2.5, 2.0, 3.5]  # mean distance to the other two of {0, 1, 4}
    b = [5.0, 4.0, 1.0]  # distance to 5
    scores = [(bi - ai) / max(ai, bi) for ai, bi in zip(a, b, strict=True)] + [0.0]
    assert alone == pytest.approx(np.mean(scores))
    assert np.isnan(silhouette(points, np.zeros(4, dtype=np.int64)))


def test_the_sweep_picks_the_planted_k_and_reports_every_k() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 24))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    features, _ = _blobs(centres, per_blob=40, spread=0.04)
    # n_init as the config's default: faiss seeds K-means at random, and one run can merge two
    # groups and split another (here n_init=3 misses K = 5: its inertia stays at K = 4's)
    scores = sweep_k(features, range(2, 10), n_init=10, sample=150)
    assert [s.k for s in scores] == list(range(2, 10))
    assert choose_k(scores) == 5
    inertias = [s.inertia for s in scores]
    assert inertias == sorted(inertias, reverse=True)  # falls as K grows: no criterion alone


def test_choose_k_takes_the_smaller_k_on_a_tie_and_skips_nan() -> None:
    scores = [KScore(2, float("nan"), 9.0), KScore(3, 0.5, 5.0), KScore(4, 0.5, 4.0)]
    assert choose_k(scores) == 3
    with pytest.raises(ValueError, match="no K of the sweep"):
        choose_k([KScore(2, float("nan"), 1.0)])


def test_std_whitening_golden_3x2() -> None:
    # column 0: 1, 1, 4 -> mean 2, deviations -1, -1, 2, variance (1 + 1 + 4) / 3 = 2, std sqrt 2
    # column 1: 0, 0, 6 -> mean 2, deviations -2, -2, 4, variance (4 + 4 + 16) / 3 = 8, std 2 sqrt 2
    # divided (not centred): rows (1, 0), (1, 0), (4, 3) over sqrt 2; L2: (1, 0), (1, 0), (.8, .6)
    support = np.array([[1.0, 0.0], [1.0, 0.0], [4.0, 6.0]], dtype=np.float32)
    divided = FeatureTransform.fit(support, whiten="std", l2_normalize=False).apply(support)
    np.testing.assert_allclose(divided, np.array([[1, 0], [1, 0], [4, 3]]) / np.sqrt(2), atol=1e-6)
    unit = FeatureTransform.fit(support, whiten="std", l2_normalize=True).apply(support)
    np.testing.assert_allclose(unit, [[1, 0], [1, 0], [0.8, 0.6]], atol=1e-6)
    plain = FeatureTransform.fit(support, whiten="none", l2_normalize=True).apply(support)
    assert not np.allclose(plain[2], [0.8, 0.6])  # (4, 6) / sqrt 52 without the division


def test_std_whitening_leaves_a_constant_dimension_as_it_is() -> None:
    # column 0: 1, 3 -> std 1; column 1: 5, 5 -> std 0, divided by 1 (scipy's vq.whiten)
    support = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    transform = FeatureTransform.fit(support, whiten="std", l2_normalize=False)
    np.testing.assert_allclose(transform.apply(support), support)
    with pytest.raises(ValueError, match="unknown whitening 'zca'; allowed: none, pca, std"):
        FeatureTransform.fit(support, whiten="zca", l2_normalize=False)


@pytest.mark.parametrize("mode", ["crop", "masked"])
def test_native_view_keeps_the_resolution_and_pads_with_the_mean(mode: str) -> None:
    image = _image(20, 30, seed=5)
    mask = np.zeros((20, 30), dtype=bool)
    mask[6:17, 4:19] = True
    box = (3, 5, 20, 18)  # 17 x 13 (w x h)
    normalised = to_model_input(torch.from_numpy(image)[None])[0]
    view = object_view_native(normalised, torch.from_numpy(mask), box, mode=mode, patch_size=8)
    height, width = (13, 17) if mode == "crop" else (20, 30)
    assert view.shape == (3, -(-height // 8) * 8, -(-width // 8) * 8)  # 16 x 24 or 24 x 32
    pixels = image[5:18, 3:20] if mode == "crop" else image
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - MEAN) / STD
    if mode == "masked":
        expected = torch.where(torch.from_numpy(mask), expected, 0.0)
    torch.testing.assert_close(view[:, :height, :width], expected)
    assert (view[:, height:] == 0).all() and (view[:, :, width:] == 0).all()


# Fitting on a sample (clustering.fit_samples)


def test_no_cap_or_a_cap_above_the_count_samples_every_row_in_order() -> None:
    for count in (None, 5, 9):
        np.testing.assert_array_equal(sample_positions(5, count, seed=3), np.arange(5))
    with pytest.raises(ValueError, match="count=0"):
        sample_positions(5, 0, seed=0)


def test_the_sample_is_reproducible_sorted_distinct_and_uniform() -> None:
    first = sample_positions(100_000, 20_000, seed=7)
    np.testing.assert_array_equal(first, sample_positions(100_000, 20_000, seed=7))
    assert not np.array_equal(first, sample_positions(100_000, 20_000, seed=8))
    assert len(first) == 20_000 and (np.diff(first) > 0).all()  # sorted, no repeats
    assert first[0] >= 0 and first[-1] < 100_000
    # 10 equal bins expect 2000 each; the spread of a bin is sqrt(2000 * 0.9 * 0.8) ~ 38
    bins = np.bincount(first // 10_000, minlength=10)
    assert np.abs(bins - 2000).max() < 5 * 38, bins


def test_take_positions_keeps_the_chosen_rows_and_loads_only_their_blocks() -> None:
    rows = np.arange(9, dtype=np.float32)[:, None] * [1, 10]  # row i is (i, 10 i)
    loaded: list[int] = []

    def block(start: int, stop: int) -> tuple[int, Callable[[], np.ndarray]]:
        def load() -> np.ndarray:
            loaded.append(start)
            return rows[start:stop]

        return stop - start, load

    blocks = [block(0, 3), block(3, 5), block(5, 9)]  # 3 + 2 + 4 rows
    taken = take_positions(blocks, np.array([1, 5, 8]))
    np.testing.assert_array_equal(taken, [[1, 10], [5, 50], [8, 80]])
    assert loaded == [0, 5]  # rows 3-4 hold no chosen position: never read
    with pytest.raises(ValueError, match="positions reach 9, the blocks hold 9 rows"):
        take_positions(blocks, np.array([2, 9]))
    with pytest.raises(ValueError, match="said it holds 3 rows but loaded 2"):
        take_positions([(3, lambda: rows[:2])], np.array([0]))
