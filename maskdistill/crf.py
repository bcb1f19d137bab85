"""Optional dense CRF post-processing ([46] Krähenbühl & Koltun 2011; Table 2 "+CRF", Sec S1).

A fully connected CRF over the pixels with Gaussian edge potentials and the Potts model,
solved by mean-field inference. The inference is pydensecrf2's (Krähenbühl's C++ code, the
`crf` extra): its message passing filters with the permutohedral lattice, an approximation of
the Gaussian filtering that costs O(N) per iteration instead of O(N^2), and it normalises each
kernel symmetrically (D^-1/2 K D^-1/2, D the kernel's row sums, the pixel itself included).
pydensecrf2 ships no wheel: pip builds it from source, so a C++ compiler must be present.

Tuning notes (DeepLab-v2, whose ResNet-101 values on PASCAL VOC are the defaults here): the
smoothness kernel (w 3, theta_gamma 1 px) only removes isolated pixels; the appearance kernel
(w 4, theta_alpha 67 px, theta_beta 3 colour levels) snaps labels to colour edges. Larger
theta_beta or w_appearance spreads labels across similar colours; the paper warns the weights
are best set on a small annotated validation set (S1). On one CPU core a 512 x 512 image with 21
classes takes 1-3 s for 10 iterations; `crf_labels` drops absent classes (benchmarks/crf_speed.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from maskdistill.config import CRFConfig
from maskdistill.masks import resize_nearest

INSTALL = "pip install 'maskdistill[crf]'  (builds pydensecrf2; needs a C++ compiler)"
_MIN_PROBABILITY = 1e-8  # unaries are -log p; p = 0 would be an infinite energy
_SUM_TOLERANCE = 1e-3


def dense_crf(
    image: np.ndarray,
    probabilities: np.ndarray,
    *,
    iterations: int = 10,
    w_appearance: float = 4.0,
    theta_alpha: float = 67.0,
    theta_beta: float = 3.0,
    w_smoothness: float = 3.0,
    theta_gamma: float = 1.0,
) -> np.ndarray:
    """[46]: the labels int64 [H, W] of the dense CRF's mean-field marginals after `iterations`.

    image: uint8 RGB [H, W, 3]; probabilities: float [C, H, W], per pixel a distribution (the
    segmenter's softmax), giving the unary energy -log p. Pairwise energy for labels that
    differ (Potts): w_appearance exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 /
    2 theta_beta^2) + w_smoothness exp(-|p_i - p_j|^2 / 2 theta_gamma^2), positions p in
    pixels, colours I in 0..255. iterations 0 gives the argmax of `probabilities`.
    """
    marginals = _mean_field(
        image,
        probabilities,
        iterations=iterations,
        w_appearance=w_appearance,
        theta_alpha=theta_alpha,
        theta_beta=theta_beta,
        w_smoothness=w_smoothness,
        theta_gamma=theta_gamma,
    )
    return marginals.argmax(axis=0).astype(np.int64)


def crf_labels(image: np.ndarray, probabilities: np.ndarray, settings: CRFConfig) -> np.ndarray:
    """`dense_crf` with the config's kernels and speed knobs: int64 labels [H, W].

    Classes whose probability stays below `settings.min_probability` at every pixel are left
    out (the kept ones renormalised, which shifts each pixel's unaries by one constant and so
    changes nothing); a dropped class's messages stay O(min_probability), so the labels match
    the full CRF's but for near-ties (benchmarks/crf_speed.py). One kept class is the answer
    without a CRF. With `settings.max_side` the CRF runs on the image shrunk to that longer
    side (probabilities area-averaged, kernel widths in pixels scaled alike) and its labels are
    upsampled nearest.
    """
    _check_inputs(image, probabilities)
    height, width = image.shape[:2]
    kept = kept_classes(probabilities, settings.min_probability)
    if len(kept) == 1:
        return np.full((height, width), kept[0], dtype=np.int64)
    chosen = probabilities[kept].astype(np.float32)
    chosen /= chosen.sum(axis=0, keepdims=True)
    scale = 1.0
    if settings.max_side is not None and max(height, width) > settings.max_side:
        scale = settings.max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = np.array(Image.fromarray(image).resize(size[::-1], Image.Resampling.BOX))
        chosen = F.interpolate(torch.from_numpy(chosen)[None], size=size, mode="area")[0].numpy()
    labels = dense_crf(
        image,
        chosen,
        iterations=settings.iterations,
        w_appearance=settings.w_appearance,
        theta_alpha=settings.theta_alpha * scale,
        theta_beta=settings.theta_beta,
        w_smoothness=settings.w_smoothness,
        theta_gamma=settings.theta_gamma * scale,
    )
    if labels.shape != (height, width):
        labels = resize_nearest(labels, (height, width))
    return kept[labels]


def kept_classes(probabilities: np.ndarray, min_probability: float) -> np.ndarray:
    """int64 ids of the classes reaching `min_probability` somewhere in the image; the one
    with the highest peak at least."""
    peak = probabilities.reshape(len(probabilities), -1).max(axis=1)
    keep = peak >= min_probability
    keep[int(peak.argmax())] = True
    return np.flatnonzero(keep).astype(np.int64)


def _mean_field(
    image: np.ndarray,
    probabilities: np.ndarray,
    *,
    iterations: int,
    w_appearance: float,
    theta_alpha: float,
    theta_beta: float,
    w_smoothness: float,
    theta_gamma: float,
) -> np.ndarray:
    """float32 [C, H, W]: the marginals Q after `iterations` mean-field updates ([46] Alg 1)."""
    _check_inputs(image, probabilities)
    _check_parameters(
        iterations=iterations,
        w_appearance=w_appearance,
        theta_alpha=theta_alpha,
        theta_beta=theta_beta,
        w_smoothness=w_smoothness,
        theta_gamma=theta_gamma,
    )
    densecrf = _densecrf()
    classes, height, width = probabilities.shape
    unary = -np.log(np.clip(probabilities, _MIN_PROBABILITY, None))
    crf = densecrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(classes, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=theta_gamma, compat=w_smoothness)
    crf.addPairwiseBilateral(
        sxy=theta_alpha, srgb=theta_beta, rgbim=np.ascontiguousarray(image), compat=w_appearance
    )
    marginals = np.asarray(crf.inference(iterations), dtype=np.float32)
    return marginals.reshape(classes, height, width)


def _densecrf() -> Any:
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as err:
        raise ImportError(f"dense CRF post-processing needs pydensecrf2: {INSTALL}") from err
    return densecrf


def _check_inputs(image: np.ndarray, probabilities: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
    if probabilities.ndim != 3 or probabilities.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probabilities must be [C, {image.shape[0]}, {image.shape[1]}] like the image, "
            f"got {probabilities.shape}"
        )
    if probabilities.shape[0] < 1 or not np.issubdtype(probabilities.dtype, np.floating):
        raise ValueError(f"probabilities must be float with C >= 1, got {probabilities.dtype}")
    if not np.isfinite(probabilities).all() or (probabilities < 0).any():
        raise ValueError("probabilities must be finite and >= 0")
    sums = probabilities.sum(axis=0, dtype=np.float64)
    worst = float(np.abs(sums - 1.0).max())
    if worst > _SUM_TOLERANCE:
        raise ValueError(
            f"probabilities must sum to 1 over the classes at every pixel; off by up to {worst:.3g}"
        )


def _check_parameters(**values: float) -> None:
    if values["iterations"] < 0 or values["iterations"] != int(values["iterations"]):
        raise ValueError(f"iterations={values['iterations']}: expected an integer >= 0")
    for name in ("theta_alpha", "theta_beta", "theta_gamma"):
        if not values[name] > 0:
            raise ValueError(f"{name}={values[name]}: expected > 0")
    for name in ("w_appearance", "w_smoothness"):
        if not values[name] >= 0:
            raise ValueError(f"{name}={values[name]}: expected >= 0")
