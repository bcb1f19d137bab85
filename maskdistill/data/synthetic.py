"""Synthetic scenes: textured objects on cluttered backgrounds, with exact ground truth.

A class is a shape together with an appearance pattern; the pattern's two colours are drawn at
random for every object, so colour never tells classes apart. Every image is generated on its
own from `np.random.default_rng((seed, split_index, index))`, in any order and any process.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from maskdistill.data.base import Sample

Array = np.ndarray
Shape = Callable[[Array, Array], Array]
Pattern = Callable[[Array, Array, Array], Array]
Layout = tuple[list["SceneObject"], Array, Array]  # objects, full masks, visible masks

CLASS_TABLE: tuple[tuple[str, str], ...] = (
    ("disc", "stripes"),
    ("square", "checker"),
    ("triangle", "dots"),
    ("star", "rings"),
    ("ring", "speckle"),
    ("cross", "zigzag"),
    ("hexagon", "grid"),
    ("ellipse", "spokes"),
    ("diamond", "spiral"),
    ("crescent", "blotches"),
)
SPLITS = ("train", "val", "test")  # "test": held out from every stage (the demo query)
MAX_OBJECTS = 10
MIN_SIDE = 16
_EXTENT = 1.2  # every shape lies inside this radius of its own frame
_PLACEMENT_TRIES = 25
_LAYOUT_TRIES = 200


def _polygon(n: int, circumradius: float) -> Shape:
    normals = [2 * math.pi * (k + 0.5) / n for k in range(n)]
    inradius = circumradius * math.cos(math.pi / n)
    return lambda u, v: np.all([u * math.cos(a) + v * math.sin(a) <= inradius for a in normals], 0)


def _star(u: Array, v: Array, outer: float = 1.1, inner: float = 0.5) -> Array:
    half = math.pi / 5
    t = np.abs(np.mod(np.arctan2(v, u) + half, 2 * half) - half)
    rho = np.hypot(u, v)
    dx, dy = inner * math.cos(half) - outer, inner * math.sin(half)
    return dx * rho * np.sin(t) - dy * (rho * np.cos(t) - outer) >= 0


SHAPES: dict[str, Shape] = {
    "disc": lambda u, v: u**2 + v**2 <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": _polygon(3, 1.15),
    "star": _star,
    "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.55**2),
    "cross": lambda u, v: (
        (np.minimum(np.abs(u), np.abs(v)) <= 0.33) & (np.maximum(np.abs(u), np.abs(v)) <= 1.0)
    ),
    "hexagon": _polygon(6, 1.0),
    "ellipse": lambda u, v: (u / 1.15) ** 2 + (v / 0.62) ** 2 <= 1.0,
    "diamond": lambda u, v: np.abs(u) / 1.15 + np.abs(v) / 0.7 <= 1.0,
    "crescent": lambda u, v: (u**2 + v**2 <= 1.0) & ((u - 0.5) ** 2 + v**2 >= 0.7**2),
}


def _bands(x: Array, width: float) -> Array:
    return np.floor(x / width).astype(np.int64) % 2 == 1


def _blotches(u: Array, v: Array, z: Array) -> Array:
    """Camouflage: the sign of four plane waves of random direction, 3-6 radians per radius."""
    angle, freq = 2 * math.pi * z[:4, 0], 3 + 3 * z[:4, 1]
    waves = [
        np.sin(f * (u * math.cos(a) + v * math.sin(a)) + 2 * math.pi * p)
        for a, f, p in zip(angle, freq, z[:4, 2], strict=True)
    ]
    return np.sum(waves, axis=0) > 0


# Patterns take the object frame (u, v) and the object's own random numbers z in [0, 1)^(24, 24).
PATTERNS: dict[str, Pattern] = {
    "stripes": lambda u, v, z: _bands(v + z[0, 0], 0.25),
    "checker": lambda u, v, z: _bands(u + z[0, 0], 0.4) ^ _bands(v + z[0, 1], 0.4),
    "dots": lambda u, v, z: (
        (np.mod(u + z[0, 0], 0.45) - 0.225) ** 2 + (np.mod(v + z[0, 1], 0.45) - 0.225) ** 2
        <= 0.12**2
    ),
    "rings": lambda u, v, z: _bands(np.hypot(u, v) + 0.1 * z[0, 0], 0.22),
    "speckle": lambda u, v, z: (
        z[np.floor(v / 0.1).astype(np.int64) % 24, np.floor(u / 0.1).astype(np.int64) % 24] < 0.2
    ),
    "zigzag": lambda u, v, z: _bands(v + 0.3 * np.abs(np.mod(u / 0.4 + z[0, 0], 2) - 1), 0.2),
    "grid": lambda u, v, z: (np.mod(u + z[0, 0], 0.4) < 0.1) | (np.mod(v + z[0, 1], 0.4) < 0.1),
    "spokes": lambda u, v, z: _bands(np.arctan2(v, u) + math.pi, math.pi / 5),
    "spiral": lambda u, v, z: (
        np.mod(np.arctan2(v, u) / (2 * math.pi) + np.hypot(u, v) / 0.45, 1) < 0.5
    ),
    "blotches": _blotches,
}


@dataclass(frozen=True)
class SceneObject:
    """One object: its class, where it lies (pixels, radians) and its two pattern colours."""

    class_id: int
    center: tuple[float, float]  # (y, x)
    radius: float
    angle: float
    colours: Array  # float [2, 3] RGB in 0..255
    texture: Array  # float [24, 24] in [0, 1), the pattern's own random numbers


@dataclass
class Scene:
    """A rendered image with, per object in painting order, its full and visible masks."""

    image: Array
    objects: list[SceneObject]
    full_masks: Array  # bool [N, H, W]: each object inside the image, ignoring occluders
    visible_masks: Array  # bool [N, H, W]: what later objects leave uncovered

    def visible_fractions(self) -> Array:
        full = self.full_masks.reshape(len(self.objects), -1).sum(1)
        return self.visible_masks.reshape(len(self.objects), -1).sum(1) / full


def _frame(obj: SceneObject, size: tuple[int, int]) -> tuple[tuple[slice, slice], Array, Array]:
    """Crop around the object and the crop's pixel centres in the object's unit frame."""
    (cy, cx), reach = obj.center, obj.radius * _EXTENT
    rows = slice(max(0, math.floor(cy - reach)), min(size[0], math.ceil(cy + reach)))
    cols = slice(max(0, math.floor(cx - reach)), min(size[1], math.ceil(cx + reach)))
    dy = (np.arange(rows.start, rows.stop) + 0.5 - cy)[:, None]
    dx = (np.arange(cols.start, cols.stop) + 0.5 - cx)[None, :]
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    return (rows, cols), (dx * cos + dy * sin) / obj.radius, (dy * cos - dx * sin) / obj.radius


def _hsv(h: float, s: float, v: float) -> Array:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _pattern_colours(rng: np.random.Generator) -> Array:
    """Two colours of random hue, distinct in hue and in brightness."""
    hue = rng.random()
    light, dark = rng.uniform(0.75, 1.0), rng.uniform(0.2, 0.5)
    values = (light, dark) if rng.random() < 0.5 else (dark, light)
    hues = (hue, hue + rng.uniform(0.15, 0.85))
    return np.stack(
        [_hsv(h, rng.uniform(0.45, 1.0), val) for h, val in zip(hues, values, strict=True)]
    )


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Array:
    """Smooth colour noise, bilinearly upsampled from a coarse random grid (float32 RGB)."""
    gh, gw = (int(n) for n in rng.integers(3, 7, size=2))
    colours = [
        _hsv(rng.random(), rng.uniform(0.1, 0.8), rng.uniform(0.15, 0.9)) for _ in range(gh * gw)
    ]
    grid = np.stack(colours).reshape(gh, gw, 3).astype(np.float32)
    rows = (_lerp_matrix(size[0], gh) @ grid.reshape(gh, gw * 3)).reshape(size[0], gw, 3)
    return _lerp_matrix(size[1], gw) @ rows


def _lerp_matrix(n: int, knots: int) -> Array:
    """[n, knots] weights that linearly interpolate `knots` evenly spaced values at n points."""
    pos = np.linspace(0, knots - 1, n, dtype=np.float32)[:, None]
    return np.maximum(0, 1 - np.abs(pos - np.arange(knots, dtype=np.float32)))


def _add_clutter(rng: np.random.Generator, canvas: Array) -> None:
    """Thin line segments and small faint blobs: structure that belongs to no class."""
    density = canvas.shape[0] * canvas.shape[1] / 224**2
    for _ in range(round(rng.uniform(5, 12) * density)):
        _add_line(rng, canvas)
    for _ in range(round(rng.uniform(6, 14) * density)):
        _add_blob(rng, canvas)


def _add_line(rng: np.random.Generator, canvas: Array) -> None:
    h, w = canvas.shape[:2]
    start, end = rng.uniform((0, 0), (h, w), size=(2, 2))
    steps = np.linspace(0, 1, int(2 * np.hypot(*(end - start))) + 2)[:, None]
    width = 1 + int(rng.random() < 0.4)
    points = (start + steps * (end - start)).astype(np.int64)
    rows = np.clip(points[:, 0:1] + np.arange(width), 0, h - 1).ravel()
    cols = np.repeat(points[:, 1], width)
    colour = _hsv(rng.random(), rng.random(), rng.random())
    _blend(canvas, (rows, cols), colour, rng.uniform(0.4, 0.8))


def _add_blob(rng: np.random.Generator, canvas: Array) -> None:
    h, w = canvas.shape[:2]
    cy, cx = rng.uniform((0, 0), (h, w))
    radius = rng.uniform(1.5, 2 + 0.03 * min(h, w))
    top, left = max(0, int(cy - radius)), max(0, int(cx - radius))
    y = np.arange(top, min(h, int(cy + radius) + 1))[:, None] + 0.5 - cy
    x = np.arange(left, min(w, int(cx + radius) + 1))[None, :] + 0.5 - cx
    colour = _hsv(rng.random(), rng.random(), rng.random())
    crop = canvas[top : top + y.shape[0], left : left + x.shape[1]]
    _blend(crop, y**2 + x**2 <= radius**2, colour, rng.uniform(0.2, 0.45))


def _blend(canvas: Array, where: Array | tuple[Array, Array], colour: Array, alpha: float) -> None:
    canvas[where] = (1 - alpha) * canvas[where] + alpha * colour


class SyntheticScenes:
    """Procedural scenes of `num_classes` shape+pattern classes; implements `Dataset`."""

    def __init__(
        self,
        *,
        split: str = "train",
        num_images: int = 64,
        image_size: tuple[int, int] = (224, 224),
        num_classes: int = 6,
        min_objects: int = 1,
        max_objects: int = 4,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.2, 0.5),
        min_visible: float = 0.35,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        _check(split in SPLITS, "split", f"one of {SPLITS}", split)
        _check(num_images >= 1, "num_images", ">= 1", num_images)
        _check(
            len(image_size) == 2 and min(image_size) >= MIN_SIDE,
            "image_size",
            f"(height, width), each >= {MIN_SIDE}",
            image_size,
        )
        _check(
            1 <= num_classes <= len(CLASS_TABLE),
            "num_classes",
            f"in 1..{len(CLASS_TABLE)}",
            num_classes,
        )
        _check(1 <= min_objects <= MAX_OBJECTS, "min_objects", f"in 1..{MAX_OBJECTS}", min_objects)
        _check(
            min_objects <= max_objects <= MAX_OBJECTS,
            "max_objects",
            f"in min_objects..{MAX_OBJECTS}",
            max_objects,
        )
        _check(seed >= 0, "seed", ">= 0", seed)
        _check(
            len(scale_range) == 2 and 0 < scale_range[0] <= scale_range[1] <= 1,
            "scale_range",
            "(low, high) with 0 < low <= high <= 1",
            scale_range,
        )
        _check(0 <= min_visible <= 1, "min_visible", "in [0, 1]", min_visible)
        weights = (
            np.ones(num_classes) if class_weights is None else np.asarray(class_weights, float)
        )
        _check(
            weights.shape == (num_classes,) and bool(np.all(np.isfinite(weights) & (weights > 0))),
            "class_weights",
            f"{num_classes} positive finite numbers",
            class_weights,
        )
        self.split, self.num_images, self.seed = split, num_images, seed
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_classes, self.min_objects, self.max_objects = num_classes, min_objects, max_objects
        self.scale_range, self.min_visible = scale_range, min_visible
        self.class_probs = weights / weights.sum()

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(f"{shape}-{pattern}" for shape, pattern in CLASS_TABLE[: self.num_classes])

    def image_ids(self) -> list[str]:
        return [f"{self.split}_{i:06d}" for i in range(self.num_images)]

    def load(self, image_id: str) -> Sample:
        scene = self.scene(image_id)
        classes = np.array([o.class_id for o in scene.objects], dtype=np.int64)
        semantic = np.zeros(self.image_size, dtype=np.uint8)
        for mask, class_id in zip(scene.visible_masks, classes, strict=True):
            semantic[mask] = class_id
        return Sample(image_id, scene.image, semantic, scene.visible_masks, classes)

    def relative_path(self, image_id: str) -> str:
        """`<split>/<id>.png`: no file exists; where `maskdistill export-labels` writes the
        rendered image (under the JSON's folder)."""
        self._index(image_id)
        return f"{self.split}/{image_id}.png"

    def scene(self, image_id: str) -> Scene:
        """The full scene behind `image_id`, including each object's unoccluded mask."""
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), self._index(image_id)))
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        classes = rng.choice(self.num_classes, size=count, p=self.class_probs) + 1
        objects, full, visible = self._layout(rng, [int(c) for c in classes])
        canvas = _background(rng, self.image_size)
        _add_clutter(rng, canvas)
        for obj in objects:
            self._paint(canvas, obj)
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * 4.0
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        return Scene(image, objects, full, visible)

    def _index(self, image_id: str) -> int:
        number = image_id.removeprefix(f"{self.split}_")
        index = int(number) if number.isascii() and number.isdigit() else -1
        if 0 <= index < self.num_images and image_id == f"{self.split}_{index:06d}":
            return index
        raise KeyError(f"unknown image id {image_id!r} for synthetic split {self.split!r}")

    def _layout(self, rng: np.random.Generator, classes: list[int]) -> Layout:
        """Place objects one by one so each keeps `min_visible` of itself; restart if stuck."""
        looks = [(_pattern_colours(rng), rng.random((24, 24))) for _ in classes]
        for _ in range(_LAYOUT_TRIES):
            placed = self._place_all(rng, classes, looks)
            if placed is not None:
                return placed
        raise RuntimeError(
            f"no layout keeps min_visible={self.min_visible} for {len(classes)} objects of "
            f"scale_range={self.scale_range}; lower max_objects, scale_range or min_visible"
        )

    def _place_all(
        self, rng: np.random.Generator, classes: list[int], looks: list[tuple[Array, Array]]
    ) -> Layout | None:
        objects: list[SceneObject] = []
        full: list[Array] = []
        visible: list[Array] = []
        h, w = self.image_size
        for class_id, (colours, texture) in zip(classes, looks, strict=True):
            for _ in range(_PLACEMENT_TRIES):
                radius = rng.uniform(*self.scale_range) * min(h, w) / 2
                center = (rng.uniform(0, h), rng.uniform(0, w))
                obj = SceneObject(
                    class_id, center, radius, rng.uniform(0, 2 * math.pi), colours, texture
                )
                mask = self._mask(obj)
                kept = [vis & ~mask for vis in visible]
                if mask.any() and all(
                    k.sum() >= self.min_visible * f.sum() for k, f in zip(kept, full, strict=True)
                ):
                    objects.append(obj)
                    full.append(mask)
                    visible = [*kept, mask]
                    break
            else:
                return None
        return objects, np.stack(full), np.stack(visible)

    def _shape(self, obj: SceneObject) -> str:
        return CLASS_TABLE[obj.class_id - 1][0]

    def _mask(self, obj: SceneObject) -> Array:
        (rows, cols), u, v = _frame(obj, self.image_size)
        mask = np.zeros(self.image_size, dtype=bool)
        mask[rows, cols] = SHAPES[self._shape(obj)](u, v)
        return mask

    def _paint(self, canvas: Array, obj: SceneObject) -> None:
        (rows, cols), u, v = _frame(obj, self.image_size)
        inside = SHAPES[self._shape(obj)](u, v)
        second = PATTERNS[CLASS_TABLE[obj.class_id - 1][1]](u, v, obj.texture)
        crop = canvas[rows, cols]
        crop[inside] = obj.colours[second[inside].astype(np.int64)]


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
