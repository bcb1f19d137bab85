"""Mask R-CNN distilled on the clustered object masks (Sec 3.2 "Distill Mask R-CNN", A.1).

Each image's single mined mask becomes one training instance: class c = its cluster (label
c + 1, 0 is background), box b = the mask's bounding box, mask M = the decoded RLE. The trained
model predicts many mask candidates per image with confidence scores (`predict`).

Backbones are torchvision ResNets with an FPN, or the paper's ResNet-50-C4 (Detectron2's),
which torchvision lacks and `maskdistill.detector_c4` builds from its parts; the default stays
`maskrcnn_resnet50_fpn`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, _default_anchorgen
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.transforms.functional import convert_image_dtype

from maskdistill.backbones import IMAGENET_MEAN, IMAGENET_STD
from maskdistill.data.base import Dataset
from maskdistill.detector_c4 import maskrcnn_resnet50_c4
from maskdistill.masks import decode_rle, mask_to_box
from maskdistill.rows import Rows
from maskdistill.weights import INITS, freeze_batchnorm, load_moco

C4 = "maskrcnn_resnet50_c4"
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet18_fpn", C4)
# A.1: shorter side drawn from [480, 800] in training (Detectron2's steps of 32), 800 at test.
TRAIN_SHORT_SIDES = tuple(range(480, 801, 32))


class MultiScaleTransform(GeneralizedRCNNTransform):
    """torchvision's resize + normalise, with a test size of its own.

    GeneralizedRCNNTransform draws the shorter side at random from `min_size` in training but
    uses `min_size[-1]` in eval, so one tuple cannot hold both A.1 settings (e.g. 480..800 in
    training, 800 at test, or a test size that is not the largest training size). This subclass
    sets `min_size` whenever the mode changes (`model.train()` / `model.eval()` reach it):
    `train_short_sides` in training, `(test_short_side,)` in eval.
    """

    def __init__(
        self, train_short_sides: Sequence[int], test_short_side: int, max_size: int
    ) -> None:
        super().__init__(
            tuple(train_short_sides), max_size, list(IMAGENET_MEAN), list(IMAGENET_STD)
        )
        self.train_short_sides = tuple(int(s) for s in train_short_sides)
        self.test_short_side = int(test_short_side)
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiScaleTransform:
        self.min_size = self.train_short_sides if mode else (self.test_short_side,)
        return super().train(mode)


def build_detector(
    *,
    arch: str = "maskrcnn_resnet50_fpn",
    num_classes: int,
    init: str = "none",
    init_path: str | None = None,
    trainable_backbone_layers: int = 3,
    train_batch_norm: bool = False,
    train_short_sides: Sequence[int] = TRAIN_SHORT_SIDES,
    test_short_side: int = 800,
    max_size: int = 1333,
    load_init: bool = True,
    **kwargs: Any,
) -> MaskRCNN:
    """A Mask R-CNN for `num_classes` classes, background included (clusters + 1).

    init: "moco" reads a MoCo (v1/v2) ResNet checkpoint from `init_path` (path or URI);
    "imagenet" takes torchvision's ImageNet ResNet weights, the only option that uses the
    network (torch hub download, or its cache); "none" is random.
    trainable_backbone_layers follows torchvision: 3 trains layer2-4 and freezes the stem and
    layer1 (A.1: the first two stages frozen); 5 trains everything. Unlike torchvision's
    builders it is honoured for every init. BatchNorm is FrozenBatchNorm2d in every frozen stage,
    and in the whole backbone when it is pretrained (moco, imagenet) unless `train_batch_norm`
    (the release: the MoCo init's BatchNorm trains); otherwise plain BatchNorm2d.
    load_init=False builds the same layers (frozen BatchNorm where `init` puts it) without
    reading or downloading the init weights: for loading a trained detector's state dict.
    kwargs go to torchvision's MaskRCNN (box_score_thresh, box_detections_per_img,
    box_batch_size_per_image, rpn_post_nms_top_n_train, ...).
    """
    _check_args(arch, num_classes, init, init_path, train_short_sides, test_short_side, max_size)
    if {"min_size", "max_size"} & kwargs.keys():
        raise ValueError("image sizes are train_short_sides, test_short_side and max_size")
    if arch == C4:
        model = maskrcnn_resnet50_c4(
            num_classes=num_classes,
            init=init,
            init_path=init_path,
            trainable_backbone_layers=trainable_backbone_layers,
            train_batch_norm=train_batch_norm,
            load_init=load_init,
            **kwargs,
        )
    else:
        backbone = _backbone(
            arch, init, trainable_backbone_layers, train_batch_norm, load_init=load_init
        )
        if init == "moco" and load_init:
            load_moco(backbone.body, str(init_path))
        model = _mask_rcnn(arch, backbone, num_classes, **kwargs)
    model.transform = MultiScaleTransform(train_short_sides, test_short_side, max_size)
    return model


def _check_args(
    arch: str,
    num_classes: int,
    init: str,
    init_path: str | None,
    train_short_sides: Sequence[int],
    test_short_side: int,
    max_size: int,
) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHS}")
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {INITS}")
    if (init == "moco") != (init_path is not None):
        raise ValueError(f"init_path must be given exactly when init='moco' (got init={init!r})")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: need background plus at least one class")
    sizes = [*train_short_sides, test_short_side, max_size]
    if not train_short_sides or min(sizes) <= 0:
        raise ValueError(f"image sizes must be positive, got {sizes}")


def _backbone(
    arch: str, init: str, trainable_layers: int, train_batch_norm: bool, *, load_init: bool
) -> BackboneWithFPN:
    """ResNet body + FPN with torchvision's stage freezing; frozen stages get frozen BN too."""
    depth = 18 if "resnet18" in arch else 50
    pretrained = init != "none"
    norm_layer = FrozenBatchNorm2d if pretrained and not train_batch_norm else nn.BatchNorm2d
    weights = _imagenet_weights(depth) if init == "imagenet" and load_init else None
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=weights, norm_layer=norm_layer)
    fpn_norm = nn.BatchNorm2d if arch.endswith("_v2") else None
    # A.1: the first two backbone stages frozen (trainable_layers=3: stem and layer1)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers, norm_layer=fpn_norm)
    freeze_batchnorm(backbone.body)
    return backbone


