"""Sec 3.2: a CLS feature per mined object, then K-means (faiss) into pseudo classes.

`sweep_k` and `choose_k` pick K from the data (`clustering.num_clusters: auto`): the K with
the highest mean silhouette.

`object_view` builds the ViT input for one object: its box crop (`crop`, the authors' release)
or the whole image with everything outside the mask set to the ImageNet mean colour (`masked`,
the paper's text), resized to a square (`resize`) or at its own resolution (`native`, the
release; `object_view_native`). `fit_kmeans` clusters the CLS features after an optional
whitening (PCA, or per-dimension std as the release does) and L2 normalisation
(`FeatureTransform`), both fitted on the support set, so that features seen later (other
splits, serving) are labelled by `assign` in the same space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from maskdistill.backbones import to_model_input
from maskdistill.masks import Box

VIEW_MODES = ("crop", "masked")
WHITENINGS = ("none", "pca", "std")
_MAX_FAISS_SEED = 2**31


def _view(
    image: np.ndarray, mask: np.ndarray, box: Box, *, mode: str, divisor: int
) -> torch.Tensor:
    """The normalised view [3, h, w] before any resizing: the box crop, or the whole image with
    the pixels outside the mask at the mean colour (exactly 0 once normalised)."""
    _check_mode(mode)
    mask = _check_view_inputs(image, mask, box, divisor)
    if mode == "crop":
        x0, y0, x1, y1 = box
        return _normalize(image[y0:y1, x0:x1])
    # Sec 3.2: the [CLS] token "of the masked images"; the mean colour normalises to 0.
    return torch.where(torch.from_numpy(mask), _normalize(image), 0.0)


def object_view(
    image: np.ndarray, mask: np.ndarray, box: Box, *, mode: str, size: int = 224
) -> torch.Tensor:
    """ImageNet-normalised [3, size, size] view of one object, ready for the ViT.

    `image` is uint8 [H, W, 3], `mask` bool [H, W], `box` = (x0, y0, x1, y1) with x1, y1
    exclusive. `crop`: the box region; `masked`: the whole image, pixels outside the mask at
    the mean colour (exactly 0 once normalised). Either is resized (bilinear, antialias) to a
    square, so both modes batch together.
    """
    return _resize_square(_view(image, mask, box, mode=mode, divisor=size), size)


def object_views(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    boxes: Sequence[Box],
    *,
    mode: str,
    size: int = 224,
) -> torch.Tensor:
    """`object_view` of each (image, mask, box), stacked into [B, 3, size, size]."""
    _check_mode(mode)
    if not len(images) == len(masks) == len(boxes):
        raise ValueError(
            f"object_views needs one mask and box per image, got {len(images)} images, "
            f"{len(masks)} masks and {len(boxes)} boxes"
        )
    if not images:
        return torch.empty((0, 3, size, size))
    views = [
        object_view(image, mask, box, mode=mode, size=size)
        for image, mask, box in zip(images, masks, boxes, strict=True)
    ]
    return torch.stack(views)


def object_view_native(
    image: np.ndarray, mask: np.ndarray, box: Box, *, mode: str, patch_size: int
) -> torch.Tensor:
    """`object_view` at its own resolution (the release): [3, H', W'], no resizing.

    The view (box crop or masked image) is padded at the bottom and right with the mean colour
    (0 once normalised) up to H', W', the next multiples of `patch_size`, as the release pads
    its crops for the ViT; the ViT interpolates its position embedding to that grid. Views
    differ in size, so each takes a forward of its own.
    """
    view = _view(image, mask, box, mode=mode, divisor=patch_size)
    height, width = view.shape[-2:]
    pad_h, pad_w = -height % patch_size, -width % patch_size
    return F.pad(view, (0, pad_w, 0, pad_h), value=0.0)


def _check_mode(mode: str) -> None:
    if mode not in VIEW_MODES:
        raise ValueError(f"unknown object view mode {mode!r}; allowed: {', '.join(VIEW_MODES)}")


def _check_view_inputs(image: np.ndarray, mask: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The mask as bool after checking shapes, dtype, box bounds and size."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be uint8 [H, W, 3], got {image.dtype} with shape {image.shape}"
        )
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image size {image.shape[:2]}")
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {box} is empty or outside the {width}x{height} image")
    if size < 1:
        raise ValueError(f"view size must be >= 1, got {size}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the object mask is empty")
    return mask


def _normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W], ImageNet mean and std on 0..1 pixels."""
    return to_model_input(torch.from_numpy(np.ascontiguousarray(pixels))[None])[0]


