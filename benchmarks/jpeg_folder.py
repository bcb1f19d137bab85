"""A folder of VOC-size JPEGs for the benchmarks (issue 15): data cost is that of decoding files.

    python benchmarks/jpeg_folder.py [--count 256] [--seed 0] [--cache DIR]   # makes, prints it

`voc_jpegs(count=, seed=)` renders `count` synthetic scenes (`SyntheticScenes`, 6 classes) once,
alternately 375x500 and 500x375 (H x W, VOC's two usual shapes), as JPEG quality 90 under
`<cache>/voc-n<count>-s<seed>-q90/train/`, beside each image's ground-truth semantic map as a
uint8 PNG (`labels/`, `encode_label_map`, values 0..6) and one object per image, its first
instance as the cluster stage writes it (`objects.jsonl`: RLE, box, 0-based cluster). Later
calls reuse the folder. `open_folder(DIR)` takes a user's folder instead: it has no labels, so
each image gets one fixed ellipse blob drawn from (seed, index) as its label map and object;
the segmenter and detector benchmarks then measure the same decode + augment + step costs on
the user's pixels, and nothing about accuracy.
Benchmarks read the images through `build_dataset(kind=folder)` (`ImageFolder`), as users'
runs do. The cache is `$MASKDISTILL_CACHE/jpegs` (default `~/.cache/maskdistill/jpegs`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskdistill.config import DataConfig
from maskdistill.data import Dataset, build_dataset
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.masks import encode_rle, mask_to_box
from maskdistill.pseudolabels import encode_label_map

VOC_SHAPES = ((375, 500), (500, 375))  # (H, W): VOC's landscape and portrait sizes
QUALITY = 90
NUM_CLASSES = 7  # six synthetic classes (or blob classes) + background
SPLIT = "train"


@dataclass(frozen=True)
class JpegFolder:
    """Images under `root`/`split` (split '' = root itself) and their labels.

    `labels`: the folder of label PNGs and objects.jsonl (ours), or None for a user's folder
    (labels are then blobs, `blob_label`)."""

    root: Path
    split: str
    labels: Path | None
    count: int | None = None  # a user folder: its first `count` images only
    seed: int = 0

    @property
    def data(self) -> DataConfig:
        """The `data:` section that reads this folder (kind=folder) for a stage run."""
        return DataConfig(kind="folder", root=str(self.root), train_split=self.split)

    @cached_property
    def dataset(self) -> Dataset:
        return build_dataset(self.data, self.split)

    def image_ids(self) -> list[str]:
        return self.dataset.image_ids()[: self.count]

    def segmenter_rows(self) -> list[dict[str, Any]]:
        """Rows as the distill stage writes them: image_id and label_png."""
        if self.labels is None:
            return [
                {"image_id": i, "label_png": encode_label_map(self._blob(k, i)[0])}
                for k, i in enumerate(self.image_ids())
            ]
        return [
            {"image_id": i, "label_png": (self.labels / f"{Path(i).stem}.png").read_bytes()}
            for i in self.image_ids()
        ]

    def detector_rows(self) -> list[dict[str, Any]]:
        """One object per image as the cluster stage writes it (`MaskTargets` rows)."""
        if self.labels is None:
            return [_object_row(i, *self._blob(k, i)) for k, i in enumerate(self.image_ids())]
        lines = (self.labels / "objects.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def _blob(self, index: int, image_id: str) -> tuple[np.ndarray, np.ndarray, int]:
        height, width = self.dataset.load(image_id).image.shape[:2]
        return blob_label((height, width), seed=self.seed, index=index)


def blob_label(
    size: tuple[int, int], *, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """A user image's stand-in label: an ellipse of class 1..6 with its centre in the middle
    half of the image and semi-axes 10-35% of the sides, from (seed, index). Returns the
    uint8 label map, the bool mask and the 0-based cluster."""
    rng = np.random.default_rng((seed, index))
    height, width = size
    cy, cx = rng.uniform(0.25, 0.75, 2) * (height, width)
    ry, rx = rng.uniform(0.1, 0.35, 2) * (height, width)
    ys = (np.arange(height)[:, None] + 0.5 - cy) / ry
    xs = (np.arange(width)[None, :] + 0.5 - cx) / rx
    mask = ys**2 + xs**2 <= 1.0
    cluster = int(rng.integers(NUM_CLASSES - 1))
    return (mask * (cluster + 1)).astype(np.uint8), mask, cluster


def _object_row(image_id: str, _label: np.ndarray, mask: np.ndarray, cluster: int) -> dict:
    return {
        "image_id": image_id,
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "mask_rle": encode_rle(mask)["counts"],
        "bbox": list(mask_to_box(mask)),
        "cluster": cluster,
    }


def cache_root() -> Path:
    base = os.environ.get("MASKDISTILL_CACHE", str(Path.home() / ".cache" / "maskdistill"))
    return Path(base) / "jpegs"


def voc_jpegs(*, count: int = 256, seed: int = 0, cache: Path | None = None) -> JpegFolder:
    """Our folder of `count` VOC-size JPEGs with labels, made once (in parallel) and reused."""
    if count < 1:
        raise ValueError(f"count={count}: expected >= 1")
    cache = cache_root() if cache is None else Path(cache)
    final = cache / f"voc-n{count}-s{seed}-q{QUALITY}"
    if not (final / "labels" / "objects.jsonl").exists():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".making-", dir=cache))
        (work / SPLIT).mkdir()
        (work / "labels").mkdir()
        with Pool(min(os.cpu_count() or 1, count)) as pool:
            rows = pool.map(_render, [(work, seed, i) for i in range(count)])
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (work / "labels" / "objects.jsonl").write_text(lines)
        try:
            work.rename(final)  # atomic: a concurrent maker's folder wins, ours is dropped
        except OSError:
            shutil.rmtree(work)
    return JpegFolder(final, SPLIT, final / "labels", seed=seed)


def _render(job: tuple[Path, int, int]) -> dict[str, Any]:
    """Write image `index` (JPEG) and its label PNG; return its object row."""
    work, seed, index = job
    shape = VOC_SHAPES[index % 2]
    scenes = SyntheticScenes(num_images=index + 1, image_size=shape, seed=seed)
    sample = scenes.load(f"{SPLIT}_{index:06d}")
    assert sample.semantic is not None and sample.instance_masks is not None
    assert sample.instance_classes is not None
    image_id = f"{SPLIT}_{index:06d}.jpg"
    Image.fromarray(sample.image).save(work / SPLIT / image_id, quality=QUALITY)
    (work / "labels" / f"{Path(image_id).stem}.png").write_bytes(encode_label_map(sample.semantic))
    mask = sample.instance_masks[0]
    return _object_row(image_id, sample.semantic, mask, int(sample.instance_classes[0]) - 1)


def open_folder(
    images: str | None, *, count: int = 256, seed: int = 0, cache: Path | None = None
) -> JpegFolder:
    """`images` (a user's folder, its first `count` images, blob labels) or our cached one."""
    if images is None:
        return voc_jpegs(count=count, seed=seed, cache=cache)
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {images!r} is not a directory")
    return JpegFolder(root, "", None, count=count, seed=seed)


def add_arguments(parser: argparse.ArgumentParser, *, count: int = 256) -> None:
    """--images DIR, --count, --cache: the options every benchmark reading a folder takes."""
    parser.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="a folder of images to read (default: our cached VOC-size JPEGs)",
    )
    parser.add_argument("--count", type=int, default=count, help="images (ours: made; DIR: first)")
    parser.add_argument("--cache", type=Path, default=None, help="where our JPEG folder is kept")


def from_arguments(args: argparse.Namespace) -> JpegFolder:
    return open_folder(args.images, count=args.count, cache=args.cache)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args()
    folder = from_arguments(args)
    print(folder.root / folder.split, f"{len(folder.image_ids())} images")


if __name__ == "__main__":
    main()
