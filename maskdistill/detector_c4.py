"""The paper's Mask R-CNN, ResNet-50-C4 (Detectron2's R50-C4, A.1), from torchvision parts.

C4: the ResNet up to layer3 (res4, stride 16, 1024 channels) is the backbone and gives one
feature map; the RPN runs on it with 15 anchors per place (sizes 32-512, ratios 0.5, 1, 2);
each proposal is RoI-aligned to 14 x 14 on it and layer4 (res5, stride 2 -> 7 x 7 x 2048) is
the box head, average-pooled into the class and box predictor. The mask branch uses the same
res5 module on the foreground proposals (shared weights, as Detectron2's shared res5) and
upsamples its 7 x 7 output 2x (a 256-channel transposed conv) to 14 x 14 mask logits.
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from maskdistill.weights import freeze_batchnorm, load_moco

# torchvision's trainable_backbone_layers order: the last n of these train
STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # Detectron2's C4 RPN: one map, every size on it
ASPECT_RATIOS = (0.5, 1.0, 2.0)
POOLER_SIZE = 14  # Detectron2's ROI_BOX_HEAD.POOLER_RESOLUTION for C4; res5 halves it to 7
RES4_CHANNELS, RES5_CHANNELS, MASK_CHANNELS = 1024, 2048, 256


class C4Backbone(nn.Sequential):
    """Stem and layer1-3 of a ResNet: one [B, 1024, H/16, W/16] map (`out_channels` for
    torchvision's MaskRCNN)."""

    out_channels = RES4_CHANNELS


class Res5Head(nn.Module):
    """layer4 on pooled RoIs: [R, 1024, 14, 14] -> [R, 2048, 7, 7]; `pool` averages to
    [R, 2048] for the box predictor."""

    def __init__(self, layer4: nn.Module, *, pool: bool) -> None:
        super().__init__()
        self.layer4 = layer4
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(x)
        return x.mean(dim=(2, 3)) if self.pool else x


def maskrcnn_resnet50_c4(
    *,
    num_classes: int,
    init: str = "none",
    init_path: str | None = None,
    trainable_backbone_layers: int = 3,
    train_batch_norm: bool = False,
    load_init: bool = True,
    **kwargs: Any,
) -> MaskRCNN:
    """R50-C4 Mask R-CNN for `num_classes` classes, background included (A.1).

    init: "moco" loads a MoCo ResNet-50 checkpoint (path or URI) strictly into the ResNet before
    it is split into backbone and res5 head; "imagenet" takes torchvision's weights (downloads);
    "none" is random. The last `trainable_backbone_layers` of (stem, layer1, ..., layer4) train,
    as in torchvision (3: stem and layer1 frozen). BatchNorm: FrozenBatchNorm2d in the frozen
    stages, and everywhere when the init is pretrained and `train_batch_norm` is False; else
    BatchNorm2d, which trains (the release fine-tunes the MoCo init's BatchNorm; convert to
    SyncBatchNorm for several workers). `load_init` False builds the same layers without
    reading the init. kwargs go to torchvision's MaskRCNN (rpn_post_nms_top_n_train, ...).
    """
    if not 0 <= trainable_backbone_layers <= len(STAGES):
        raise ValueError(
            f"trainable_backbone_layers={trainable_backbone_layers}: expected 0..{len(STAGES)}"
        )
    pretrained = init != "none"
    norm_layer = FrozenBatchNorm2d if pretrained and not train_batch_norm else nn.BatchNorm2d
    weights = (
        torchvision.models.ResNet50_Weights.IMAGENET1K_V1
        if init == "imagenet" and load_init
        else None
    )
    resnet = torchvision.models.resnet50(weights=weights, norm_layer=norm_layer)
    resnet.fc = nn.Identity()  # no classifier: the MoCo file has none either
    if init == "moco" and load_init:
        load_moco(resnet, str(init_path))
    trainable = STAGES[:trainable_backbone_layers]
    for name, param in resnet.named_parameters():
        if not name.startswith(trainable):  # A.1: the first stages stay frozen
            param.requires_grad_(False)
    freeze_batchnorm(resnet)
    backbone = C4Backbone(
        resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
        resnet.layer3,
    )  # fmt: skip
    anchors = AnchorGenerator(sizes=(ANCHOR_SIZES,), aspect_ratios=(ASPECT_RATIOS,))
    pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=POOLER_SIZE, sampling_ratio=0)
    return MaskRCNN(
        backbone,
        num_classes=None,  # the predictors below hold it
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(RES4_CHANNELS, anchors.num_anchors_per_location()[0]),
        box_roi_pool=pooler,
        box_head=Res5Head(resnet.layer4, pool=True),
        box_predictor=FastRCNNPredictor(RES5_CHANNELS, num_classes),
        mask_roi_pool=pooler,
        mask_head=Res5Head(resnet.layer4, pool=False),  # the same res5 weights
        mask_predictor=MaskRCNNPredictor(RES5_CHANNELS, MASK_CHANNELS, num_classes),
        **kwargs,
    )
