import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdistill.config import PretrainConfig
from maskdistill.data.base import SkipLog
from maskdistill.data.folder import ImageFolder
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.engine import BatchPlan
from maskdistill.loader import (
    BatchLoader,
    LoaderWorkerDied,
    SampleBatches,
    SampleError,
    decoded,
)
from maskdistill.pretrain import MultiCrop, PretrainBatches
from maskdistill.pseudolabels import encode_label_map
from maskdistill.segmenter import SegmentationSamples, stack_pairs

PLAN = BatchPlan(rank=0, world_size=1, batch_size=3, num_samples=8, seed=5)


class Numbers:
    """Sample i of variant v is the tensor [i, v]; `fail_at` raises, `kill_at` kills the process
    that loads it (as a segfaulting decoder or the OOM killer would)."""

    def __init__(self, *, fail_at: int = -1, kill_at: int = -1) -> None:
        self.fail_at, self.kill_at = fail_at, kill_at

    def __len__(self) -> int:
        return 8

    def load(self, index: int, *, variant: int = 0) -> torch.Tensor:
        if index == self.fail_at:
            raise ValueError("truncated JPEG")
        if index == self.kill_at and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.tensor([index, variant])

    def image_id(self, index: int) -> str:
        return f"img{index}"


def stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def test_sample_batches_are_the_plans_indices_loaded_with_the_iteration_as_variant() -> None:
    batches = SampleBatches(Numbers(), PLAN, stack)
    indices = PLAN.indices(4)
    assert batches(4).tolist() == [[i, 4] for i in indices]
    assert batches.image_ids(4) == [f"img{i}" for i in indices]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_the_in_process_batches_in_order_and_restarts_where_asked(
    workers: int,
) -> None:
    batches = SampleBatches(Numbers(), PLAN, stack)
    loader = BatchLoader(batches, workers=workers, stop=9)
    try:
        assert all(torch.equal(loader(i), batches(i)) for i in range(5))
        # a resumed run asks for its checkpoint's iteration first: the stream starts there
        assert [loader(i).tolist() for i in (2, 3, 8)] == [batches(i).tolist() for i in (2, 3, 8)]
    finally:
        loader.close()


@pytest.fixture(scope="module")
def segmentation_samples() -> SegmentationSamples:
    scenes = SyntheticScenes(num_images=8, image_size=(40, 48), num_classes=3)
    rows = []
    for image_id in scenes.image_ids():
        semantic = scenes.load(image_id).semantic
        assert semantic is not None
        rows.append({"image_id": image_id, "label_png": encode_label_map(semantic)})
    return SegmentationSamples(rows, scenes, crop_size=32, seed=3)


def test_segmenter_batches_from_two_processes_equal_the_training_process_ones(
    segmentation_samples: SegmentationSamples,
) -> None:
    batches = SampleBatches(segmentation_samples, PLAN, stack_pairs)
    loader = BatchLoader(batches, workers=2, stop=6)
    try:
        for iteration in range(6):
            images, targets = loader(iteration)
            expected_images, expected_targets = batches(iteration)
            assert images.shape == (3, 3, 32, 32) and targets.shape == (3, 32, 32)
            assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)
    finally:
        loader.close()


def test_stage_batches_survive_pickling_for_spawned_workers(
    segmentation_samples: SegmentationSamples,
) -> None:
    """With a spawn or forkserver start method the loader pickles the batches into each worker."""
    batches = SampleBatches(segmentation_samples, PLAN, stack_pairs)
    copy = pickle.loads(pickle.dumps(batches))
    assert all(torch.equal(a, b) for a, b in zip(copy(2), batches(2), strict=True))
    scenes = SyntheticScenes(num_images=8, image_size=(40, 48), num_classes=3)
    crops = MultiCrop.from_config(
        PretrainConfig(global_crop_size=32, local_crop_size=16, local_crops=2)
    )
    views = PretrainBatches(scenes, scenes.image_ids(), crops, PLAN, render=True)
    iteration, rendered = pickle.loads(pickle.dumps(views))(1)
    assert iteration == 1 and [v.shape for v in rendered] == [
        (3, 3, 32, 32),
        (3, 3, 32, 32),
        (3, 3, 16, 16),
        (3, 3, 16, 16),
    ]
    assert views.image_ids(1) == [scenes.image_ids()[i] for i in PLAN.indices(1)]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_sample_that_fails_to_load_names_its_image_and_iteration(workers: int) -> None:
    failing = 6
    iteration = next(i for i in range(20) if failing in PLAN.indices(i))
    loader = BatchLoader(
        SampleBatches(Numbers(fail_at=failing), PLAN, stack), workers=workers, stop=20
    )
    try:
        with pytest.raises(SampleError, match=f"'img6' \\(iteration {iteration}\\).*truncated"):
            for i in range(iteration + 1):
                loader(i)
    finally:
        loader.close()


def test_a_loader_process_that_dies_is_reported_with_its_images_not_a_hang() -> None:
    killed = 6
    iteration = next(i for i in range(20) if killed in PLAN.indices(i))
    batches = SampleBatches(Numbers(kill_at=killed), PLAN, stack)
    loader = BatchLoader(batches, workers=1, stop=20, describe=batches.image_ids)
    expected = ", ".join(batches.image_ids(iteration))
    try:
        with pytest.raises(LoaderWorkerDied, match="killed by SIGKILL") as died:
            for i in range(iteration + 1):
                loader(i)
        assert f"iteration {iteration}, images {expected}" in str(died.value)
    finally:
        loader.close()


def test_bad_loader_settings_raise() -> None:
    with pytest.raises(ValueError, match="workers=-1"):
        BatchLoader(lambda i: i, workers=-1, stop=3)
    with pytest.raises(ValueError, match="prefetch=0"):
        BatchLoader(lambda i: i, workers=1, stop=3, prefetch=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_keeps_the_order_and_counts_unreadable_images(tmp_path: Path, workers: int) -> None:
    names = ["a.png", "b.jpg", "c.png", "d.png", "e.png"]
    pixels = {}
    for seed, name in enumerate(names):
        if name == "b.jpg":
            (tmp_path / name).write_bytes(b"\xff\xd8 definitely not a jpeg")
            continue
        pixels[name] = np.random.default_rng(seed).integers(0, 256, (40, 32 + seed, 3), np.uint8)
        Image.fromarray(pixels[name]).save(tmp_path / name)
    skips = SkipLog()
    samples = list(decoded(ImageFolder(str(tmp_path)), names, skips, workers=workers))
    assert [s.image_id for s in samples] == ["a.png", "c.png", "d.png", "e.png"]
    assert all(np.array_equal(s.image, pixels[s.image_id]) for s in samples)
    assert list(skips.reasons()) == ["b.jpg"]
    assert skips.reasons()["b.jpg"].startswith("not a decodable image")


def test_stack_pairs_sends_labels_as_bytes_with_the_same_values(
    segmentation_samples: SegmentationSamples,
) -> None:
    pairs = [segmentation_samples.load(i, variant=7) for i in (0, 3, 5)]
    images, targets = stack_pairs(pairs)
    assert images.dtype == torch.float32 and targets.dtype == torch.uint8
    assert torch.equal(images, torch.stack([image for image, _ in pairs]))
    assert torch.equal(targets.long(), torch.stack([target for _, target in pairs]))
