"""Pictures people look at: label colours, overlays, grids of tiles."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskdistill.data.base import IGNORE_INDEX


def voc_colormap(num_labels: int = 256) -> np.ndarray:
    """uint8 [num_labels, 3]: PASCAL VOC's colour of each label (bit-interleaved; 255 is
    VOC's void colour 224, 224, 192), the palette of VOC's label PNGs."""
    colours = np.zeros((num_labels, 3), dtype=np.uint8)
    for label in range(1, num_labels):
        value, r, g, b = label, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[label] = (r, g, b)
    return colours


def palette(num_labels: int) -> np.ndarray:
    """uint8 [max(num_labels, 256), 3]: 0 black, then VOC's bit-pattern colours, 255 white."""
    colours = voc_colormap(max(num_labels, 256))
    colours[IGNORE_INDEX] = 255
    return colours


def palette_png(labels: np.ndarray) -> bytes:
    """A label map (values 0-254) as an 8-bit palette PNG with VOC's colour map: the pixel
    values are the labels, viewers show VOC's colours."""
    if labels.size and (labels.min() < 0 or labels.max() >= IGNORE_INDEX):
        raise ValueError(
            f"a palette PNG holds labels 0-{IGNORE_INDEX - 1} ({IGNORE_INDEX} is VOC's void); "
            f"got {labels.min()}-{labels.max()}"
        )
    picture = Image.fromarray(labels.astype(np.uint8), mode="P")
    picture.putpalette(voc_colormap().ravel().tolist())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_boxes(
    image: np.ndarray,
    boxes: Sequence[tuple[float, float, float, float]],
    labels: Sequence[int],
    captions: Sequence[str],
) -> np.ndarray:
    """The image with each box (x0, y0, x1, y1) outlined in its label's colour, captioned."""
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    colours = palette(max(labels, default=0) + 1)
    for box, label, caption in zip(boxes, labels, captions, strict=True):
        colour = tuple(int(c) for c in colours[label])
        draw.rectangle(box, outline=colour, width=max(1, min(image.shape[:2]) // 200))
        draw.text((box[0] + 2, box[1] + 1), caption, fill=colour, font=font)
    return np.asarray(picture)


def colorize(labels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] colours of an int label map."""
    return palette(int(labels.max(initial=0)) + 1)[labels]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend label colours over the image where the label is not background (0)."""
    blended = image.astype(np.float32)
    shown = labels > 0
    blended[shown] = (1 - alpha) * blended[shown] + alpha * colorize(labels)[shown]
    return blended.round().astype(np.uint8)


def mask_tile(
    image: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, ...],
    *,
    colour: tuple[int, int, int] = (255, 64, 0),
) -> np.ndarray:
    """The image with `mask` tinted in `colour` and `box` (x0, y0, x1, y1) outlined in yellow."""
    tile = tint(image, mask, colour)
    x0, y0, x1, y1 = box
    thick = max(1, min(image.shape[:2]) // 100)
    for rows, cols in (
        (slice(y0, y0 + thick), slice(x0, x1)),
        (slice(y1 - thick, y1), slice(x0, x1)),
        (slice(y0, y1), slice(x0, x0 + thick)),
        (slice(y0, y1), slice(x1 - thick, x1)),
    ):
        tile[rows, cols] = (255, 255, 0)
    return tile


def tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """A copy of the image with the bool `mask` blended 55% towards `colour`."""
    tinted = image.astype(np.float32)
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.asarray(colour, dtype=np.float32)
    return tinted.round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: the mask's pixels with a 4-neighbour outside it (or on the border)."""
    inner = np.zeros_like(mask, dtype=bool)
    inner[1:-1, 1:-1] = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    return mask & ~inner


def image_grid(
    rows: Sequence[Sequence[np.ndarray]], *, tile: int = 160, gap: int = 4
) -> np.ndarray:
    """Tiles (uint8 [H, W, 3]) resized to `tile` px high and laid out row by row on white."""
    scaled = [[_fit_height(t, tile) for t in row] for row in rows]
    width = max(sum(t.shape[1] for t in row) + gap * (len(row) + 1) for row in scaled)
    canvas = np.full((len(rows) * (tile + gap) + gap, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(scaled):
        x = gap
        for t in row:
            y = gap + r * (tile + gap)
            canvas[y : y + tile, x : x + t.shape[1]] = t
            x += t.shape[1] + gap
    return canvas


def _fit_height(tile: np.ndarray, height: int) -> np.ndarray:
    width = max(1, round(tile.shape[1] * height / tile.shape[0]))
    return np.asarray(Image.fromarray(tile).resize((width, height), Image.Resampling.NEAREST))


def labelled_overlays(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    *,
    tile: int = 160,
) -> np.ndarray:
    """One row per image: image | ground truth | prediction (labels as class ids, IGNORE_INDEX
    white), over a colour legend naming every class."""
    tiles = [
        [image, overlay(image, truth), overlay(image, predicted)]
        for image, truth, predicted in rows
    ]
    grid = image_grid(tiles, tile=tile)
    key = legend(class_names, width=grid.shape[1])
    return np.concatenate([grid, key], axis=0)


def legend(class_names: Sequence[str], *, width: int, swatch: int = 12, gap: int = 6) -> np.ndarray:
    """uint8 [h, width, 3]: a colour swatch and the name of each label, wrapped into lines."""
    font = ImageFont.load_default()
    colours = palette(len(class_names))
    entries = [
        (colours[i], name, math.ceil(font.getlength(name))) for i, name in enumerate(class_names)
    ]
    lines: list[list[tuple[np.ndarray, str, int]]] = [[]]
    used = gap
    for entry in entries:
        size = swatch + 4 + entry[2] + 2 * gap
        if lines[-1] and used + size > width:
            lines.append([])
            used = gap
        lines[-1].append(entry)
        used += size
    picture = Image.new("RGB", (width, len(lines) * (swatch + gap) + gap), "white")
    draw = ImageDraw.Draw(picture)
    for row, line in enumerate(lines):
        x, y = gap, gap + row * (swatch + gap)
        for colour, name, length in line:
            draw.rectangle(
                (x, y, x + swatch, y + swatch), fill=tuple(int(c) for c in colour), outline="black"
            )
            draw.text((x + swatch + 4, y), name, fill="black", font=font)
            x += swatch + 4 + length + 2 * gap
    return np.asarray(picture)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file contents of a uint8 image, for writing through a RunDir."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
