"""Request images in, label maps out: decoding under limits and the three response formats.

Ray-free and HTTP-framework-free; every failure is an `ApiError` carrying its HTTP status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from maskdistill.data.base import UnreadableImage
from maskdistill.data.images import decode_image
from maskdistill.inference import Instance
from maskdistill.masks import encode_rle, mask_to_box
from maskdistill.visualize import overlay, palette, png_bytes

Format = Literal["png", "json", "overlay"]
InstanceFormat = Literal["json", "coco"]
# decode_image's reason for both its own header check and Pillow's bomb limit
_TOO_LARGE = "decompression bomb"
_UINT8_LABELS = 256


class ApiError(Exception):
    """A request the service refuses: `status` is the HTTP code, `message` goes to the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an uploaded file: 413 over `max_pixels` (read from the header,
    before any pixel is decoded), 400 when it is no decodable image. Any size from 1 x 1 works."""
    try:
        return decode_image(data, "image", max_pixels=max_pixels, min_side=1)
    except UnreadableImage as err:
        status = 413 if _TOO_LARGE in err.reason else 400
        raise ApiError(status, f"image: {err.reason}") from err


def label_png(labels: np.ndarray, *, num_classes: int) -> bytes:
    """Single-channel PNG of class indices: 8-bit up to 256 classes, else 16-bit."""
    dtype = np.uint8 if num_classes <= _UINT8_LABELS else np.uint16
    return png_bytes(labels.astype(dtype))


def class_table(labels: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """The classes present: label, name, pixel count and box [x0, y0, x1, y1] (x1, y1 exclusive)."""
    counts = np.bincount(labels.ravel(), minlength=len(names))
    classes = [
        {
            "label": label,
            "name": names[label],
            "pixels": int(counts[label]),
            "box": list(mask_to_box(labels == label)),
        }
        for label in np.flatnonzero(counts).tolist()
    ]
    return {"width": int(labels.shape[1]), "height": int(labels.shape[0]), "classes": classes}


def overlay_png(image: np.ndarray, labels: np.ndarray, *, alpha: float) -> bytes:
    """Colour PNG of the image with each non-background label's palette colour blended in."""
    return png_bytes(overlay(image, labels, alpha=alpha))


def class_list(names: Sequence[str]) -> list[dict[str, Any]]:
    """Every label with its name and the colour `overlay` paints it (background: none)."""
    colours = palette(len(names))
    return [
        {"label": label, "name": name, "color": [int(c) for c in colours[label]]}
        for label, name in enumerate(names)
    ]


def instance_table(
    instances: Sequence[Instance], *, width: int, height: int, tau: float
) -> dict[str, Any]:
    """The detector's kept instances: label, name, score, box [x0, y0, x1, y1] and COCO RLE."""
    return {
        "width": width,
        "height": height,
        "tau": tau,
        "instances": [
            {
                "label": instance.label,
                "name": instance.name,
                "score": instance.score,
                "box": list(instance.box),
                "segmentation": encode_rle(instance.mask),
            }
            for instance in instances
        ],
    }
