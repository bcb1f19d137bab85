"""Data sets by image id: synthetic scenes, image folders / URI prefixes, PASCAL VOC, COCO."""

from __future__ import annotations

from maskdistill.config import DataConfig
from maskdistill.data.base import (
    IGNORE_INDEX,
    Dataset,
    Sample,
    SkipLog,
    Skipped,
    UnreadableImage,
    iter_samples,
)

__all__ = [
    "IGNORE_INDEX",
    "Dataset",
    "Sample",
    "SkipLog",
    "Skipped",
    "UnreadableImage",
    "build_dataset",
    "dataset_of",
    "iter_samples",
]


_BUILT: dict[tuple[str, str], Dataset] = {}


def dataset_of(config: DataConfig, split: str) -> Dataset:
    """`build_dataset`, once per process for each config and split (workers reuse it)."""
    key = (config.model_dump_json(), split)
    if key not in _BUILT:
        _BUILT[key] = build_dataset(config, split)
    return _BUILT[key]


def build_dataset(config: DataConfig, split: str) -> Dataset:
    """The data set `config` describes, for `split` (e.g. config.train_split)."""
    if config.kind == "synthetic":
        from maskdistill.data.synthetic import SyntheticScenes

        syn = config.synthetic
        return SyntheticScenes(
            split=split,
            num_images=syn.train_images if split == "train" else syn.val_images,
            image_size=syn.image_size,
            num_classes=syn.num_classes,
            min_objects=syn.min_objects,
            max_objects=syn.max_objects,
            scale_range=syn.scale_range,
            min_visible=syn.min_visible,
            class_weights=syn.class_weights,
            seed=syn.seed,
        )
    root = config.root or ""  # DataConfig requires a root for every other kind
    limits = {"max_pixels": config.max_pixels, "min_side": config.min_side}
    if config.kind == "folder":
        from maskdistill.data.folder import ImageFolder

        folder = f"{root.rstrip('/')}/{split}" if split else root
        return ImageFolder(folder, prefix=split, **limits)
    if config.kind == "voc":
        from maskdistill.data.voc import open_voc

        return open_voc(root, split=split, **limits)
    from maskdistill.data.coco import COCOInstances, split_ids_file

    annotations = config.coco_annotations or ""  # DataConfig requires them for kind=coco
    return COCOInstances(
        root,
        annotations=annotations,
        image_ids_file=split_ids_file(
            split, annotations=annotations, image_ids_file=config.coco_image_ids
        ),
        max_pixels=config.max_pixels,
        min_side=config.min_side,
    )
