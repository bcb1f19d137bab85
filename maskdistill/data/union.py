"""Several splits read as one data set by image id (A.4: the detector trains on VOC07+12)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from maskdistill.data.base import Dataset, Sample


class SplitUnion:
    """The images of every split in `datasets` (split name -> data set), each id once.

    An id in several splits must name the same file in each (VOC2012's train_aug and trainval
    share images); ids naming different files would make rows ambiguous, so they are refused.
    """

    def __init__(self, datasets: Mapping[str, Dataset]) -> None:
        if not datasets:
            raise ValueError("SplitUnion needs at least one split")
        self._home: dict[str, str] = {}  # image id -> the first split holding it
        self.datasets = dict(datasets)
        for split, dataset in self.datasets.items():
            for image_id in dataset.image_ids():
                first = self._home.setdefault(image_id, split)
                if first != split:
                    self._check_same_file(image_id, first, split)

    def _check_same_file(self, image_id: str, first: str, other: str) -> None:
        paths = [self.datasets[s].relative_path(image_id) for s in (first, other)]
        if paths[0] != paths[1]:
            raise ValueError(
                f"image id {image_id!r} names {paths[0]} in split {first!r} but {paths[1]} in "
                f"split {other!r}; ids must be unique across the splits read together"
            )

    @property
    def class_names(self) -> Sequence[str]:
        return next(iter(self.datasets.values())).class_names

    def image_ids(self) -> list[str]:
        """Every id once, in split order, then each split's own order."""
        return list(self._home)

    def split_of(self, image_id: str) -> str:
        """The first split holding `image_id`; KeyError for an unknown id."""
        if image_id not in self._home:
            raise KeyError(f"{image_id!r} is in none of the splits {list(self.datasets)}")
        return self._home[image_id]

    def load(self, image_id: str) -> Sample:
        return self.datasets[self.split_of(image_id)].load(image_id)

    def relative_path(self, image_id: str) -> str:
        return self.datasets[self.split_of(image_id)].relative_path(image_id)
