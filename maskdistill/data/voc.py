"""PASCAL VOC 2012 segmentation: train, val, trainval and the SBD-augmented train_aug; VOC 2007
(`voc07_trainval`, `voc07_test`) beside it for the detector's VOC07+12 training set (A.4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from maskdistill.data.base import IGNORE_INDEX, Sample
from maskdistill.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, read_image_file

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "val", "trainval", "train_aug")
VOC07_SPLITS: dict[str, str] = {"voc07_trainval": "trainval", "voc07_test": "test"}  # Main lists
SBD_DIRS: tuple[Path, ...] = (Path("benchmark_RELEASE", "dataset"), Path("SBD", "dataset"))


def find_voc2012(root: Path) -> Path:
    """The VOC2012 folder: `root/VOCdevkit/VOC2012` or `root` itself."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no VOC2012 folder with JPEGImages/ at {root} or {root / 'VOCdevkit' / 'VOC2012'}"
    )


def sbd_candidates(root: Path, voc_dir: Path) -> list[Path]:
    """Where an SBD `dataset` folder may sit: beside VOC2012, then under root."""
    bases = [voc_dir.parent] + ([root] if root != voc_dir.parent else [])
    return [base / sub for base in bases for sub in SBD_DIRS]


def read_id_list(path: Path) -> list[str]:
    """Image ids of a list file: first token of each non-blank line, as a file stem."""
    lines = path.read_text().splitlines()
    return [Path(line.split()[0]).stem for line in lines if line.strip()]


def build_train_aug(voc_lists: Path, sbd_dir: Path) -> list[str]:
    """(SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted."""
    ids = set(read_id_list(sbd_dir / "train.txt")) | set(read_id_list(sbd_dir / "val.txt"))
    ids |= set(read_id_list(voc_lists / "train.txt"))
    return sorted(ids - set(read_id_list(voc_lists / "val.txt")))


def read_index_png(path: Path) -> np.ndarray:
    """Pixel indices of a palette (P) or grayscale (L) label PNG."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: label image has mode {img.mode}; expected palette (P) or grayscale (L)"
            )
        return np.array(img)


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class map `GTcls.Segmentation` of an SBD .mat file."""
    try:
        label = np.asarray(scipy.io.loadmat(str(path))["GTcls"]["Segmentation"][0, 0])
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{path}: no GTcls.Segmentation in SBD label file ({err})") from err
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{path}: GTcls.Segmentation is {label.dtype} {label.shape}, not 2-D int")
    return label