def _resize_square(view: torch.Tensor, size: int) -> torch.Tensor:
    if view.shape[-2:] == (size, size):
        return view.contiguous()
    resized = F.interpolate(
        view[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0]


@dataclass
class FeatureTransform:
    """Feature map fitted on the support set: optional whitening, then optional L2 norm.

    Features become (x - mean) @ matrix. `mean` [D] and `matrix` [D, D'] are both None without
    whitening. PCA: D' < D when the support set's covariance is rank-deficient (directions with
    no variance are dropped). std: mean 0 and matrix diag(1 / std), D' = D.
    """

    mean: np.ndarray | None
    matrix: np.ndarray | None
    l2_normalize: bool

    @classmethod
    def fit(cls, support: np.ndarray, *, whiten: str, l2_normalize: bool) -> FeatureTransform:
        """`whiten`: "none", "pca" or "std" (see `WHITENINGS`)."""
        if whiten not in WHITENINGS:
            raise ValueError(f"unknown whitening {whiten!r}; allowed: {', '.join(WHITENINGS)}")
        if whiten == "none":
            return cls(mean=None, matrix=None, l2_normalize=l2_normalize)
        mean, matrix = _pca_whitening(support) if whiten == "pca" else _std_whitening(support)
        return cls(mean=mean, matrix=matrix, l2_normalize=l2_normalize)

    @property
    def input_dim(self) -> int | None:
        return None if self.matrix is None else self.matrix.shape[0]

    def apply(self, features: np.ndarray) -> np.ndarray:
        """float32 C-contiguous [N, D'] features in the space the centroids live in."""
        if self.input_dim is not None and features.shape[1] != self.input_dim:
            raise ValueError(
                f"features have dimension {features.shape[1]}, the transform expects "
                f"{self.input_dim}"
            )
        out = np.asarray(features, dtype=np.float64)
        if self.mean is not None and self.matrix is not None:
            out = (out - self.mean) @ self.matrix
        if self.l2_normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, np.finfo(np.float64).tiny)
        return np.ascontiguousarray(out, dtype=np.float32)


