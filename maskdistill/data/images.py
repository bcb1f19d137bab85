"""Safe decoding of untrusted image bytes into uint8 RGB arrays.

Every failure becomes `UnreadableImage` with a short reason, so readers can skip the input.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image, ImageOps, UnidentifiedImageError

from maskdistill.data.base import UnreadableImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MIN_SIDE = 16

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_UINT16_MAX = 0xFFFF
# What Pillow raises on malformed input, besides the decompression-bomb checks.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def decode_image(
    data: bytes,
    image_id: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Decode `data` to a C-contiguous uint8 [H, W, 3] RGB array, EXIF orientation applied.

    Size limits are checked from the header before any pixel is decoded; Pillow's own
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS, left unchanged) applies as well.
    Animated images give their first frame. Alpha is dropped, not composited; 16-bit
    grey keeps its high byte; mode I outside 0..65535 and float F are stretched min..max.
    """
    if not data:
        raise UnreadableImage(image_id, "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(data, image_id)
        _check_size(image.size, image_id, max_pixels, min_side)
        _load_oriented(image, image_id)
    return _to_rgb_array(image, image_id)


def read_image_file(
    path: str,
    image_id: str,
    *,
    filesystem: pafs.FileSystem | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Read `path` through `filesystem` (local when None) and decode it like `decode_image`."""
    if filesystem is None:
        filesystem, path = pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except (OSError, pa.ArrowException) as err:
        raise UnreadableImage(image_id, f"cannot read file: {err}") from err
    return decode_image(data, image_id, max_pixels=max_pixels, min_side=min_side)


def _open(data: bytes, image_id: str) -> Image.Image:
    """Parse the header only; pixels are decoded later by `load`."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise UnreadableImage(image_id, "not a decodable image: unknown image format") from err
    except _BOMB_ERRORS as err:
        raise UnreadableImage(image_id, f"possible decompression bomb: {err}") from err
    except _DECODE_ERRORS as err:
        raise UnreadableImage(image_id, f"not a decodable image: {err}") from err


def _check_size(size: tuple[int, int], image_id: str, max_pixels: int, min_side: int) -> None:
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        reason = (
            f"{width} x {height} = {pixels} pixels exceeds max_pixels={max_pixels}"
            " (possible decompression bomb)"
        )
        raise UnreadableImage(image_id, reason)
    if min(width, height) < min_side:
        raise UnreadableImage(
            image_id, f"image {width}x{height} is smaller than min_side={min_side}"
        )


def _load_oriented(image: Image.Image, image_id: str) -> None:
    """Decode the first frame's pixels (truncation is an error) and apply EXIF orientation."""
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except _BOMB_ERRORS as err:
        raise UnreadableImage(image_id, f"possible decompression bomb: {err}") from err
    except _DECODE_ERRORS as err:
        raise UnreadableImage(image_id, f"not a decodable image: {err}") from err


def _to_rgb_array(image: Image.Image, image_id: str) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    elif image.mode == "I":
        grey = _int32_to_uint8(np.asarray(image))
    elif image.mode == "F":
        grey = _stretch_to_uint8(np.asarray(image))
    else:
        return np.ascontiguousarray(np.array(_convert_rgb(image, image_id), dtype=np.uint8))
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _convert_rgb(image: Image.Image, image_id: str) -> Image.Image:
    try:
        if image.mode == "P":
            image = image.convert("RGBA")  # palettes with tRNS bytes only convert via RGBA
        return image.convert("RGB")
    except ValueError as err:
        raise UnreadableImage(image_id, f"cannot convert mode {image.mode} to RGB: {err}") from err


def _int32_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit data stored as mode I keeps its high byte; wider ranges are stretched."""
    if values.size and values.min() >= 0 and values.max() <= _UINT16_MAX:
        return (values >> 8).astype(np.uint8)
    return _stretch_to_uint8(values)


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the finite min..max linearly onto 0..255; non-finite values become 0."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if not finite.any():
        return out
    low, high = values[finite].min(), values[finite].max()
    if high > low:
        scaled = np.rint((values[finite] - low) * (255.0 / (high - low)))
        out[finite] = np.clip(scaled, 0, 255).astype(np.uint8)
    return out
