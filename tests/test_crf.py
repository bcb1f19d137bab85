"""Dense CRF post-processing ([46], Table 2 "+CRF"): cleaning, smoothing, exactness, errors."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from maskdistill import crf
from maskdistill.crf import dense_crf

needs_densecrf = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None, reason=f"needs the crf extra: {crf.INSTALL}"
)

DEFAULTS = dict(
    w_appearance=4.0, theta_alpha=67.0, theta_beta=3.0, w_smoothness=3.0, theta_gamma=1.0
)
RED, BLUE = (220, 40, 40), (40, 60, 220)


def _halves(size: int, *, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red | blue image, its true labels, and unaries (0.6 / 0.4) wrong at `flip` of pixels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, size // 2 :] = 1
    image = np.where(truth[..., None] == 1, BLUE, RED).astype(np.uint8)
    noisy = np.where(rng.random(truth.shape) < flip, 1 - truth, truth)
    one = np.where(noisy == 1, 0.6, 0.4)
    return image, truth, np.stack([1 - one, one]).astype(np.float32)


def _exact_mean_field(
    image: np.ndarray, probabilities: np.ndarray, *, iterations: int, **kernel: float
) -> np.ndarray:
    """[46] Alg 1 with every pixel pair filtered exactly, kernels normalised like pydensecrf's
    (D^-1/2 K D^-1/2, the pixel itself included), Potts compatibility."""
    classes, height, width = probabilities.shape
    y, x = np.mgrid[:height, :width]
    positions = np.stack([x.ravel(), y.ravel()], axis=1).astype(np.float64)
    colours = image.reshape(-1, 3).astype(np.float64)

    def normalised(features: np.ndarray) -> np.ndarray:
        gram = np.exp(-((features[:, None] - features[None]) ** 2).sum(-1) / 2)
        norm = 1 / np.sqrt(gram.sum(axis=1))
        return norm[:, None] * gram * norm[None]

    smoothness = normalised(positions / kernel["theta_gamma"])
    appearance = normalised(
        np.hstack([positions / kernel["theta_alpha"], colours / kernel["theta_beta"]])
    )
    unary = -np.log(np.clip(probabilities.reshape(classes, -1), 1e-8, None))

    def softmax(energy: np.ndarray) -> np.ndarray:
        exp = np.exp(energy - energy.max(axis=0))
        return exp / exp.sum(axis=0)

    q = softmax(-unary)
    for _ in range(iterations):
        # Potts: the message for label l is +w * (filtered Q)(l) up to a per-pixel constant.
        message = kernel["w_smoothness"] * q @ smoothness + kernel["w_appearance"] * q @ appearance
        q = softmax(-unary + message)
    return q.reshape(classes, height, width)


@needs_densecrf
def test_noisy_labelling_of_a_two_colour_image_is_cleaned() -> None:
    image, truth, probabilities = _halves(32, flip=0.25, seed=0)
    before = (probabilities.argmax(axis=0) != truth).mean()
    after = (dense_crf(image, probabilities) != truth).mean()
    assert before > 0.2
    assert after < 0.01
    unchanged = dense_crf(image, probabilities, iterations=0)
    np.testing.assert_array_equal(unchanged, probabilities.argmax(axis=0))
    assert unchanged.dtype == np.int64 and unchanged.shape == truth.shape


@needs_densecrf
def test_uniform_image_keeps_the_argmax_of_smoothed_unaries() -> None:
    # Colour carries no information: the CRF only smooths the unaries spatially.
    grey = np.full((24, 24, 3), 128, dtype=np.uint8)
    constant = np.broadcast_to(np.array([0.2, 0.5, 0.3])[:, None, None], (3, 24, 24))
    np.testing.assert_array_equal(dense_crf(grey, constant.astype(np.float32)), 1)
    # Smoothing scale 3 px: the noise goes (a quarter of the pixels), the two halves stay; a
    # few pixels may go either way next to the boundary between columns 11 and 12.
    _, truth, probabilities = _halves(24, flip=0.25, seed=1)
    local = dict(DEFAULTS, theta_alpha=3.0)
    _, wrong_columns = np.nonzero(dense_crf(grey, probabilities, **local) != truth)
    assert len(wrong_columns) <= 5
    assert set(wrong_columns.tolist()) <= {10, 11, 12, 13}
    # The default 67 px is wider than the image: all of it takes the label of larger total mass.
    probabilities[:, :, 12:14] = probabilities[::-1, :, 12:14]  # two more columns of class 0
    assert probabilities[0].sum() > probabilities[1].sum()
    np.testing.assert_array_equal(dense_crf(grey, probabilities), 0)


@needs_densecrf
def test_lattice_approximation_agrees_with_exact_filtering_on_a_tiny_image() -> None:
    # One update (one message pass) is within 0.1 of the exact marginals at every pixel.
    # Over iterations, pixels near 0.5 can tip either way; a wide appearance kernel
    # (w 10, theta_alpha 5, theta_beta 13) reaches the same fixed point as exact filtering.
    image, _, probabilities = _halves(12, flip=0.3, seed=2)
    jitter = np.random.default_rng(3).integers(-20, 21, image.shape)
    image = np.clip(image + jitter, 0, 255).astype(np.uint8)
    wide = dict(DEFAULTS, w_appearance=10.0, theta_alpha=5.0, theta_beta=13.0, theta_gamma=3.0)
    for kernel in (DEFAULTS, wide):
        exact = _exact_mean_field(image, probabilities, iterations=1, **kernel)
        approximate = crf._mean_field(image, probabilities, iterations=1, **kernel)
        assert np.abs(exact - approximate).max() < 0.1
        assert np.abs(exact - approximate).mean() < 0.015
        exact = _exact_mean_field(image, probabilities, iterations=5, **kernel)
        approximate = crf._mean_field(image, probabilities, iterations=5, **kernel)
        assert (exact.argmax(axis=0) == approximate.argmax(axis=0)).mean() >= 0.9
    assert np.abs(exact - approximate).max() < 0.01


def test_bad_inputs_name_the_problem() -> None:
    image, _, probabilities = _halves(8, flip=0.0, seed=0)
    with pytest.raises(ValueError, match="image must be uint8 RGB"):
        dense_crf(image.astype(np.float32), probabilities)
    with pytest.raises(ValueError, match=r"\[C, 8, 8\] like the image, got \(2, 8, 7\)"):
        dense_crf(image, probabilities[:, :, :7])
    with pytest.raises(ValueError, match="sum to 1.*0.5"):
        dense_crf(image, probabilities * 0.5)
    with pytest.raises(ValueError, match="finite and >= 0"):
        dense_crf(image, np.stack([probabilities[0] + 1, -probabilities[0]]))
    with pytest.raises(ValueError, match="must be float"):
        dense_crf(image, (probabilities > 0.5).astype(np.int64))
    with pytest.raises(ValueError, match="theta_beta=0"):
        dense_crf(image, probabilities, theta_beta=0)
    with pytest.raises(ValueError, match="iterations=-1"):
        dense_crf(image, probabilities, iterations=-1)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    image, _, probabilities = _halves(8, flip=0.0, seed=0)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match=r"pip install 'maskdistill\[crf\]'"):
        dense_crf(image, probabilities)