def _pca_whitening(support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and [D, D'] matrix mapping `support` to zero mean and identity covariance."""
    if support.shape[0] < 2:
        raise ValueError(f"whitening needs at least 2 support points, got {support.shape[0]}")
    data = np.asarray(support, dtype=np.float64)
    mean = data.mean(axis=0)
    covariance = np.cov(data - mean, rowvar=False).reshape(data.shape[1], data.shape[1])
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    tolerance = max(eigenvalues[0], 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    keep = eigenvalues > tolerance
    if not keep.any():
        raise ValueError("cannot whiten: the support features have no variance")
    matrix = eigenvectors[:, keep] / np.sqrt(eigenvalues[keep])
    return mean, matrix


def _std_whitening(support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero mean and diag(1 / std) [D, D]: each dimension divided by its standard deviation.

    The release's `scipy.cluster.vq.whiten`: population std (ddof 0), no centring; a dimension
    without variance is left as it is (divided by 1).
    """
    data = np.asarray(support, dtype=np.float64)
    std = data.std(axis=0)
    std[std == 0] = 1.0
    return np.zeros(data.shape[1]), np.diag(1.0 / std)


@dataclass
class KMeansResult:
    """Pseudo classes of the labelled features and the model to label new ones with `assign`.

    `centroids` live in the transformed space; `inertia` is the sum of squared distances of the
    (transformed) support points to their nearest centroid, lowest over the n_init runs.
    """

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    transform: FeatureTransform


def fit_kmeans(
    features: np.ndarray,
    num_clusters: int,
    *,
    n_init: int = 10,
    iterations: int = 100,
    seed: int = 0,
    whiten: str = "none",
    l2_normalize: bool = True,
    support: np.ndarray | None = None,
    use_gpu: bool = False,
) -> KMeansResult:
    """Sec 3.2: K-means on the [CLS] tokens; labels for `features`, fitted on `support`.

    The transform and the centroids are fitted on `support` when given (Sec 4.1: all COCO
    images for COCO20k), else on `features`. With `l2_normalize` the K-means is spherical
    (unit-norm centroids): the features live on the unit sphere and are compared by cosine,
    and nearest-by-L2 to a unit centroid is then nearest-by-cosine. Each of the `n_init` runs
    uses seed `seed + i`; the one with the lowest inertia wins, so the same seed gives the same
    result and n_init=1 is the first run of any larger n_init.
    """
    _check_features(features, "features")
    fit_on = features if support is None else support
    if support is not None:
        _check_features(support, "support")
        if support.shape[1] != features.shape[1]:
            raise ValueError(
                f"support has dimension {support.shape[1]}, features have {features.shape[1]}"
            )
    _check_kmeans_args(num_clusters, len(fit_on), n_init, iterations, use_gpu)
    transform = FeatureTransform.fit(fit_on, whiten=whiten, l2_normalize=l2_normalize)
    points = transform.apply(fit_on)
    runs = (
        _kmeans_run(
            points,
            num_clusters,
            iterations=iterations,
            seed=(seed + i) % _MAX_FAISS_SEED,
            spherical=l2_normalize,
            use_gpu=use_gpu,
        )
        for i in range(n_init)
    )
    centroids, inertia = min(runs, key=lambda run: run[1])
    labels, _ = _nearest(points if support is None else transform.apply(features), centroids)
    return KMeansResult(labels=labels, centroids=centroids, inertia=inertia, transform=transform)


def assign(features: np.ndarray, result: KMeansResult) -> np.ndarray:
    """int64 [N] index of the nearest centroid of each feature, after `result.transform`."""
    _check_features(features, "features")
    labels, _ = _nearest(result.transform.apply(features), result.centroids)
    return labels


@dataclass(frozen=True)
class KScore:
    """One K of a sweep: the mean silhouette of the clustering (on a sample) and its inertia."""

    k: int
    silhouette: float
    inertia: float


def silhouette(
    points: np.ndarray, labels: np.ndarray, *, sample: int = 4000, seed: int = 0
) -> float:
    """Mean silhouette (b - a) / max(a, b) of up to `sample` points, Euclidean distances.

    a: mean distance to the other sampled points of its cluster, b: the smallest mean distance
    to the sampled points of another cluster; a point alone in its cluster scores 0. NaN when
    the sample holds fewer than two clusters. Cost: sample^2 distances, in row blocks.
    """
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(points), size=min(sample, len(points)), replace=False))
    data = np.asarray(points[chosen], dtype=np.float64)
    _, member = np.unique(labels[chosen], return_inverse=True)
    counts = np.bincount(member).astype(np.float64)
    if len(counts) < 2:
        return float("nan")
    onehot = np.zeros((len(data), len(counts)))
    onehot[np.arange(len(data)), member] = 1.0
    squares = (data**2).sum(axis=1)
    scores = np.zeros(len(data))
    for start in range(0, len(data), 1024):
        rows = slice(start, start + 1024)
        squared = squares[rows, None] + squares[None, :] - 2.0 * data[rows] @ data.T
        sums = np.sqrt(np.maximum(squared, 0.0)) @ onehot  # [rows, clusters]
        own = member[rows]
        index = np.arange(len(own))
        peers = counts[own] - 1
        a = sums[index, own] / np.maximum(peers, 1)
        others = sums / counts
        others[index, own] = np.inf
        b = others.min(axis=1)
        denominator = np.maximum(a, b)
        score = np.where(denominator > 0, (b - a) / np.where(denominator > 0, denominator, 1), 0)
        scores[rows] = np.where(peers > 0, score, 0.0)
    return float(scores.mean())


def sweep_k(
    features: np.ndarray,
    ks: Sequence[int],
    *,
    sample: int = 4000,
    n_init: int = 10,
    iterations: int = 100,
    seed: int = 0,
    whiten: str = "none",
    l2_normalize: bool = True,
    use_gpu: bool = False,
) -> list[KScore]:
    """K-means for each K in `ks` (as `fit_kmeans`) on `features`: silhouette and inertia.

    The silhouette is measured where K-means works (after the transform) on the same `sample`
    points for every K, so the curve compares like with like.
    """
    scores = []
    for k in sorted(set(ks)):
        result = fit_kmeans(
            features,
            k,
            n_init=n_init,
            iterations=iterations,
            seed=seed,
            whiten=whiten,
            l2_normalize=l2_normalize,
            use_gpu=use_gpu,
        )
        points = result.transform.apply(features)
        value = silhouette(points, result.labels, sample=sample, seed=seed)
        scores.append(KScore(k, value, result.inertia))
    return scores


def choose_k(scores: Sequence[KScore]) -> int:
    """The K with the highest mean silhouette; the smallest such K on a tie.

    Why the silhouette: it compares each mask's distance to its own cluster with that to the
    nearest other cluster, so it peaks where clusters are both tight and apart, is bounded
    (-1..1) and comparable across K, unlike the inertia, which only falls as K grows.
    """
    valid = [s for s in scores if np.isfinite(s.silhouette)]
    if not valid:
        raise ValueError("no K of the sweep has a silhouette: too few points to compare")
    return min(valid, key=lambda s: (-s.silhouette, s.k)).k


def num_clusters_for(
    config_num_clusters: int | None, num_classes: int, overclustering: float
) -> int:
    """K = (configured count, else the data set's class count) x overclustering, rounded half up.

    Sec 4.2 / Fig 3: overclustering (C larger than the class count) raises mask AP.
    """
    base = num_classes if config_num_clusters is None else config_num_clusters
    if base < 1 or overclustering <= 0:
        raise ValueError(
            f"need a positive cluster count and overclustering, got {base} and {overclustering}"
        )
    return max(1, math.floor(base * overclustering + 0.5))


def _check_features(features: np.ndarray, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {features.shape}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is empty: nothing to cluster")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} rows with non-finite values (NaN or inf)")


def _check_kmeans_args(
    num_clusters: int, num_points: int, n_init: int, iterations: int, use_gpu: bool
) -> None:
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if num_clusters > num_points:
        raise ValueError(
            f"num_clusters={num_clusters} is more than the {num_points} support points"
        )
    if n_init < 1 or iterations < 1:
        raise ValueError(f"n_init and iterations must be >= 1, got {n_init} and {iterations}")
    if use_gpu and faiss.get_num_gpus() == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (install faiss-gpu-cu12)")


def _kmeans_run(
    points: np.ndarray, k: int, *, iterations: int, seed: int, spherical: bool, use_gpu: bool
) -> tuple[np.ndarray, float]:
    """Centroids [k, D] of one faiss K-means run and their inertia on `points`."""
    kmeans = faiss.Kmeans(
        points.shape[1],
        k,
        niter=iterations,
        nredo=1,
        seed=seed,
        spherical=spherical,
        gpu=use_gpu,
        # Use every point: faiss otherwise subsamples to 256 per centroid.
        max_points_per_centroid=-(-len(points) // k),
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(points)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    _, distances = _nearest(points, centroids)
    return centroids, float(distances.sum(dtype=np.float64))


def _nearest(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int64) and squared L2 distance to it for each point."""
    if points.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"features have dimension {points.shape[1]} after the transform, "
            f"centroids have {centroids.shape[1]}"
        )
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, labels = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), np.maximum(distances[:, 0], 0.0)