def _imagenet_weights(depth: int) -> Any:
    """torchvision's ImageNet weights, as its detection builders pick them (downloads)."""
    if depth == 18:
        return torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    return torchvision.models.ResNet50_Weights.IMAGENET1K_V1


def _mask_rcnn(arch: str, backbone: BackboneWithFPN, num_classes: int, **kwargs: Any) -> MaskRCNN:
    """torchvision's Mask R-CNN heads; the v2 ones (Li et al. 2021) for `*_v2`."""
    if not arch.endswith("_v2"):
        return MaskRCNN(backbone, num_classes=num_classes, **kwargs)
    channels = backbone.out_channels
    anchors = _default_anchorgen()
    return MaskRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead(
            (channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d
        ),
        mask_head=MaskRCNNHeads(channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d),
        **kwargs,
    )


class MaskTargets(torch.utils.data.Dataset[tuple[Tensor, dict[str, Tensor]]]):
    """Mask R-CNN training pairs from clustered mask rows (Sec 3.2: class, box and mask).

    rows: dicts with image_id, height, width, mask_rle (COCO RLE counts of a [height, width]
    mask) and a 0-based cluster, as in the cluster stage's output. The box is the (possibly
    flipped) mask's bounding box, so it always agrees with the mask.
    Horizontal flip with probability 0.5, decided by (seed, index, variant): `load(i,
    variant=v)` is stateless (safe from loader threads); `dataset[i]` uses `variant=epoch`, so
    setting `epoch` before each pass gives fresh flips that are still reproducible.
    """

    def __init__(
        self,
        rows: Rows,
        dataset: Dataset,
        *,
        hflip: bool = True,
        seed: int = 0,
    ) -> None:
        self.rows = rows  # a list, or `ShardedRows`: read a row group at a time
        self.dataset = dataset
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.load(index, variant=self.epoch)

    def image_id(self, index: int) -> str:
        return str(self.rows[index]["image_id"])

    def load(self, index: int, *, variant: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """Item `index` with the flip of `variant` (an epoch or iteration number)."""
        row = self.rows[index]
        image_id = str(row["image_id"])
        size = (int(row["height"]), int(row["width"]))
        image = self.dataset.load(image_id).image
        if image.shape[:2] != size:
            raise ValueError(
                f"{image_id}: image is {image.shape[0]}x{image.shape[1]} but its mask row says "
                f"{size[0]}x{size[1]}"
            )
        mask = decode_rle({"size": list(size), "counts": row["mask_rle"]})
        if self.flips(index, variant):
            image, mask = image[:, ::-1], mask[:, ::-1]
        return _image_tensor(image), _target(image_id, mask, int(row["cluster"]))

    def flips(self, index: int, variant: int) -> bool:
        """Whether item `index` is flipped in `variant`."""
        rng = np.random.default_rng((self.seed, index, variant))
        return self.hflip and bool(rng.random() < 0.5)


def _image_tensor(image: np.ndarray) -> Tensor:
    """uint8 [3, H, W] from uint8 [H, W, 3]: a quarter of float32's trip from a loader process
    (`detector_losses` scales it to 0..1 on the device)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _target(image_id: str, mask: np.ndarray, cluster: int) -> dict[str, Tensor]:
    """Sec 3.2: label c = cluster + 1 (0 is background), box b = the mask's box, mask M."""
    if cluster < 0:
        raise ValueError(f"{image_id}: cluster {cluster} is negative; clusters are 0-based")
    try:
        box = mask_to_box(mask)
    except ValueError as err:
        raise ValueError(f"{image_id}: {err}") from err
    return {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([cluster + 1], dtype=torch.int64),
        "masks": torch.from_numpy(np.ascontiguousarray(mask)).to(torch.uint8)[None],
    }


def collate(
    batch: Sequence[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images and targets as lists: detection images differ in size."""
    return [image for image, _ in batch], [target for _, target in batch]


def sync_batch_norm(model: nn.Module, *, world_size: int) -> nn.Module:
    """With several workers every trainable BatchNorm2d becomes SyncBatchNorm (statistics over
    the global batch, `detector.train_batch_norm`); FrozenBatchNorm2d stays as it is."""
    if world_size < 2:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def detector_losses(
    model: MaskRCNN, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Eq 3 plus the RPN terms: loss_classifier, loss_box_reg, loss_mask, loss_objectness,
    loss_rpn_box_reg. Puts the model in training mode. uint8 images (`MaskTargets`') are scaled
    to 0..1 where they are; float images are taken as 0..1 already."""
    model.train()
    scaled = [convert_image_dtype(image, torch.float32) for image in images]
    losses: dict[str, Tensor] = model(scaled, list(targets))
    return losses


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """Eq 3: the unweighted sum of the class, box and mask (and RPN) losses."""
    return torch.stack(list(losses.values())).sum()


@dataclass
class Candidates:
    """Object mask candidates of one image (Sec 3.2), best score first.

    masks: bool [M, H, W] at the input image's size; boxes: float32 [M, 4] x0, y0, x1, y1;
    scores: float32 [M]; classes: int64 [M], 0-based cluster ids (label - 1).
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


@torch.no_grad()
def predict(model: MaskRCNN, images: Sequence[Tensor]) -> list[Candidates]:
    """Mask candidates for float [3, H, W] images in 0..1; puts the model in eval mode.

    Masks are torchvision's pasted-back probabilities thresholded at 0.5.
    """
    model.eval()
    device = next(model.parameters()).device
    outputs = model([image.to(device) for image in images])
    return [_candidates(output) for output in outputs]


def _candidates(output: Mapping[str, Tensor]) -> Candidates:
    return Candidates(
        masks=(output["masks"][:, 0] > 0.5).cpu().numpy(),
        boxes=output["boxes"].float().cpu().numpy(),
        scores=output["scores"].float().cpu().numpy(),
        classes=(output["labels"] - 1).cpu().numpy().astype(np.int64),
    )
