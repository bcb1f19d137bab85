"""A folder of images without ground truth, local or behind any pyarrow filesystem URI."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

import pyarrow.fs as pafs

from maskdistill.data.base import Sample
from maskdistill.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    read_image_file,
)
from maskdistill.storage import resolve


class ImageFolder:
    """Every image file under `root`, recursively; ids are paths relative to root with `/`.

    `root` is a local path or a URI such as `s3://bucket/prefix` or `file:///data/images`.
    `prefix`: where `root` lies under the data root (a split's subfolder, '' for the root
    itself); `relative_path` puts it before the id.
    """

    def __init__(
        self,
        root: str,
        *,
        prefix: str = "",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        self.root = root
        self.prefix = prefix.strip("/")
        self._filesystem, base = resolve(root)
        self._paths = _list_images(self._filesystem, base, root)
        self._max_pixels = max_pixels
        self._min_side = min_side

    @property
    def class_names(self) -> Sequence[str]:
        return ()

    def image_ids(self) -> list[str]:
        return list(self._paths)

    def load(self, image_id: str) -> Sample:
        path = self._paths.get(image_id)
        if path is None:
            raise KeyError(f"no image {image_id!r} in image folder {self.root!r}")
        image = read_image_file(
            path,
            image_id,
            filesystem=self._filesystem,
            max_pixels=self._max_pixels,
            min_side=self._min_side,
        )
        return Sample(image_id, image)

    def relative_path(self, image_id: str) -> str:
        if image_id not in self._paths:
            raise KeyError(f"no image {image_id!r} in image folder {self.root!r}")
        return posixpath.join(self.prefix, image_id)


def _list_images(filesystem: pafs.FileSystem, base: str, root: str) -> dict[str, str]:
    """Image id -> filesystem path, sorted by id."""
    info = filesystem.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        state = "does not exist" if info.type == pafs.FileType.NotFound else "is not a directory"
        raise FileNotFoundError(_missing_message(root, state))
    prefix = base.rstrip("/") + "/"
    selector = pafs.FileSelector(base, recursive=True)
    paths = {
        entry.path[len(prefix) :]: entry.path
        for entry in filesystem.get_file_info(selector)
        if entry.type == pafs.FileType.File and _is_image(entry.path)
    }
    if not paths:
        raise FileNotFoundError(_missing_message(root, "contains no image files"))
    return dict(sorted(paths.items()))


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _missing_message(root: str, state: str) -> str:
    return f"image folder {root!r} {state} (looked for {', '.join(IMAGE_EXTENSIONS)})"
