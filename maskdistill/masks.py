"""Binary masks: COCO RLE, boxes, nearest-neighbour resizing, padding to the ViT patch grid."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask

Array = TypeVar("Array", np.ndarray, torch.Tensor)
Box = tuple[int, int, int, int]


def encode_rle(mask: np.ndarray) -> dict[str, object]:
    """COCO RLE of a [H, W] mask, `counts` as text so it fits JSON and Parquet strings."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects a [H, W] mask, got shape {mask.shape}")
    pixels = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8, copy=False)
    rle = coco_mask.encode(np.asfortranarray(pixels))  # no copy for a column-major bool mask
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, object]) -> np.ndarray:
    """The bool [H, W] mask of a COCO RLE (text or bytes counts)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return coco_mask.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)  # type: ignore[call-overload]


def mask_to_box(mask: np.ndarray) -> Box:
    """(x0, y0, x1, y1) in pixel-edge coordinates: x1, y1 are one past the last mask pixel."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("an empty mask has no bounding box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def best_match_iou(mask: np.ndarray, objects: np.ndarray) -> float:
    """IoU of a bool [H, W] mask with the best-matching of the bool [M, H, W] objects (0: none)."""
    if mask.shape != objects.shape[1:]:
        raise ValueError(f"mask {mask.shape} and objects {objects.shape} differ in size")
    if len(objects) == 0:
        return 0.0
    inter = (objects & mask).reshape(len(objects), -1).sum(1)
    union = (objects | mask).reshape(len(objects), -1).sum(1)
    return float((inter / np.maximum(union, 1)).max())


def resize_nearest(mask: Array, size: tuple[int, int]) -> Array:
    """Resize the last two axes to `size` = (H, W) by nearest neighbour (pixel-centre aligned).

    Output pixel i takes input pixel floor((i + 0.5) * n_in / n_out), so an integer upscale
    repeats every input pixel exactly `scale` times (a patch becomes an S x S block).
    """
    rows = nearest_index(mask.shape[-2], size[0])
    cols = nearest_index(mask.shape[-1], size[1])
    if isinstance(mask, torch.Tensor):
        return mask[
            ...,
            torch.as_tensor(rows, device=mask.device)[:, None],
            torch.as_tensor(cols, device=mask.device),
        ]
    return mask[..., rows[:, None], cols]


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """For each of `n_out` output pixels, the input pixel `resize_nearest` takes."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def pad_to_multiple(images: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two axes at the bottom and right up to multiples of `multiple`."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), value=value)


def patch_grid(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patches covering an image of `size` = (H, W) once padded to the patch size."""
    return -(-size[0] // patch_size), -(-size[1] // patch_size)
