"""The final semantic segmentation model, trained on the confident pseudo labels (Sec 3.3, Eq 4).

DeepLab-v3 on a dilated ResNet (Sec 4.1, A.3): torchvision's `DeepLabV3` with a `DeepLabHead`
(ASPP) on the ResNet's last stage, no auxiliary head, `num_classes` = clusters + 1 outputs.
Training uses hard pixel mining (`hard_pixel_loss`, Eq 4) on `SegmentationSamples`, which
applies MaskContrast's augmentations (A.3) to each image and its pseudo-label map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import default_collate
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from maskdistill.backbones import to_model_input
from maskdistill.data.base import IGNORE_INDEX, Dataset
from maskdistill.pseudolabels import decode_label_map
from maskdistill.rows import Rows
from maskdistill.weights import INITS, freeze_batchnorm, load_moco

BACKBONES = ("resnet50", "resnet18")
OUTPUT_STRIDES = (8, 16)
# ResNet stages in order: the stem, then layer1-4; `frozen_stages` freezes a prefix of them
STAGE_MODULES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
PAPER_FROZEN_STAGES = 2  # Sec 4.1 "we freeze the first two ResNet blocks": stem + layer1
AUGMENTS = ("scale_rotate_crop", "fixed_resize")
_FEATURE_CHANNELS = {"resnet50": 2048, "resnet18": 512}
# DeepLab-v3's ASPP rates at output stride 16, doubled at 8 (torchvision's 12, 24, 36)
_ASPP_RATES_OS16 = (6, 12, 18)


def build_segmenter(
    *,
    num_classes: int,
    init: str = "none",
    init_path: str | None = None,
    output_stride: int = 8,
    backbone: str = "resnet50",
    frozen_stages: int = PAPER_FROZEN_STAGES,
) -> DeepLabV3:
    """DeepLab-v3 with a dilated ResNet for `num_classes` classes, background included.

    output_stride 8 dilates layer3 and layer4 instead of striding them, 16 only layer4 (the
    ASPP rates follow: 12, 24, 36 at 8; 6, 12, 18 at 16). `backbone` "resnet18" is for CPU tests
    and demos: torchvision's BasicBlock refuses dilation, so its layers are dilated here by
    `_dilate_stage`, which gives exactly the dense version of the strided network.
    init: "moco" loads a MoCo (v1/v2) ResNet checkpoint from `init_path` (path or URI) strictly
    into the ResNet body; "imagenet" takes torchvision's ImageNet weights (downloads); "none"
    is random.
    The first `frozen_stages` of (stem, layer1, layer2, layer3, layer4) are frozen for every
    init (Sec 4.1: 2, the stem and layer1; the release: 3, also layer2): requires_grad False,
    and their BatchNorms are FrozenBatchNorm2d so their running statistics never change either.
    The later stages and the head train, with ordinary BatchNorm (so training batches need >= 2
    images: the ASPP pooling branch normalises one value per image).
    """
    _check_args(num_classes, init, init_path, output_stride, backbone)
    resnet = _dilated_resnet(backbone, init, output_stride)
    body = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    _freeze_stages(body, frozen_stages)
    if init == "moco":
        load_moco(body, str(init_path))
    rates = tuple(rate * 16 // output_stride for rate in _ASPP_RATES_OS16)
    head = DeepLabHead(_FEATURE_CHANNELS[backbone], num_classes, atrous_rates=rates)
    return DeepLabV3(body, head, aux_classifier=None)


def _check_args(
    num_classes: int, init: str, init_path: str | None, output_stride: int, backbone: str
) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone {backbone!r}: expected one of {BACKBONES}")
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {INITS}")
    if (init == "moco") != (init_path is not None):
        raise ValueError(f"init_path must be given exactly when init='moco' (got init={init!r})")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride {output_stride}: expected one of {OUTPUT_STRIDES}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: need background plus at least one class")


def _dilated_resnet(backbone: str, init: str, output_stride: int) -> torchvision.models.ResNet:
    """A torchvision ResNet whose last stages are dilated instead of strided (Sec 4.1)."""
    dilate = [False, output_stride == 8, True]
    if backbone == "resnet50":
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if init == "imagenet" else None
        return torchvision.models.resnet50(weights=weights, replace_stride_with_dilation=dilate)
    weights18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if init == "imagenet" else None
    resnet = torchvision.models.resnet18(weights=weights18)
    dilation = 1
    for stage, dilated in zip((resnet.layer2, resnet.layer3, resnet.layer4), dilate, strict=True):
        if dilated:
            dilation *= 2
            _dilate_stage(stage, dilation)
    return resnet


def _dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Replace a ResNet stage's stride 2 by dilation, as torchvision does for Bottleneck.

    Every conv loses its stride; the formerly strided 3x3 conv takes the previous dilation
    (dilation // 2), every other 3x3 conv `dilation`, padding = dilation. The output is then the
    strided stage's output computed at every position (a trous): same weights, denser grid.
    """
    for conv in (m for m in stage.modules() if isinstance(m, nn.Conv2d)):
        strided = conv.stride == (2, 2)
        conv.stride = (1, 1)
        if conv.kernel_size == (3, 3):
            rate = dilation // 2 if strided else dilation
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)


