"""Decoding of real image bytes built in memory: conversions, orientation and every skip path."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from maskdistill.data.base import UnreadableImage
from maskdistill.data.images import IMAGE_EXTENSIONS, decode_image, read_image_file

ORIENTATION_TAG = 0x0112


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (CRC fixed up) claims width x height."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def skip_reason(data: bytes, **limits: int) -> str:
    with pytest.raises(UnreadableImage) as caught:
        decode_image(data, "img-1", **limits)
    assert caught.value.image_id == "img-1"
    return caught.value.reason


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 90}), ("BMP", {}), ("TIFF", {})],
)
def test_common_formats_decode_to_rgb_of_the_right_shape(fmt: str, options: dict[str, Any]) -> None:
    source = np.zeros((24, 40, 3), dtype=np.uint8)
    source[:, 20:] = (200, 30, 60)
    decoded = decode_image(encode(Image.fromarray(source), fmt, **options), "a")
    assert decoded.shape == (24, 40, 3)
    assert decoded.dtype == np.uint8
    assert decoded.flags.c_contiguous
    assert np.abs(decoded.astype(int) - source.astype(int)).mean() < 4


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_round_trip_exact_pixels(fmt: str) -> None:
    source = random_rgb(31, 17)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(source), fmt), "a"), source)


def test_extensions_cover_the_supported_formats() -> None:
    assert set(IMAGE_EXTENSIONS) >= {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


@pytest.mark.parametrize(("orientation", "rotate_clockwise"), [(1, 0), (3, 2), (6, 1), (8, 3)])
def test_exif_orientation_is_applied(orientation: int, rotate_clockwise: int) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :] = (0, 0, 255)
    stored[:8, :8] = (255, 0, 0)  # marks the stored top-left corner
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, "a")
    expected = np.rot90(stored, k=-rotate_clockwise)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 6


def test_orientation_6_puts_stored_top_left_at_top_right() -> None:
    stored = np.full((20, 40, 3), (0, 0, 255), dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    decoded = decode_image(encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes()), "a")
    assert decoded.shape == (40, 20, 3)
    top_right = decoded[1:7, 13:19].reshape(-1, 3).mean(axis=0)
    top_left = decoded[1:7, 1:7].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[2] < 60
    assert top_left[2] > 200 and top_left[0] < 60


def test_grayscale_becomes_three_equal_channels() -> None:
    grey = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    decoded = decode_image(encode(Image.fromarray(grey, mode="L"), "PNG"), "a")
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], grey)


def test_one_bit_image_becomes_black_and_white() -> None:
    bits = np.zeros((16, 24), dtype=bool)
    bits[:, 12:] = True
    decoded = decode_image(encode(Image.fromarray(bits), "PNG"), "a")
    np.testing.assert_array_equal(decoded[:, :, 1], np.where(bits, 255, 0))


def test_palette_image_uses_palette_colours() -> None:
    image = Image.new("P", (20, 20), 1)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 10, 20))
    decoded = decode_image(encode(image, "PNG"), "a")
    assert tuple(decoded[5, 2]) == (10, 20, 30)
    assert tuple(decoded[5, 15]) == (200, 100, 50)


def test_palette_with_transparency_keeps_colours_and_drops_alpha() -> None:
    image = Image.new("P", (20, 20), 1)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 10, 20))
    data = encode(image, "PNG", transparency=bytes([0, 128]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(data, "a")
    assert tuple(decoded[5, 2]) == (10, 20, 30)
    assert tuple(decoded[5, 15]) == (200, 100, 50)


def test_rgba_drops_alpha_without_compositing() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = (40, 80, 120)
    rgba[..., 3] = 0  # fully transparent: compositing over white would give 255s
    decoded = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), "a")
    assert decoded.shape == (16, 16, 3)
    assert np.all(decoded == np.array([40, 80, 120], dtype=np.uint8))


def test_cmyk_jpeg_pure_cyan_becomes_rgb_cyan() -> None:
    data = encode(Image.new("CMYK", (24, 24), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixel = decode_image(data, "a")[12, 12].astype(int)
    assert np.all(np.abs(pixel - np.array([0, 255, 255])) <= 8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_keeps_its_high_byte(fmt: str) -> None:
    values = np.full((20, 20), 0xABCD, dtype=np.uint16)
    values[:, 10:] = 0x0180
    data = encode(Image.fromarray(values), fmt)
    decoded = decode_image(data, "a")
    assert decoded.dtype == np.uint8
    assert np.all(decoded[:, :10] == 0xAB)
    assert np.all(decoded[:, 10:] == 0x01)


def test_big_endian_sixteen_bit_keeps_its_high_byte() -> None:
    image = Image.frombytes("I;16B", (16, 16), bytes([0xAB, 0xCD]) * 256)
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    assert np.all(decode_image(data, "a") == 0xAB)


def test_mode_i_in_sixteen_bit_range_keeps_its_high_byte() -> None:
    values = np.full((16, 16), 0xABCD, dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.all(decode_image(data, "a") == 0xAB)


def test_float_image_is_stretched_from_min_to_max() -> None:
    values = np.zeros((16, 16), dtype=np.float32)
    values[:, :4] = -1.0
    values[:, 4:8] = 3.0
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    decoded = decode_image(data, "a")
    assert np.all(decoded[:, :4] == 0)
    assert np.all(decoded[:, 4:8] == 255)
    assert np.all(decoded[:, 8:] == round(255 * 1 / 4))
    assert np.all(decoded[..., 0] == decoded[..., 2])


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_gives_its_first_frame(fmt: str) -> None:
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    data = encode(red, fmt, save_all=True, append_images=[blue], duration=100, lossless=True)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    decoded = decode_image(data, "a")
    assert decoded.shape == (20, 20, 3)
    assert np.all(decoded[..., 0] > 240) and np.all(decoded[..., 2] < 15)


def test_empty_bytes_are_skipped() -> None:
    assert skip_reason(b"") == "empty file"


def test_corrupt_bytes_are_skipped() -> None:
    reason = skip_reason(b"this is not an image at all" * 10)
    assert reason.startswith("not a decodable image")


def test_png_with_corrupt_body_is_skipped() -> None:
    data = bytearray(encode(Image.fromarray(random_rgb(32, 32)), "PNG"))
    data[60:100] = b"\x00" * 40
    assert skip_reason(bytes(data)).startswith("not a decodable image")


def test_truncated_jpeg_is_rejected_not_filled_in() -> None:
    data = encode(Image.fromarray(random_rgb(64, 64)), "JPEG")
    reason = skip_reason(data[: len(data) // 2])
    assert "truncated" in reason


def test_one_pixel_image_is_below_min_side() -> None:
    reason = skip_reason(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert reason == "image 1x1 is smaller than min_side=16"


def test_min_side_applies_to_the_shorter_side_only() -> None:
    narrow = encode(Image.new("RGB", (100, 15)), "PNG")
    assert skip_reason(narrow) == "image 100x15 is smaller than min_side=16"
    assert decode_image(encode(Image.new("RGB", (16, 16)), "PNG"), "a").shape == (16, 16, 3)
    assert decode_image(narrow, "a", min_side=8).shape == (15, 100, 3)


def test_image_over_max_pixels_is_skipped() -> None:
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    reason = skip_reason(data, max_pixels=4_999)
    assert reason == "100 x 50 = 5000 pixels exceeds max_pixels=4999 (possible decompression bomb)"
    assert decode_image(data, "a", max_pixels=5_000).shape == (50, 100, 3)


def test_header_over_max_pixels_is_rejected_before_decoding() -> None:
    data = png_with_header_size(3000, 2000)
    reason = skip_reason(data, max_pixels=1_000_000)
    assert reason.startswith("3000 x 2000 = 6000000 pixels exceeds max_pixels=1000000")


def test_huge_png_header_is_rejected_quickly() -> None:
    data = png_with_header_size(100_000, 100_000)
    started = time.perf_counter()
    reason = skip_reason(data)
    assert time.perf_counter() - started < 1.0
    assert "10000000000" in reason
    assert "decompression bomb" in reason


def test_pillow_bomb_warning_is_a_skip_and_global_state_is_untouched() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    data = png_with_header_size(10_000, 10_000)  # between Pillow's warning and error limits
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 <= 2 * Image.MAX_IMAGE_PIXELS
    reason = skip_reason(data, max_pixels=10**9)
    assert "decompression bomb" in reason
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == filters_before


def test_read_image_file_decodes_a_local_file(tmp_path: Path) -> None:
    source = random_rgb(20, 30)
    path = tmp_path / "a.png"
    Image.fromarray(source).save(path)
    np.testing.assert_array_equal(read_image_file(str(path), "a"), source)


def test_read_image_file_missing_file_is_skipped(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage) as caught:
        read_image_file(str(tmp_path / "missing.jpg"), "missing")
    assert caught.value.image_id == "missing"
    assert caught.value.reason.startswith("cannot read file")
    assert "missing.jpg" in caught.value.reason


def test_read_image_file_zero_byte_file_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty file"):
        read_image_file(str(path), "empty")


def test_read_image_file_directory_is_skipped(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match="cannot read file"):
        read_image_file(str(tmp_path), "dir")
