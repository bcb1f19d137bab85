import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdistill.backbones import IMAGENET_MEAN, IMAGENET_STD
from maskdistill.clustering import (
    FeatureTransform,
    KMeansResult,
    KScore,
    assign,
    choose_k,
    fit_kmeans,
    num_clusters_for,
    object_view,
    object_view_native,
    object_views,
    silhouette,
    sweep_k,
)
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


@pytest.mark.parametrize("size", [16, 64])
def test_crop_view_equals_manual_crop_resize_normalise(size: int) -> None:
    image = _image(40, 50)
    box = (5, 7, 30, 27)  # 25 wide, 20 high: swapped axes or off-by-one edges would differ
    mask = np.zeros((40, 50), dtype=bool)
    mask[10:20, 8:25] = True
    crop = torch.from_numpy(image[7:27, 5:30]).permute(2, 0, 1).float() / 255.0
    resized = F.interpolate(
        crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    expected = (resized - MEAN) / STD
    view = object_view(image, mask, box, mode="crop", size=size)
    assert view.shape == (3, size, size) and view.dtype == torch.float32
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_crop_view_of_constant_colour_is_its_normalised_value() -> None:
    image = np.full((30, 30, 3), (255, 0, 128), dtype=np.uint8)
    mask = np.ones((30, 30), dtype=bool)
    view = object_view(image, mask, (3, 4, 20, 25), mode="crop", size=8)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    torch.testing.assert_close(view, expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-5, rtol=0)


def test_masked_view_zeroes_outside_mask_and_keeps_inside() -> None:
    image = _image(32, 32, seed=1)
    mask = np.random.default_rng(2).random((32, 32)) > 0.5
    view = object_view(image, mask, mask_to_box(mask), mode="masked", size=32)
    outside = torch.from_numpy(~mask)
    assert bool((view[:, outside] == 0).all())
    normalised = (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - MEAN) / STD
    torch.testing.assert_close(view[:, ~outside], normalised[:, ~outside], atol=1e-6, rtol=0)


def test_masked_view_with_full_mask_is_the_crop_of_the_whole_image() -> None:
    image = _image(24, 40, seed=3)
    mask = np.ones((24, 40), dtype=bool)
    box = (0, 0, 40, 24)
    masked = object_view(image, mask, box, mode="masked", size=20)
    cropped = object_view(image, mask, box, mode="crop", size=20)
    assert masked.shape == (3, 20, 20)
    torch.testing.assert_close(masked, cropped)


def test_masked_view_resized_blends_towards_zero_outside() -> None:
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[:, :32] = True
    view = object_view(image, mask, mask_to_box(mask), mode="masked", size=16)
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(view[:, :, 0], white.view(3, 1).expand(3, 16), atol=1e-5, rtol=0)
    assert bool((view[:, :, -1] == 0).all())


def test_object_views_stacks_single_views() -> None:
    images = [_image(20, 30, seed=4), _image(50, 40, seed=5)]
    masks = [np.zeros((20, 30), dtype=bool), np.zeros((50, 40), dtype=bool)]
    masks[0][2:10, 3:12] = True
    masks[1][10:45, 5:30] = True
    boxes = [mask_to_box(m) for m in masks]
    for mode in ("crop", "masked"):
        batch = object_views(images, masks, boxes, mode=mode, size=24)
        assert batch.shape == (2, 3, 24, 24)
        for i in range(2):
            torch.testing.assert_close(
                batch[i], object_view(images[i], masks[i], boxes[i], mode=mode, size=24)
            )
    assert object_views([], [], [], mode="crop", size=24).shape == (0, 3, 24, 24)


def test_object_views_rejects_mismatched_lengths() -> None:
    mask = np.ones((8, 8), dtype=bool)
    with pytest.raises(ValueError, match="2 images, 1 masks and 2 boxes"):
        object_views([_image(8, 8)] * 2, [mask], [(0, 0, 8, 8)] * 2, mode="crop")


def test_object_view_rejects_bad_mode_box_and_mask() -> None:
    image = _image(10, 10)
    mask = np.ones((10, 10), dtype=bool)
    with pytest.raises(ValueError, match=r"'cropped'.*allowed: crop, masked"):
        object_view(image, mask, (0, 0, 10, 10), mode="cropped")
    with pytest.raises(ValueError, match="allowed: crop, masked"):
        object_views([image], [mask], [(0, 0, 10, 10)], mode="mask")
    with pytest.raises(ValueError, match="outside the 10x10 image"):
        object_view(image, mask, (0, 0, 11, 10), mode="crop")
    with pytest.raises(ValueError, match="empty or outside"):
        object_view(image, mask, (4, 0, 4, 10), mode="crop")
    with pytest.raises(ValueError, match="does not match image size"):
        object_view(image, np.ones((10, 9), dtype=bool), (0, 0, 9, 10), mode="masked")
    with pytest.raises(ValueError, match="mask is empty"):
        object_view(image, np.zeros((10, 10), dtype=bool), (0, 0, 10, 10), mode="masked")
    with pytest.raises(ValueError, match="uint8"):
        object_view(image.astype(np.float32), mask, (0, 0, 10, 10), mode="crop")


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
    view = object_view_native(image, mask, box, mode=mode, patch_size=8)
    height, width = (13, 17) if mode == "crop" else (20, 30)
    assert view.shape == (3, -(-height // 8) * 8, -(-width // 8) * 8)  # 16 x 24 or 24 x 32
    pixels = image[5:18, 3:20] if mode == "crop" else image
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - MEAN) / STD
    if mode == "masked":
        expected = torch.where(torch.from_numpy(mask), expected, 0.0)
    torch.testing.assert_close(view[:, :height, :width], expected)
    assert (view[:, height:] == 0).all() and (view[:, :, width:] == 0).all()
