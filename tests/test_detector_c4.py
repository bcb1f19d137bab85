"""The paper's R50-C4 Mask R-CNN (A.1) from torchvision parts, and the BatchNorm switch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskdistill.detector import build_detector, detector_losses, predict, sync_batch_norm
from maskdistill.detector_c4 import C4Backbone, Res5Head
from maskdistill.weights import MOCO_PREFIX
from tests.moco import moco_release_state, save_moco

NUM_CLASSES = 3
# tiny images and few RoIs: res5 runs once per RoI, the whole of C4's cost
TINY: dict[str, Any] = {
    "arch": "maskrcnn_resnet50_c4",
    "num_classes": NUM_CLASSES,
    "train_short_sides": (64,),
    "test_short_side": 64,
    "max_size": 96,
    "rpn_pre_nms_top_n_train": 60,
    "rpn_post_nms_top_n_train": 30,
    "rpn_pre_nms_top_n_test": 30,
    "rpn_post_nms_top_n_test": 4,
    "box_batch_size_per_image": 4,  # 1 positive (x 0.25) per image for the mask branch
    "box_detections_per_img": 2,
}
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="module")
def moco_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_moco(moco_release_state(5), tmp_path_factory.mktemp("moco") / "moco_v2.pth.tar")


def _batch(size: int = 2) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for label, (y0, x0) in ((1, (8, 10)), (2, (20, 4)))[:size]:
        mask = torch.zeros(64, 64, dtype=torch.uint8)
        mask[y0 : y0 + 30, x0 : x0 + 36] = 1
        box = torch.tensor([[x0, y0, x0 + 36, y0 + 30]], dtype=torch.float32)
        images.append(torch.rand(3, 64, 64, generator=generator))
        targets.append({"boxes": box, "labels": torch.tensor([label]), "masks": mask[None]})
    return images, targets


@pytest.mark.parametrize("train_batch_norm", [False, True])
def test_c4_trains_every_trainable_parameter_and_batchnorm_only_when_asked(
    moco_file: str, train_batch_norm: bool
) -> None:
    torch.manual_seed(0)
    model = build_detector(
        **TINY, init="moco", init_path=moco_file, train_batch_norm=train_batch_norm
    )
    assert isinstance(model.backbone, C4Backbone) and model.backbone.out_channels == 1024
    assert isinstance(model.roi_heads.box_head, Res5Head)
    assert model.roi_heads.box_head.layer4 is model.roi_heads.mask_head.layer4  # shared res5
    losses = detector_losses(model, *_batch(1))
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()  # type: ignore[union-attr]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in trainable.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # A.1: stem and layer1 frozen (backbone.0/1 = conv1/bn1, backbone.4 = layer1), layer2-4 train
    frozen = ("backbone.0.", "backbone.1.", "backbone.4.")
    assert not any(n.startswith(frozen) for n in trainable)
    assert any(n.startswith("backbone.6.") for n in trainable)  # layer3
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    trained_norms = [m for m in norms if isinstance(m, nn.BatchNorm2d)]
    bn_params = [n for n in trainable if ".bn" in n or ".downsample.1." in n]
    if train_batch_norm:  # layer2-4's BatchNorm trains; the frozen stages' stays frozen
        assert trained_norms and bn_params
        assert isinstance(model.backbone[1], FrozenBatchNorm2d)
        assert all(trainable[n].grad is not None for n in bn_params)
    else:
        assert trained_norms == [] and bn_params == []
        assert all(isinstance(m, FrozenBatchNorm2d) for m in norms)


def test_c4_moco_init_fills_backbone_and_res5_and_reloads_strictly(moco_file: str) -> None:
    state = torch.load(moco_file, weights_only=True)["state_dict"]
    model = build_detector(**TINY, init="moco", init_path=moco_file)
    assert torch.equal(
        model.backbone[6][0].conv1.weight, state[f"{MOCO_PREFIX}layer3.0.conv1.weight"]
    )
    assert torch.equal(
        model.roi_heads.box_head.layer4[2].conv3.weight,
        state[f"{MOCO_PREFIX}layer4.2.conv3.weight"],
    )
    # what the distill stage does: the same layers without the init, the trained state strictly
    again = build_detector(**TINY, init="moco", init_path=moco_file, load_init=False)
    again.load_state_dict(model.state_dict())
    found = predict(again, _batch()[0])
    assert len(found) == 2 and all(c.masks.shape[1:] == (64, 64) for c in found)


def test_sync_batch_norm_only_with_several_workers() -> None:
    model = build_detector(**TINY, train_batch_norm=True)  # random init: plain BatchNorm
    assert sync_batch_norm(model, world_size=1) is model
    synced = sync_batch_norm(model, world_size=2)
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
