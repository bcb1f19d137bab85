"""The mine stage's object features: a clustering ViT of its own and native-resolution crops."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.mine import Miner
from maskdistill.backbones import to_model_input
from maskdistill.masks import decode_rle, mask_to_box
from tests.jobs.conftest import tiny_config

OWN_VIT = "clustering.backbone={arch: vit_tiny_patch16_224, weights: random}"


def _batch() -> dict[str, np.ndarray]:
    """Three images as the decode tasks hand them over; the middle one was unreadable."""
    rng = np.random.default_rng(3)
    images = np.empty(3, dtype=object)
    images[:] = [
        rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        np.zeros((0, 0, 3), dtype=np.uint8),
        rng.integers(0, 256, (52, 36, 3), dtype=np.uint8),
    ]
    return {
        "image_id": np.array(["a", "b", "c"]),
        "shard": np.zeros(3, dtype=np.int64),
        "reason": np.array(["", "unreadable", ""]),
        "image": images,
    }


def _reference_view(image: np.ndarray, box: tuple[int, ...], crop: str) -> torch.Tensor:
    """The object's box crop the per-object way: resized to 32 x 32 (antialiased), or at its
    own resolution padded with the mean colour (0) to multiples of 16 (`native`)."""
    x0, y0, x1, y1 = box
    view = to_model_input(torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1]))[None])
    if crop == "native":
        return F.pad(view, (0, -(x1 - x0) % 16, 0, -(y1 - y0) % 16))
    return F.interpolate(view, size=(32, 32), mode="bilinear", antialias=True)


@pytest.mark.parametrize("crop", ["resize", "native"])
def test_a_clustering_backbone_of_its_own_gives_the_features(tmp_path: Path, crop: str) -> None:
    config = tiny_config(
        tmp_path, OWN_VIT, f"clustering.crop={crop}", "mining.resources.num_gpus=0"
    )
    miner = Miner(config)
    vit = miner.feature_backbone
    assert vit is not miner.backbone
    assert (miner.backbone.embed_dim, vit.embed_dim) == (64, 192)  # test_vit mines, ViT-Ti clusters
    batch = _batch()
    out = miner(batch)
    assert out["image_id"].tolist() == ["a", "c", "b"]  # the readable ones first, in order
    assert out["feature"].shape == (3, 192) and not out["feature"][2].any()
    for row, index in enumerate([0, 2]):
        image = batch["image"][index]
        mask = decode_rle({"size": list(image.shape[:2]), "counts": out["mask_rle"][row]})
        box = tuple(int(v) for v in out["bbox"][row])
        assert box == mask_to_box(mask)
        with torch.no_grad():
            expected = vit.cls_features(_reference_view(image, box, crop))[0].numpy()
        # batched views match the per-object crop + resize within 1e-4 (clustering.object_views)
        np.testing.assert_allclose(out["feature"][row], expected, rtol=0, atol=1e-4)


def test_without_a_clustering_backbone_the_mining_vit_gives_the_features(tmp_path: Path) -> None:
    miner = Miner(tiny_config(tmp_path, "mining.resources.num_gpus=0"))
    assert miner.feature_backbone is miner.backbone
    assert miner(_batch())["feature"].shape == (3, 64)
    nothing = {key: value[1:2] for key, value in _batch().items()}  # only the unreadable one
    assert miner(nothing)["feature"].shape == (1, 64)
