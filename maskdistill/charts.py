"""Line charts as pictures (PIL only): the K sweep of `clustering.num_clusters: auto`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskdistill.clustering import KScore

_MARGIN = (56, 28, 16, 36)  # left, top, right, bottom
_LINE = (31, 119, 180)
_MARK = (214, 39, 40)


def line_chart(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    title: str,
    x_label: str,
    mark: float | None = None,
    size: tuple[int, int] = (560, 260),
) -> np.ndarray:
    """uint8 [H, W, 3]: `ys` against `xs` with dots, axis ticks at the ends, the x value `mark`
    as a red vertical line. Non-finite ys are left out."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"line_chart needs as many xs as ys, at least one: {len(xs)}, {len(ys)}")
    width, height = size
    left, top, right, bottom = _MARGIN
    finite = [(x, y) for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
    x_low, x_high = min(xs), max(xs)
    y_low = min((y for _, y in finite), default=0.0)
    y_high = max((y for _, y in finite), default=1.0)
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        fx = 0.5 if x_high == x_low else (x - x_low) / (x_high - x_low)
        fy = (y - y_low) / (y_high - y_low)
        return left + fx * (width - left - right), top + (1 - fy) * (height - top - bottom)

    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    draw.rectangle((left, top, width - right, height - bottom), outline=(160, 160, 160))
    if mark is not None:
        x, _ = at(mark, y_low)
        draw.line((x, top, x, height - bottom), fill=_MARK, width=2)
    points = [at(x, y) for x, y in finite]
    if len(points) > 1:
        draw.line(points, fill=_LINE, width=2)
    for x, y in points:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=_LINE)
    draw.text((left, 8), title, fill="black", font=font)
    for value in (y_low, y_high):
        _, y = at(x_low, value)
        draw.text((4, y - 6), f"{value:.3g}", fill="black", font=font)
    for value in sorted({x_low, x_high, *([mark] if mark is not None else [])}):
        x, _ = at(value, y_low)
        draw.text((x - 6, height - bottom + 4), f"{value:g}", fill="black", font=font)
    draw.text((width // 2 - 4 * len(x_label), height - 16), x_label, fill="black", font=font)
    return np.asarray(picture)


def k_sweep_chart(scores: Sequence[KScore], chosen: int | None = None) -> np.ndarray:
    """The silhouette (the criterion, higher is better) over the inertia, both against K, the
    chosen K marked."""
    ks = [s.k for s in scores]
    best = f", chosen K = {chosen}" if chosen is not None else ""
    upper = line_chart(
        ks,
        [s.silhouette for s in scores],
        title=f"mean silhouette (higher is better){best}",
        x_label="K",
        mark=chosen,
    )
    lower = line_chart(
        ks,
        [s.inertia for s in scores],
        title="inertia (falls as K grows)",
        x_label="K",
        mark=chosen,
    )
    return np.concatenate([upper, lower], axis=0)