def checked_classes(label: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    """`label` as uint8 once all values are in 0..num_classes or IGNORE_INDEX."""
    values = np.unique(label)
    bad = values[((values < 0) | (values > num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(
            f"{path}: label values {bad.tolist()} outside 0..{num_classes} and {IGNORE_INDEX}"
        )
    return label.astype(np.uint8)


def check_shape(label: np.ndarray, image: np.ndarray, path: Path) -> None:
    """Raise unless the label covers the image pixel for pixel."""
    if label.shape != image.shape[:2]:
        raise ValueError(f"{path}: label shape {label.shape} differs from image {image.shape[:2]}")


def majority_class(classes_under: np.ndarray, path: Path, instance: int) -> int:
    """Most frequent object class (1..254) among the pixels of one instance."""
    counts = np.bincount(classes_under[(classes_under > 0) & (classes_under != IGNORE_INDEX)])
    if counts.sum() == 0:
        raise ValueError(f"{path}: instance {instance} covers no object class pixels")
    return int(counts.argmax())


def instances_from_objects(
    objects: np.ndarray, semantic: np.ndarray, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Masks bool [M,H,W] and classes int64 [M] for instance indices 1..254, ascending."""
    indices = [int(v) for v in np.unique(objects) if 0 < v < IGNORE_INDEX]
    masks = np.zeros((len(indices), *objects.shape), dtype=bool)
    for row, index in enumerate(indices):
        masks[row] = objects == index
    classes = [majority_class(semantic[m], path, i) for i, m in zip(indices, masks, strict=True)]
    return masks, np.array(classes, dtype=np.int64)


def add_instances(sample: Sample, object_path: Path) -> None:
    """The instances of `object_path` (VOC's SegmentationObject PNG) into `sample`, when the
    file exists; the sample's class map gives each instance its class."""
    if not object_path.is_file() or sample.semantic is None:
        return
    objects = read_index_png(object_path)
    check_shape(objects, sample.image, object_path)
    masks, classes = instances_from_objects(objects, sample.semantic, object_path)
    sample.instance_masks, sample.instance_classes = masks, classes


class PascalVOC:
    """VOC 2012 semantic labels (0 background, 1..20, 255 boundary) and instances where given."""

    def __init__(
        self,
        root: str,
        *,
        split: str = "val",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        if split not in SPLITS:
            known = ", ".join([*SPLITS, *VOC07_SPLITS])
            raise ValueError(f"unknown VOC split {split!r}; choose one of {known}")
        self.data_root = Path(root)
        self.root = find_voc2012(self.data_root)
        self.split = split
        self.max_pixels = max_pixels
        self.min_side = min_side
        self._sbd_places = sbd_candidates(Path(root), self.root)
        self._sbd = next((p for p in self._sbd_places if p.is_dir()), None)
        self._ids = self._list_ids()
        self._id_set = set(self._ids)

    @property
    def class_names(self) -> Sequence[str]:
        return VOC_CLASSES

    def image_ids(self) -> list[str]:
        return list(self._ids)

    def load(self, image_id: str) -> Sample:
        if image_id not in self._id_set:
            raise KeyError(f"{image_id!r} is not in VOC2012 split {self.split!r}")
        image = read_image_file(
            str(self._image_path(image_id)),
            image_id,
            max_pixels=self.max_pixels,
            min_side=self.min_side,
        )
        semantic, label_path = self._semantic(image_id)
        check_shape(semantic, image, label_path)
        sample = Sample(image_id, image, semantic)
        if self.split != "train_aug":
            add_instances(sample, self.root / "SegmentationObject" / f"{image_id}.png")
        return sample

    def relative_path(self, image_id: str) -> str:
        """`JPEGImages/<id>.jpg` under the root as given: with `VOCdevkit/VOC2012/` before it
        when the VOC2012 folder lies there."""
        if image_id not in self._id_set:
            raise KeyError(f"{image_id!r} is not in VOC2012 split {self.split!r}")
        return self._image_path(image_id).relative_to(self.data_root).as_posix()

    def _image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    @property
    def _lists(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    def _available_splits(self) -> list[str]:
        on_disk = [s for s in SPLITS if (self._lists / f"{s}.txt").is_file()]
        if self._sbd is not None and "train_aug" not in on_disk:
            on_disk.append("train_aug (from SBD)")
        return on_disk

    def _list_ids(self) -> list[str]:
        path = self._lists / f"{self.split}.txt"
        if path.is_file():
            return read_id_list(path)
        if self.split == "train_aug" and self._sbd is not None:
            return build_train_aug(self._lists, self._sbd)
        searched = ""
        if self.split == "train_aug":
            searched = f" and no SBD dataset folder at {', '.join(map(str, self._sbd_places))}"
        raise FileNotFoundError(
            f"VOC split file {path} not found{searched}; splits available: "
            f"{', '.join(self._available_splits()) or 'none'}"
        )

    def _label_candidates(self, image_id: str) -> list[Path]:
        """Label files for `image_id`, preferred first."""
        folders = ["SegmentationClassAug", "SegmentationClass"]
        if self.split != "train_aug":
            folders = folders[1:]
        paths = [self.root / folder / f"{image_id}.png" for folder in folders]
        if self.split == "train_aug" and self._sbd is not None:
            paths.append(self._sbd / "cls" / f"{image_id}.mat")
        return paths

    def _semantic(self, image_id: str) -> tuple[np.ndarray, Path]:
        """The class map of `image_id` and the file it came from."""
        candidates = self._label_candidates(image_id)
        for path in candidates:
            if path.is_file():
                raw = read_sbd_mat(path) if path.suffix == ".mat" else read_index_png(path)
                return checked_classes(raw, path, len(VOC_CLASSES)), path
        raise FileNotFoundError(
            f"no label for {image_id}: looked for {', '.join(map(str, candidates))}"
        )


def find_voc2007(root: Path) -> Path:
    """The VOC2007 folder beside VOC2012: `root/VOCdevkit/VOC2007` or `root/VOC2007`."""
    candidates = (root / "VOCdevkit" / "VOC2007", root / "VOC2007")
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no VOC2007 folder with JPEGImages/ at {' or '.join(map(str, candidates))} (data.root "
        "must hold VOCdevkit/ with VOC2007 beside VOC2012 for the voc07_* splits)"
    )


class PascalVOC2007:
    """VOC 2007 images of an `ImageSets/Main` list (A.4: VOC07+12 trains the detector), with
    VOC's labels where its segmentation set has them (632 images) and unlabelled otherwise.

    Its ids (`000005`) never equal VOC2012's (`2008_000002`; the VOC2007 photos VOC2012 reuses
    are renamed `2007_000032`), so both years' rows can share one training set by id.
    """

    def __init__(
        self,
        root: str,
        *,
        split: str = "voc07_trainval",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        if split not in VOC07_SPLITS:
            raise ValueError(
                f"unknown VOC2007 split {split!r}; choose one of {', '.join(VOC07_SPLITS)}"
            )
        self.data_root = Path(root)
        self.root = find_voc2007(self.data_root)
        self.split = split
        self.max_pixels = max_pixels
        self.min_side = min_side
        lists = self.root / "ImageSets" / "Main"
        path = lists / f"{VOC07_SPLITS[split]}.txt"
        if not path.is_file():
            on_disk = [
                name for name, stem in VOC07_SPLITS.items() if (lists / f"{stem}.txt").is_file()
            ]
            raise FileNotFoundError(
                f"VOC2007 list {path} not found; splits available: {', '.join(on_disk) or 'none'}"
            )
        self._ids = read_id_list(path)
        self._id_set = set(self._ids)

    @property
    def class_names(self) -> Sequence[str]:
        return VOC_CLASSES

    def image_ids(self) -> list[str]:
        return list(self._ids)

    def load(self, image_id: str) -> Sample:
        """The image; its class map and instances only where VOC2007 segmented it."""
        image = read_image_file(
            str(self._image_path(image_id)),
            image_id,
            max_pixels=self.max_pixels,
            min_side=self.min_side,
        )
        sample = Sample(image_id, image)
        class_path = self.root / "SegmentationClass" / f"{image_id}.png"
        if not class_path.is_file():
            return sample
        sample.semantic = checked_classes(read_index_png(class_path), class_path, len(VOC_CLASSES))
        check_shape(sample.semantic, image, class_path)
        add_instances(sample, self.root / "SegmentationObject" / f"{image_id}.png")
        return sample

    def relative_path(self, image_id: str) -> str:
        """`VOCdevkit/VOC2007/JPEGImages/<id>.jpg` (or `VOC2007/...`) under the root as given."""
        return self._image_path(image_id).relative_to(self.data_root).as_posix()

    def _image_path(self, image_id: str) -> Path:
        if image_id not in self._id_set:
            raise KeyError(f"{image_id!r} is not in VOC2007 split {self.split!r}")
        return self.root / "JPEGImages" / f"{image_id}.jpg"


def open_voc(
    root: str, *, split: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> PascalVOC | PascalVOC2007:
    """The VOC split `split`: VOC2007's for the `voc07_*` names, else VOC2012's."""
    kind = PascalVOC2007 if split in VOC07_SPLITS else PascalVOC
    return kind(root, split=split, max_pixels=max_pixels, min_side=min_side)
