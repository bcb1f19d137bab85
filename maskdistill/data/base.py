"""What every data set yields: an image with its id and, where it exists, ground truth."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

IGNORE_INDEX = 255  # semantic maps: pixels that no metric counts (VOC boundaries, COCO crowds)


class UnreadableImage(ValueError):
    """An input that cannot become an RGB image; `reason` is what goes into the stage manifest."""

    def __init__(self, image_id: str, reason: str) -> None:
        super().__init__(f"{image_id}: {reason}")
        self.image_id = image_id
        self.reason = reason


@dataclass
class Sample:
    """One image and its ground truth.

    image: uint8 [H, W, 3] RGB.
    semantic: uint8 [H, W]; 0 background, 1..C classes, IGNORE_INDEX not scored; None if unlabelled.
    instance_masks: bool [M, H, W]; instance_classes: int64 [M] in 1..C; None without instances.
    crowd_masks: bool [K, H, W]; crowd_classes: int64 [K]: COCO's iscrowd regions, never objects;
    mask AP ignores detections on them (A.4, COCO protocol); None where a data set has none.
    """

    image_id: str
    image: np.ndarray
    semantic: np.ndarray | None = None
    instance_masks: np.ndarray | None = None
    instance_classes: np.ndarray | None = None
    crowd_masks: np.ndarray | None = None
    crowd_classes: np.ndarray | None = None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True)
class Skipped:
    """An input a stage passed over, and why."""

    image_id: str
    reason: str


class Dataset(Protocol):
    """A data set addressed by image id, so that shards and joins never depend on position."""

    @property
    def class_names(self) -> Sequence[str]:
        """Names of classes 1..C (index 0 of the list is class 1); background is implicit."""
        ...

    def image_ids(self) -> list[str]:
        """All ids of this split, in a stable order."""
        ...

    def load(self, image_id: str) -> Sample:
        """The sample for `image_id`; raises UnreadableImage for input that cannot be decoded."""
        ...

    def relative_path(self, image_id: str) -> str:
        """The image's file path relative to the data root (`data.root`), with `/`, as
        annotation files name it (COCO's `file_name`); KeyError for an unknown id."""
        ...


@dataclass
class SkipLog:
    """Skipped inputs gathered while iterating, for the stage manifest."""

    skipped: list[Skipped] = field(default_factory=list)

    def add(self, image_id: str, reason: str) -> None:
        self.skipped.append(Skipped(image_id, reason))

    def reasons(self) -> dict[str, str]:
        return {s.image_id: s.reason for s in self.skipped}


def iter_samples(
    dataset: Dataset, image_ids: Sequence[str] | None = None, skips: SkipLog | None = None
) -> Iterator[Sample]:
    """Yield readable samples; unreadable ones go to `skips` instead of raising."""
    for image_id in dataset.image_ids() if image_ids is None else image_ids:
        try:
            yield dataset.load(image_id)
        except UnreadableImage as err:
            if skips is None:
                raise
            skips.add(err.image_id, err.reason)
