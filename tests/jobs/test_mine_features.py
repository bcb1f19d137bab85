"""The mine stage's object features: a clustering ViT of its own and native-resolution crops."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.mine import Miner
from maskdistill.clustering import object_view_native, object_views
from tests.jobs.conftest import tiny_config

OWN_VIT = "clustering.backbone={arch: vit_tiny_patch16_224, weights: random}"


def _objects() -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, int, int, int]]]:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    boxes = [(4, 6, 40, 30), (10, 2, 27, 39)]  # 36 x 24 and 17 x 37 crops (w x h)
    masks = []
    for x0, y0, x1, y1 in boxes:
        mask = np.zeros((40, 56), dtype=bool)
        mask[y0:y1, x0:x1] = True
        masks.append(mask)
    return images, masks, boxes


@pytest.mark.parametrize("crop", ["resize", "native"])
def test_a_clustering_backbone_of_its_own_gives_the_features(tmp_path: Path, crop: str) -> None:
    config = tiny_config(
        tmp_path, OWN_VIT, f"clustering.crop={crop}", "mining.resources.num_gpus=0"
    )
    miner = Miner(config)
    vit = miner.feature_backbone
    assert vit is not miner.backbone
    assert (miner.backbone.embed_dim, vit.embed_dim) == (64, 192)  # test_vit mines, ViT-Ti clusters
    images, masks, boxes = _objects()
    features = miner._features(images, masks, boxes)
    assert features.shape == (2, 192)
    with torch.no_grad():
        if crop == "native":  # one forward per object at its own (padded) size: 48 x 32, 32 x 48
            views = [
                object_view_native(i, m, b, mode="crop", patch_size=16)
                for i, m, b in zip(images, masks, boxes, strict=True)
            ]
            assert [tuple(v.shape[1:]) for v in views] == [(32, 48), (48, 32)]
            expected = torch.cat([vit.cls_features(v[None]) for v in views])
        else:
            expected = vit.cls_features(object_views(images, masks, boxes, mode="crop", size=32))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_without_a_clustering_backbone_the_mining_vit_gives_the_features(tmp_path: Path) -> None:
    miner = Miner(tiny_config(tmp_path, "mining.resources.num_gpus=0"))
    assert miner.feature_backbone is miner.backbone
    images, masks, boxes = _objects()
    assert miner._features(images, masks, boxes).shape == (2, 64)
    assert miner._features([], [], []).shape == (0, 64)