def frozen_modules(frozen_stages: int) -> tuple[str, ...]:
    """The ResNet modules the first `frozen_stages` stages consist of (0..5)."""
    if not 0 <= frozen_stages <= len(STAGE_MODULES):
        raise ValueError(f"frozen_stages={frozen_stages}: expected 0..{len(STAGE_MODULES)}")
    return tuple(name for stage in STAGE_MODULES[:frozen_stages] for name in stage)


def _freeze_stages(body: nn.Module, frozen_stages: int) -> None:
    """Sec 4.1: no gradient for the frozen stages; their BatchNorms become FrozenBatchNorm2d."""
    for name in frozen_modules(frozen_stages):
        getattr(body, name).requires_grad_(False)
    freeze_batchnorm(body)


def hard_pixel_loss(
    logits: Tensor, target: Tensor, *, fraction: float = 0.2, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Eq 4: cross-entropy over the `fraction` hardest valid pixels of the whole batch.

    logits: float [B, C, H, W]; target: int64 [B, H, W] with `ignore_index` for unlabelled
    pixels. The k = max(1, floor(fraction * valid pixels)) pixels with the largest loss are
    kept and their losses averaged (Eq 4's constant 1/|C| is left out: it only rescales the
    learning rate). With no valid pixel the loss is 0, still attached to the graph.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: expected 0 < fraction <= 1")
    pixel_losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = pixel_losses[target != ignore_index]
    if valid.numel() == 0:
        return logits.sum() * 0.0
    k = max(1, math.floor(fraction * valid.numel()))
    return valid.topk(k, sorted=False).values.mean()


def segmenter_losses(
    model: nn.Module, images: Tensor, targets: Tensor, *, fraction: float = 0.2
) -> dict[str, Tensor]:
    """{"loss_seg": Eq 4} for normalised images [B, 3, H, W] and targets [B, H, W] (B >= 2).

    Puts the model in training mode.
    """
    model.train()
    logits = model(images)["out"]
    return {"loss_seg": hard_pixel_loss(logits, targets.long(), fraction=fraction)}


@torch.no_grad()
def predict_batch(model: nn.Module, images: Tensor) -> Tensor:
    """Class ids int64 [B, H, W] (on the CPU) for normalised images [B, 3, H, W].

    A.3: at the input resolution; torchvision's DeepLab-v3 upsamples its logits bilinearly to
    the input size before the argmax. Puts the model in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    logits = model(images.to(device))["out"]
    return logits.argmax(dim=1).cpu()


def predict_segmentation(model: nn.Module, image: Tensor) -> Tensor:
    """Class ids int64 [H, W] for one normalised image [3, H, W] (see `predict_batch`)."""
    return predict_batch(model, image[None])[0]


def normalize(image: np.ndarray) -> Tensor:
    """float32 [3, H, W], ImageNet-normalised, from uint8 [H, W, 3] RGB."""
    return to_model_input(torch.from_numpy(np.require(image, requirements=["C", "W"]))[None])[0]


def stack_pairs(pairs: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Images float [B, 3, crop, crop] and targets uint8 [B, crop, crop] of `SegmentationSamples`
    items: labels and IGNORE_INDEX fit a byte, an eighth of int64's trip from a loader process
    (`segmenter_losses` widens them on the device); stacked straight into shared memory there."""
    images, targets = default_collate([(image, target.to(torch.uint8)) for image, target in pairs])
    return images, targets


class SegmentationSamples(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Training pairs (image, pseudo-label map) with MaskContrast's augmentations (A.3).

    rows: mappings with `image_id` and `label_png` (`encode_label_map` bytes of the image's
    [H, W] label map, as the distill stage writes). Each item is scaled by a factor drawn from
    `scale_range` and rotated by an angle drawn from +-`rotation_degrees` in one resampling
    (image bilinear, labels nearest; ScaleNRotate), flipped horizontally with probability 0.5
    if `hflip`, then (`augment` "scale_rotate_crop") cropped at a random place to `crop_size` x
    `crop_size`, padded where the image is smaller. With "fixed_resize" (the release's
    FixedResize) the scale zooms in the image's own frame and that frame is resized to
    `crop_size` x `crop_size`, all in one resampling: no crop, aspect not kept. Pixels from
    outside the image are IGNORE_INDEX in the label and 0 in the normalised image (the mean
    colour).
    Randomness comes only from (seed, index, variant): `load(i, variant=v)` is stateless (safe
    from loader threads); `dataset[i]` uses `variant=epoch`, so setting `epoch` before each pass
    gives fresh augmentations that are still reproducible. `label_lookup` (uint8 [256],
    `ClassMap.lookup`) maps the stored labels to the trained ones: merges, background clusters.
    """

    def __init__(
        self,
        rows: Rows,
        dataset: Dataset,
        *,
        crop_size: int,
        scale_range: tuple[float, float] = (0.75, 1.25),
        rotation_degrees: float = 5.0,
        hflip: bool = True,
        seed: int = 0,
        label_lookup: np.ndarray | None = None,
        augment: str = "scale_rotate_crop",
    ) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r}: expected one of {AUGMENTS}")
        if crop_size < 1:
            raise ValueError(f"crop_size={crop_size}: expected >= 1")
        if not 0.0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range={scale_range}: expected 0 < low <= high")
        if rotation_degrees < 0:
            raise ValueError(f"rotation_degrees={rotation_degrees}: expected >= 0")
        self.rows = rows  # a list, or `ShardedRows`: read a row group at a time
        self.dataset = dataset
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotation_degrees = float(rotation_degrees)
        self.hflip = hflip
        self.seed = seed
        self.label_lookup = label_lookup
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.load(index, variant=self.epoch)

    def image_id(self, index: int) -> str:
        return str(self.rows[index]["image_id"])

    def load(self, index: int, *, variant: int = 0) -> tuple[Tensor, Tensor]:
        """Image float32 [3, crop, crop] (normalised) and target int64 [crop, crop]."""
        image, label = self._read(index)
        rng = np.random.default_rng((self.seed, index, variant))
        scale = rng.uniform(*self.scale_range)
        angle = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
        flip = self.hflip and bool(rng.random() < 0.5)
        if self.augment == "fixed_resize":
            out = (self.crop_size, self.crop_size)
            image, label = _warp(image, label, _sampling_grid(label.shape, out, angle, zoom=scale))
            return (image.flip(-1), label.flip(-1)) if flip else (image, label)
        image, label = _scale_rotate(image, label, scale, angle)
        if flip:
            image, label = image.flip(-1), label.flip(-1)
        height, width = label.shape
        top = _offset(rng, height, self.crop_size)
        left = _offset(rng, width, self.crop_size)
        return (
            _crop(image, top, left, self.crop_size, 0.0),
            _crop(label, top, left, self.crop_size, IGNORE_INDEX),
        )

    def _read(self, index: int) -> tuple[Tensor, Tensor]:
        """Normalised image [3, H, W] and int64 labels [H, W] of row `index`."""
        row = self.rows[index]
        image_id = str(row["image_id"])
        image = self.dataset.load(image_id).image
        label = decode_label_map(row["label_png"])
        if self.label_lookup is not None:
            label = self.label_lookup[label]
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{image_id}: image is {image.shape[0]}x{image.shape[1]} but its label map is "
                f"{label.shape[0]}x{label.shape[1]}"
            )
        return normalize(image), torch.from_numpy(label.astype(np.int64))


def _scale_rotate(
    image: Tensor, label: Tensor, scale: float, angle: float
) -> tuple[Tensor, Tensor]:
    """A.3 ScaleNRotate: resize by `scale` and rotate by `angle` degrees about the centre.

    One inverse mapping per output pixel: the output canvas is the scaled image's size, image
    bilinear (0 outside), labels nearest (IGNORE_INDEX outside).
    """
    height, width = label.shape
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    return _warp(image, label, _sampling_grid((height, width), (out_h, out_w), angle))


def _warp(image: Tensor, label: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Image bilinear (0 outside) and labels nearest (IGNORE_INDEX outside) at `grid`."""
    warped = F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]
    # labels shifted by one so that grid_sample's zero padding marks the outside
    shifted = (label + 1).to(torch.float32)[None, None]
    sampled = F.grid_sample(shifted, grid, mode="nearest", align_corners=False)[0, 0]
    outside = sampled == 0
    labels = (sampled.round().to(torch.int64) - 1).masked_fill(outside, IGNORE_INDEX)
    return warped, labels


def _sampling_grid(
    size: Sequence[int], out_size: tuple[int, int], degrees: float, *, zoom: float = 1.0
) -> Tensor:
    """grid_sample grid [1, out_h, out_w, 2]: for each output pixel centre, its source position.

    Output pixel p (relative to the output centre) comes from R S^-1 p / zoom (relative to the
    input centre), R the rotation by `degrees`, S the per-axis scale out / in.
    """
    (height, width), (out_h, out_w) = size, out_size
    ys = torch.arange(out_h, dtype=torch.float64) + 0.5 - out_h / 2
    xs = torch.arange(out_w, dtype=torch.float64) + 0.5 - out_w / 2
    y, x = (ys * height / out_h / zoom)[:, None], (xs * width / out_w / zoom)[None, :]
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    grid = torch.empty((1, out_h, out_w, 2), dtype=torch.float32)  # float64 sums, rounded once
    grid[0, ..., 0] = 2 * (cos * x - sin * y + width / 2) / width - 1
    grid[0, ..., 1] = 2 * (sin * x + cos * y + height / 2) / height - 1
    return grid


def _offset(rng: np.random.Generator, length: int, crop: int) -> int:
    """Start of a random crop window along one axis; negative when the window is larger."""
    low, high = min(0, length - crop), max(0, length - crop)
    return int(rng.integers(low, high + 1))


def _crop(tensor: Tensor, top: int, left: int, size: int, fill: float) -> Tensor:
    """The [..., size, size] window at (top, left) of `tensor`, `fill` where it leaves it."""
    height, width = tensor.shape[-2:]
    out = torch.full((*tensor.shape[:-2], size, size), fill, dtype=tensor.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, height), min(left + size, width)
    out[..., y0 - top : y1 - top, x0 - left : x1 - left] = tensor[..., y0:y1, x0:x1]
    return out
