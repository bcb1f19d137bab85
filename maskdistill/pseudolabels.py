"""Pseudo-ground-truth semantic maps from confident Mask R-CNN candidates (Sec 3.3, Sec 4.1).

Label convention: 0 is background and cluster id `k` (0-based) becomes label `1 + k`, so a map
of C clusters holds 0..C. Maps are int64 in memory: C is a free hyper-parameter, and a narrower
type would silently collide with IGNORE_INDEX (255) or wrap; `encode_label_map` narrows them to
8 or 16 bits only for storage.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

MAX_STORED_LABEL = 65535  # the largest value a 16-bit PNG holds


@dataclass
class PseudoLabel:
    """One image's pseudo-label.

    label_map: int64 [H, W]; 0 background, 1 + cluster id where an accepted mask covers the pixel.
    kept: how many candidates were accepted.
    best_score: the highest candidate score (accepted or not); NaN when there are no candidates.
    """

    label_map: np.ndarray
    kept: int
    best_score: float


def confident_masks(
    scores: np.ndarray, *, tau: float = 0.9, keep_best_when_none: bool = True
) -> np.ndarray:
    """Indices (int64) of candidates with score > tau, most confident first (stable on ties)."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must lie in [0, 1), got tau={tau}")
    scores = _check_scores(scores)
    # Sec 3.3: accept {M_i | s_i > tau}, strictly greater.
    accepted = np.flatnonzero(scores > tau)
    if accepted.size == 0 and keep_best_when_none and scores.size > 0:
        # Sec 4.1: keep the most confident mask when thresholding excludes every prediction.
        return np.array([np.argmax(scores)], dtype=np.int64)
    order = np.argsort(-scores[accepted], kind="stable")
    return accepted[order].astype(np.int64, copy=False)


def stored_kept(row: Mapping[str, Any], *, tau: float, keep_best_when_none: bool) -> np.ndarray:
    """The candidates a stored distill row (PSEUDO_SCHEMA) kept: `confident_masks` of its scores
    at the stage's rule; ValueError when their number is not the row's `kept` (the row was made
    with another tau)."""
    scores = np.asarray(row["candidate_score"], dtype=np.float32)  # as the stage compared them
    kept = confident_masks(scores, tau=tau, keep_best_when_none=keep_best_when_none)
    if len(kept) != row["kept"]:
        raise ValueError(
            f"image {row['image_id']!r}: tau={tau} keeps {len(kept)} candidates but the stored "
            f"row kept {row['kept']}: the pseudo labels were made with another config"
        )
    return kept


def semantic_map(
    masks: np.ndarray, scores: np.ndarray, classes: np.ndarray, *, tau: float = 0.9
) -> np.ndarray:
    """The int64 [H, W] pseudo-label of one image's candidates: bool [M, H, W] masks,
    float [M] scores and int [M] 0-based cluster ids (Sec 3.3, with the Sec 4.1 fallback)."""
    return pseudo_label(masks, scores, classes, tau=tau).label_map


def pseudo_label(
    masks: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    *,
    tau: float = 0.9,
    keep_best_when_none: bool = True,
) -> PseudoLabel:
    """`semantic_map` with how many candidates it kept and the best candidate score."""
    masks, scores, classes = _check_candidates(masks, scores, classes)
    kept = confident_masks(scores, tau=tau, keep_best_when_none=keep_best_when_none)
    best_score = float(scores.max()) if scores.size else float("nan")
    return PseudoLabel(_paint(masks[kept], classes[kept]), int(kept.size), best_score)


def encode_label_map(label_map: np.ndarray) -> bytes:
    """Lossless PNG bytes of an integer [H, W] map: 8-bit (mode L) if every value < 256,
    else 16-bit (mode I;16); values outside 0..65535 raise ValueError."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.size == 0:
        raise ValueError(f"encode_label_map expects a non-empty [H, W] map, got {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"encode_label_map expects integer labels, got dtype {label_map.dtype}")
    low, high = int(label_map.min()), int(label_map.max())
    if low < 0 or high > MAX_STORED_LABEL:
        raise ValueError(
            f"label values must lie in 0..{MAX_STORED_LABEL} for a PNG, got {low}..{high}"
        )
    stored = label_map.astype(np.uint8 if high < 256 else "<u2")
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_label_map(data: bytes) -> np.ndarray:
    """The [H, W] map of `encode_label_map` bytes: uint8 for mode L, uint16 for 16-bit."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "I;16"):
            raise ValueError(f"a label-map PNG is mode L or I;16, got mode {image.mode}")
        return np.array(image)


def _paint(masks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Label map of masks ordered most confident first: each pixel takes its first covering mask.

    Sec 3.3: where accepted candidates overlap, only the most confident one is kept.
    """
    height, width = masks.shape[1:]
    if masks.shape[0] == 0:
        return np.zeros((height, width), dtype=np.int64)
    first = masks.argmax(axis=0)
    covered = masks.any(axis=0)
    return np.where(covered, 1 + classes[first], 0).astype(np.int64, copy=False)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    """Scores as float64 [M]; NaN is rejected since it has no place in the ranking."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape [M], got {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores must not contain NaN")
    return scores


def _check_candidates(
    masks: np.ndarray, scores: np.ndarray, classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one image's candidates; returns (bool masks, float64 scores, int64 classes)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [M, H, W], got {masks.shape}")
    if masks.dtype != bool:
        raise ValueError(f"masks must be bool, got dtype {masks.dtype}")
    scores = _check_scores(scores)
    classes = np.asarray(classes)
    if classes.ndim != 1:
        raise ValueError(f"classes must have shape [M], got {classes.shape}")
    if not len(masks) == len(scores) == len(classes):
        raise ValueError(
            f"candidate counts differ: {len(masks)} masks, {len(scores)} scores, "
            f"{len(classes)} classes"
        )
    if classes.size and not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be integer cluster ids, got dtype {classes.dtype}")
    if classes.size and classes.min() < 0:
        raise ValueError(f"classes must be 0-based cluster ids >= 0, got {int(classes.min())}")
    return masks, scores, classes.astype(np.int64, copy=False)
