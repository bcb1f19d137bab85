"""Sec 3.2: a CLS feature per mined object, then K-means (faiss) into pseudo classes.

`sweep_k` and `choose_k` pick K from the data (`clustering.num_clusters: auto`): the K with
the highest mean silhouette.

`object_features` gives each mined object's CLS feature from its view: its box crop (`crop`, the
authors' release) or the whole image with everything outside the mask set to the ImageNet mean
colour (`masked`, the paper's text), resized to a square, batched on the device (`resize`,
`object_views`), or at its own resolution one object at a time (`native`, the release;
`object_view_native`). `fit_kmeans` clusters the CLS features after an optional
whitening (PCA, or per-dimension std as the release does) and L2 normalisation
(`FeatureTransform`), both fitted on the support set, so that features seen later (other
splits, serving) are labelled by `assign` in the same space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np
import torch
import torch.nn.functional as F

VIEW_MODES = ("crop", "masked")
CROPS = ("resize", "native")
WHITENINGS = ("none", "pca", "std")
_MAX_FAISS_SEED = 2**31


class FeatureBackbone(Protocol):
    """What the object features need from a ViT: its patch size, width and CLS output."""

    patch_size: int
    embed_dim: int

    def cls_features(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ObjectFeatures:
    """How each mined object's CLS feature is taken (Sec 3.2; `clustering` config keys):
    `mode` "crop" or "masked" (`VIEW_MODES`), `crop` "resize" (square views of side `size`,
    batched) or "native" (each view at its own resolution, one forward per object)."""

    backbone: FeatureBackbone
    mode: str
    crop: str = "resize"
    size: int = 224

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop {self.crop!r}; allowed: {', '.join(CROPS)}")
        if self.size < 1:
            raise ValueError(f"view size must be >= 1, got {self.size}")


def object_features(
    features: ObjectFeatures,
    images: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    sizes: torch.Tensor,
    *,
    bf16: bool = False,
) -> torch.Tensor:
    """float32 [B, D]: the CLS feature of each object's view, on the images' device.

    `images` normalised [B, 3, H, W] (zero beyond each image), `masks` bool [B, H, W],
    `boxes` long [B, 4] (x0, y0, x1, y1, pixel edges), `sizes` long [B, 2] (each image's
    h, w). "resize": one batched forward of `object_views`; "native": one forward per object
    (`object_view_native`; views differ in size), its boxes read back to the host once.
    """
    vit = features.backbone
    if features.crop == "native":
        views = [
            object_view_native(
                images[b, :, :h, :w],
                masks[b, :h, :w],
                box,
                mode=features.mode,
                patch_size=vit.patch_size,
            )[None]
            for b, (box, (h, w)) in enumerate(zip(boxes.tolist(), sizes.tolist(), strict=True))
        ]
    else:
        views = [object_views(images, masks, boxes, sizes, mode=features.mode, size=features.size)]
    with torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
        return torch.cat([vit.cls_features(view).float() for view in views])


def object_views(
    images: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    sizes: torch.Tensor,
    *,
    mode: str,
    size: int = 224,
) -> torch.Tensor:
    """Normalised [B, 3, size, size] views of the objects, computed batched on the device.

    "crop": each box region; "masked": each whole image (`sizes`) with the pixels outside the
    mask at the mean colour (exactly 0 once normalised; Sec 3.2: the [CLS] token "of the
    masked images"). Each view is resized as `F.interpolate(view, (size, size),
    mode="bilinear", antialias=True)` would (the per-object crop + resize this replaces), as
    two matrix products with that resampling's weights (`resize_weights`): equal to it within
    float32 summation order, max abs difference <= 1e-4 on normalised pixels and CLS features
    with cosine >= 0.9999 (tests/test_clustering.py). Not `roi_align`: its point samples
    averaged per bin are a box filter, not the antialias triangle filter used so far.
    """
    _check_mode(mode)
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"need images [B, 3, H, W] and masks [B, H, W], got {tuple(images.shape)} and "
            f"{tuple(masks.shape)}"
        )
    if mode == "crop":
        x0, y0, x1, y1 = boxes.unbind(1)
        starts, lengths = (y0, x0), (y1 - y0, x1 - x0)
    else:
        images = torch.where(masks[:, None], images, 0.0)
        starts, lengths = (torch.zeros_like(sizes[:, 0]),) * 2, (sizes[:, 0], sizes[:, 1])
    rows = resize_weights(starts[0], lengths[0], size, images.shape[-2])
    cols = resize_weights(starts[1], lengths[1], size, images.shape[-1])
    return rows[:, None] @ images @ cols[:, None].transpose(-1, -2)


def resize_weights(
    start: torch.Tensor, length: torch.Tensor, size: int, extent: int
) -> torch.Tensor:
    """float32 [B, size, extent]: bilinear antialiased resampling of pixels [start, start +
    length) of an axis of `extent` pixels to `size`, as `F.interpolate(antialias=True)` weighs
    them (PIL's rule): output i is centred at c = scale (i + 0.5), scale = length / size, and
    pixel t weighs max(0, 1 - |t + 0.5 - c| / max(scale, 1)), normalised to sum 1. Lengths
    must be >= 1 (not checked here: that would wait on the device)."""
    scale = (length.double() / size)[:, None, None]
    centre = (
        scale * (torch.arange(size, device=start.device, dtype=torch.float64) + 0.5)[None, :, None]
    )
    offset = (torch.arange(extent, device=start.device) - start[:, None])[:, None, :]
    weights = (1 - ((offset + 0.5 - centre) / scale.clamp(min=1.0)).abs()).clamp(min=0.0)
    weights = weights * ((offset >= 0) & (offset < length[:, None, None]))
    return (weights / weights.sum(-1, keepdim=True)).float()


def object_view_native(
    image: torch.Tensor, mask: torch.Tensor, box: Sequence[int], *, mode: str, patch_size: int
) -> torch.Tensor:
    """One object's view at its own resolution (the release): [3, H', W'], no resizing.

    `image` normalised [3, H, W], `mask` bool [H, W], `box` (x0, y0, x1, y1) on the host. The
    view (box crop or masked image) is padded at the bottom and right with the mean colour
    (0 once normalised) up to H', W', the next multiples of `patch_size`, as the release pads
    its crops for the ViT; the ViT interpolates its position embedding to that grid.
    """
    _check_mode(mode)
    x0, y0, x1, y1 = box
    height, width = image.shape[-2:]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} is empty or outside the {width}x{height} image")
    # masked: the mean colour normalises to 0
    view = image[:, y0:y1, x0:x1] if mode == "crop" else torch.where(mask, image, 0.0)
    pad_h, pad_w = -view.shape[-2] % patch_size, -view.shape[-1] % patch_size
    return F.pad(view, (0, pad_w, 0, pad_h), value=0.0)


def _check_mode(mode: str) -> None:
    if mode not in VIEW_MODES:
        raise ValueError(f"unknown object view mode {mode!r}; allowed: {', '.join(VIEW_MODES)}")


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


def sample_positions(total: int, count: int | None, *, seed: int) -> np.ndarray:
    """Sorted int64 positions of a uniform sample, without replacement, of `count` of `total`
    rows (`clustering.fit_samples`); every row, in order, when `count` is None or >= `total`,
    so the fit is then the paper's on all features. The same seed gives the same sample."""
    if count is not None and count < 1:
        raise ValueError(f"a sample needs at least one row, got count={count}")
    if count is None or count >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=count, replace=False, shuffle=False)).astype(np.int64)


def take_positions(
    blocks: Iterable[tuple[int, Callable[[], np.ndarray]]], positions: np.ndarray
) -> np.ndarray:
    """The rows at sorted global `positions` of consecutive row blocks, in order: each block
    is (its row count, a loader of its [n, D] rows), loaded only when a position falls in it
    and dropped once its chosen rows are copied, so memory holds the sample and one block."""
    chosen: list[np.ndarray] = []
    start = 0
    for count, load in blocks:
        low, high = np.searchsorted(positions, (start, start + count))
        if high > low:
            rows = load()
            if len(rows) != count:
                raise ValueError(f"a block said it holds {count} rows but loaded {len(rows)}")
            chosen.append(rows[positions[low:high] - start])
        start += count
    if len(positions) and (positions[-1] >= start or positions[0] < 0):
        raise ValueError(f"positions reach {positions[-1]}, the blocks hold {start} rows")
    return np.concatenate(chosen) if chosen else np.zeros((0, 0), dtype=np.float32)


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
