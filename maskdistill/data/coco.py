"""COCO instance annotations (all 80 categories), optionally cut to a list such as COCO20k."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from maskdistill.data.base import IGNORE_INDEX, Sample
from maskdistill.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, read_image_file

MAX_LISTED_UNKNOWN = 5


def resolve_annotations(root: Path, annotations: str) -> Path:
    """`annotations` as given, else relative to `root`."""
    for path in (Path(annotations), root / annotations):
        if path.is_file():
            return path
    raise FileNotFoundError(f"COCO annotations {annotations} not found (also tried under {root})")


def image_dir_name(annotations: Path) -> str:
    """The image folder an instances_<name>.json file describes, e.g. train2014."""
    prefix = "instances_"
    if not annotations.stem.startswith(prefix):
        raise ValueError(
            f"cannot derive the image folder from {annotations.name}; pass image_dir explicitly"
        )
    return annotations.stem[len(prefix) :]


def load_coco(path: Path) -> COCO:
    """Index an annotation file with pycocotools, without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def stems_to_ids(coco: COCO) -> dict[str, int]:
    """File-name stem -> COCO image id; stems must be unique."""
    by_stem: dict[str, int] = {}
    for coco_id, info in coco.imgs.items():
        stem = Path(info["file_name"]).stem
        if stem in by_stem:
            raise ValueError(f"two COCO images share the file name stem {stem!r}")
        by_stem[stem] = int(coco_id)
    return by_stem


def resolve_entry(entry: str, by_stem: dict[str, int], known: set[int]) -> int | None:
    """The COCO id named by a list entry (integer id or file name), None when unknown."""
    stem = Path(entry).stem
    if stem in by_stem:
        return by_stem[stem]
    if stem.isdigit() and int(stem) in known:
        return int(stem)
    return None


def select_ids(path: str, by_stem: dict[str, int]) -> set[int]:
    """COCO ids listed in `path`, one per line; unknown entries raise ValueError."""
    known = set(by_stem.values())
    wanted: set[int] = set()
    unknown: list[str] = []
    for line in Path(path).read_text().splitlines():
        entry = line.strip()
        if not entry:
            continue
        coco_id = resolve_entry(entry, by_stem, known)
        if coco_id is None:
            unknown.append(entry)
        else:
            wanted.add(coco_id)
    if unknown:
        raise ValueError(
            f"{len(unknown)} entries of {path} are not in the annotations, e.g. "
            f"{', '.join(unknown[:MAX_LISTED_UNKNOWN])}"
        )
    return wanted


def paint_semantic(masks: np.ndarray, classes: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Class map: largest instance painted first so smaller ones stay on top; crowd ignored."""
    semantic = np.zeros(crowd.shape, dtype=np.uint8)
    areas = masks.sum(axis=(1, 2))
    for index in np.argsort(-areas, kind="stable"):
        semantic[masks[index]] = classes[index]
    semantic[crowd] = IGNORE_INDEX
    return semantic


def split_ids_file(split: str, *, annotations: str, image_ids_file: str | None) -> str | None:
    """The id list that cuts `split` from the annotations: None (every image) for the split
    named like their image folder (`train2014` for instances_train2014.json), else
    `image_ids_file` (Sec 4.1: COCO20k trains and tests on a list, K-means sees all images)."""
    if split == image_dir_name(Path(annotations)):
        return None
    if image_ids_file is None:
        raise ValueError(
            f"split {split!r} needs data.coco_image_ids (with data.kind=coco, split "
            f"{image_dir_name(Path(annotations))!r} is every image of {Path(annotations).name} "
            "and any other split name is the image id list, e.g. COCO20k)"
        )
    return image_ids_file


class COCOInstances:
    """COCO images with instance masks (non-crowd), crowd regions and a semantic map; 1..80."""

    def __init__(
        self,
        root: str,
        *,
        annotations: str,
        image_dir: str | None = None,
        image_ids_file: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        self.data_root = Path(root)
        self.annotations = resolve_annotations(self.data_root, annotations)
        self.image_dir = (
            Path(root) / image_dir_name(self.annotations) if image_dir is None else Path(image_dir)
        )
        self.max_pixels = max_pixels
        self.min_side = min_side
        self._coco = load_coco(self.annotations)
        category_ids = sorted(int(c) for c in self._coco.getCatIds())
        self._class_of = {cat: index + 1 for index, cat in enumerate(category_ids)}
        self._class_names = tuple(c["name"] for c in self._coco.loadCats(category_ids))
        by_stem = stems_to_ids(self._coco)
        if image_ids_file is not None:
            keep = select_ids(image_ids_file, by_stem)
            by_stem = {stem: i for stem, i in by_stem.items() if i in keep}
        self._coco_id = dict(sorted(by_stem.items(), key=lambda item: item[1]))

    @property
    def class_names(self) -> Sequence[str]:
        return self._class_names

    def image_ids(self) -> list[str]:
        return list(self._coco_id)

    def load(self, image_id: str) -> Sample:
        if image_id not in self._coco_id:
            raise KeyError(f"{image_id!r} is not among the selected images of {self.annotations}")
        info = self._coco.imgs[self._coco_id[image_id]]
        image = self._read_image(image_id, info)
        objects, crowds = self._annotations(self._coco_id[image_id])
        shape = (int(info["height"]), int(info["width"]))
        masks = self._masks(objects, shape)
        classes = np.array([self._class_of[a["category_id"]] for a in objects], dtype=np.int64)
        crowd_masks = self._masks(crowds, shape)
        crowd_classes = np.array([self._class_of[a["category_id"]] for a in crowds], np.int64)
        semantic = paint_semantic(masks, classes, crowd_masks.sum(axis=0) > 0)
        return Sample(image_id, image, semantic, masks, classes, crowd_masks, crowd_classes)

    def relative_path(self, image_id: str) -> str:
        """The image folder and the annotations' `file_name`, relative to root (`..` steps when
        an explicit `image_dir` lies elsewhere)."""
        if image_id not in self._coco_id:
            raise KeyError(f"{image_id!r} is not among the selected images of {self.annotations}")
        path = self.image_dir / self._coco.imgs[self._coco_id[image_id]]["file_name"]
        return Path(os.path.relpath(path, self.data_root)).as_posix()

    def _read_image(self, image_id: str, info: dict[str, Any]) -> np.ndarray:
        path = self.image_dir / info["file_name"]
        image = read_image_file(
            str(path), image_id, max_pixels=self.max_pixels, min_side=self.min_side
        )
        expected = (int(info["height"]), int(info["width"]))
        if image.shape[:2] != expected:
            raise ValueError(
                f"{path}: image is {image.shape[:2]} but {self.annotations.name} says {expected}"
            )
        return image

    def _masks(self, anns: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
        """Rasterized annotations as bool [len(anns), H, W]."""
        masks = np.zeros((len(anns), *shape), dtype=bool)
        for row, ann in enumerate(anns):
            masks[row] = self._coco.annToMask(ann).astype(bool)
        return masks

    def _annotations(self, coco_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Non-crowd and crowd annotations of one image, by annotation id."""
        anns = sorted(
            self._coco.loadAnns(self._coco.getAnnIds(imgIds=[coco_id])), key=lambda a: a["id"]
        )
        crowds = [a for a in anns if a.get("iscrowd", 0)]
        return [a for a in anns if not a.get("iscrowd", 0)], crowds
