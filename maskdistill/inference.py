"""The trained models as plain objects, loaded strictly from a run directory or an export
folder (`maskdistill.release.read_model`). Ray-free.

The segmenter (`Segmenter`) serves the evaluation stage, `maskdistill predict` and the HTTP
service; the distilled Mask R-CNN (`Detector`, `load_detector`) the distill stage, `predict
--instances` and the service's `/instances`. The architecture comes from the source's config
(or the one given); the weights from `<stage>/model.pt` or `<stage>/model.safetensors`.

Labels follow the pseudo labels (`maskdistill.pseudolabels`): 0 is background, `1 + k` is
cluster `k`. Their names come from `evaluate/class_names.json` when the evaluation stage has
matched clusters to ground-truth classes (Hungarian, Sec 4.1), else "background", "cluster 0", ...
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import DeepLabV3

from maskdistill.backbones import to_model_input
from maskdistill.config import DetectorConfig, ExperimentConfig, SegmenterConfig
from maskdistill.detector import Candidates, build_detector, predict
from maskdistill.masks import pad_to_multiple, patch_grid, resize_nearest
from maskdistill.names import BACKGROUND
from maskdistill.pseudolabels import confident_masks
from maskdistill.release import LoadedModel, read_model
from maskdistill.segmenter import build_segmenter
from maskdistill.stages import DETECTOR, SEGMENTER

SIDE_STEP = 32  # detector train shorter sides: low, low + 32, ..., high (detectron2's choices)


def detector_from_config(
    det: DetectorConfig, *, num_classes: int, load_init: bool = True
) -> torch.nn.Module:
    """The Mask R-CNN a run's config describes (A.1); its init weights only with `load_init`."""
    low, high = det.train_short_side
    return build_detector(
        arch=det.arch,
        num_classes=num_classes,
        init=det.init,
        init_path=det.init_path,
        trainable_backbone_layers=det.trainable_backbone_layers,
        train_batch_norm=det.train_batch_norm,
        train_short_sides=tuple(range(low, high, SIDE_STEP)) + (high,),
        test_short_side=det.test_short_side,
        max_size=det.max_size,
        rpn_post_nms_top_n_train=det.proposals_per_image,
        rpn_post_nms_top_n_test=det.test_proposals_per_image,
        box_batch_size_per_image=det.roi_batch_size,
        box_detections_per_img=det.detections_per_image,
        load_init=load_init,
    )


def load_detector(
    source: str,
    *,
    device: torch.device | str = "cpu",
    config: ExperimentConfig | None = None,
) -> torch.nn.Module:
    """The trained detector of a run directory or export (strictly), in eval mode; the
    architecture from `config`, by default the source's own."""
    return build_model(read_model(source, DETECTOR, config=config), DETECTOR).to(device)


def build_model(loaded: LoadedModel, stage: str) -> nn.Module:
    """The stage's torchvision model with `loaded.state` loaded strictly, in eval mode, on the
    CPU (no init weights read: the state replaces them)."""
    config = loaded.config
    if stage == SEGMENTER:
        seg = config.segmenter.model_copy(update={"init": "none", "init_path": None})
        model = segmenter_from_config(seg, num_classes=loaded.num_classes)
    else:
        model = detector_from_config(
            config.detector, num_classes=loaded.num_classes, load_init=False
        )
    model.load_state_dict(loaded.state)
    return model.eval()


@dataclass
class Instance:
    """One object the detector found in an image (Sec 3.3's confident masks).

    label: 1 + cluster id (the segmenter's labels); box: x0, y0, x1, y1 in pixels of the
    original image; mask: bool [H, W] at the original size.
    """

    label: int
    name: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray


class Detector:
    """The distilled Mask R-CNN on new images, keeping what the run's pseudo labels keep:
    candidates with score > tau, or the best one when none passes and `keep_best_when_none`
    (Sec 3.3, 4.1), less the instances of clusters named "background". With `max_side` the
    detector sees the image with its longer side at most that (it then resizes to its own test
    scale) and masks are scaled back by nearest neighbour.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        *,
        tau: float = 0.9,
        keep_best_when_none: bool = True,
        max_side: int | None = None,
    ) -> None:
        confident_masks(np.zeros(0, dtype=np.float32), tau=tau)  # checks tau
        self.model = model.eval()
        self.class_names = list(class_names)
        self.device = next(model.parameters()).device
        self.tau = tau
        self.keep_best_when_none = keep_best_when_none
        self.max_side = max_side

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: torch.device | str = "cpu",
        max_side: int | None = None,
        tau: float | None = None,
    ) -> Detector:
        """The detector of a run directory or export folder, with its class names and its
        `pseudo_labels` rule (`tau` replaces the run's threshold)."""
        loaded = read_model(source, DETECTOR)
        rule = loaded.config.pseudo_labels
        return cls(
            build_model(loaded, DETECTOR).to(device),
            loaded.class_names,
            tau=rule.tau if tau is None else tau,
            keep_best_when_none=rule.keep_best_when_none,
            max_side=max_side,
        )

    @torch.no_grad()
    def instances(
        self, images: Sequence[np.ndarray], *, tau: float | None = None
    ) -> list[list[Instance]]:
        """The kept instances of each uint8 RGB [H, W, 3] image, most confident first."""
        _check_images(images)
        tau = self.tau if tau is None else tau
        inputs = []
        for image in images:
            x = torch.tensor(image, device=self.device).permute(2, 0, 1).float().div(255)
            size = working_size(image.shape[:2], self.max_side)
            if size != image.shape[:2]:
                x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0]
            inputs.append(x)
        found = predict(self.model, inputs) if inputs else []
        return [
            self._kept(candidates, image.shape[:2], tau)
            for candidates, image in zip(found, images, strict=True)
        ]

    def _kept(self, found: Candidates, size: tuple[int, int], tau: float) -> list[Instance]:
        kept = confident_masks(found.scores, tau=tau, keep_best_when_none=self.keep_best_when_none)
        scale_y = size[0] / found.masks.shape[1] if found.masks.size else 1.0
        scale_x = size[1] / found.masks.shape[2] if found.masks.size else 1.0
        out = []
        for i in kept.tolist():
            x0, y0, x1, y1 = (float(v) for v in found.boxes[i])
            label = 1 + int(found.classes[i])
            if self.class_names[label] == BACKGROUND:
                continue  # a cluster the user (names.yaml) or the matching calls background
            out.append(
                Instance(
                    label=label,
                    name=self.class_names[label],
                    score=float(found.scores[i]),
                    box=(x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y),
                    mask=resize_nearest(found.masks[i], size),
                )
            )
        return out


def segmenter_from_config(seg: SegmenterConfig, *, num_classes: int) -> nn.Module:
    """The segmenter architecture a run's config describes (weights not loaded)."""
    return build_segmenter(
        num_classes=num_classes,
        init=seg.init,
        init_path=seg.init_path,
        output_stride=seg.output_stride,
        backbone=seg.backbone,
        frozen_stages=seg.frozen_stages,
    )


def working_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(H, W) scaled down, aspect kept, so the longer side is at most `max_side` (None: as is)."""
    height, width = size
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def padded_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """`size` rounded up to multiples of `multiple`: the canonical shape an image is padded to
    (`masks.pad_to_multiple`'s)."""
    rows, cols = patch_grid(size, multiple)
    return rows * multiple, cols * multiple


class Segmenter:
    """A trained segmenter with its label names.

    max_side None (the evaluation's protocol, A.3): every image at its own resolution, images of
    one size in one forward pass. max_side N (photos, the service): the forward runs with the
    longer side at most N, each image zero-padded to its size rounded up to `pad_multiple`, so
    images of different sizes that round alike share a forward pass and an image's answer never
    depends on the others in its batch; the logits are cropped back and upsampled (bilinear) to
    the original size.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        *,
        precision: str = "fp32",
        max_side: int | None = None,
        pad_multiple: int = 128,
    ) -> None:
        if max_side is not None and max_side < MIN_SIDE:
            raise ValueError(f"max_side={max_side}: expected None or >= {MIN_SIDE}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple={pad_multiple}: expected >= 1")
        self.model = model.eval()
        self.class_names = list(class_names)
        self.device = next(model.parameters()).device
        self.autocast = precision == "bf16" and self.device.type == "cuda"
        self.max_side = max_side
        self.pad_multiple = pad_multiple

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: torch.device | str = "cpu",
        config: ExperimentConfig | None = None,
        max_side: int | None = None,
        pad_multiple: int = 128,
        folder: str | None = None,
    ) -> Segmenter:
        """The segmenter of a run directory or export folder (strictly) with its class names;
        the architecture from `config`, by default the source's own. `folder`: which of a run's
        segmenters (`release.read_model`; by default the last self-training round's)."""
        loaded = read_model(source, SEGMENTER, config=config, folder=folder)
        return cls(
            build_model(loaded, SEGMENTER).to(device),
            loaded.class_names,
            precision=loaded.config.segmenter.precision,
            max_side=max_side,
            pad_multiple=pad_multiple,
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def logits(self, images: Sequence[np.ndarray]) -> list[Tensor]:
        """float32 [C, H, W] logits for each uint8 RGB [H, W, 3] image, on the CPU."""
        return [t.float().cpu() for t in self._full_size(images, lambda logits: logits)]

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """int64 label maps [H, W], one per image (the argmax taken on the model's device)."""
        if self.max_side is None:
            labels = self._full_size(images, lambda logits: logits.argmax(dim=1))
            return [t.cpu().numpy() for t in labels]
        _check_images(images)
        small = self._scaled(images)
        return [
            upsampled_argmax(logits, image.shape[:2]).cpu().numpy()
            for logits, image in zip(small, images, strict=True)
        ]

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """float32 softmax [C, H, W] per image (for the dense CRF)."""
        softmax = self._full_size(images, lambda logits: logits.float().softmax(dim=1))
        return [t.cpu().numpy() for t in softmax]

    def _full_size(
        self, images: Sequence[np.ndarray], reduce: Callable[[Tensor], Tensor]
    ) -> list[Tensor]:
        """`reduce` of the logits [B, C, H, W] at each image's size, split per image."""
        _check_images(images)
        if self.max_side is None:
            return self._per_size(images, reduce)
        return [
            reduce(_resize(logits[None], image.shape[:2]))[0]
            for logits, image in zip(self._scaled(images), images, strict=True)
        ]

    @torch.no_grad()
    def _per_size(
        self, images: Sequence[np.ndarray], reduce: Callable[[Tensor], Tensor]
    ) -> list[Tensor]:
        """`reduce` of the logits of each same-size group, split per image. Images go to the
        device as uint8 and are normalised there; A.3: original size."""
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[image.shape[:2]].append(i)
        out: list[Tensor | None] = [None] * len(images)
        for indices in by_size.values():
            pixels = torch.from_numpy(np.stack([images[i] for i in indices])).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(to_model_input(pixels))["out"]
            for i, result in zip(indices, reduce(logits), strict=True):
                out[i] = result
        return [t for t in out if t is not None]

    @torch.no_grad()
    def _scaled(self, images: Sequence[np.ndarray]) -> list[Tensor]:
        """Logits [C, h, w] at each image's working size (`working_size`), on the device:
        images of one padded size share a forward pass."""
        inputs = [self._working_input(image) for image in images]
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, x in enumerate(inputs):
            by_shape[padded_size((x.shape[-2], x.shape[-1]), self.pad_multiple)].append(i)
        out: list[Tensor | None] = [None] * len(images)
        for indices in by_shape.values():
            batch = torch.stack([pad_to_multiple(inputs[i], self.pad_multiple) for i in indices])
            sizes = [tuple(inputs[i].shape[-2:]) for i in indices]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = padded_forward(self.model, batch, sizes)  # type: ignore[arg-type]
            for row, i in enumerate(indices):
                out[i] = logits[row, :, : sizes[row][0], : sizes[row][1]].float()
        return [t for t in out if t is not None]

    def _working_input(self, image: np.ndarray) -> Tensor:
        """The normalised [3, h, w] input at the working size (antialiased when shrunk)."""
        x = to_model_input(
            torch.tensor(image, device=self.device)[None]
        )  # copies: PIL arrays are read-only
        size = working_size(image.shape[:2], self.max_side)
        if size != image.shape[:2]:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x[0]


MIN_SIDE = 32  # the ResNet's stride: a smaller forward has no feature map to speak of
ARGMAX_ROWS = 256  # output rows per step of `upsampled_argmax`: memory C x 256 x W floats


def _check_images(images: Sequence[np.ndarray]) -> None:
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image {i}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}"
            )


def _resize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def padded_forward(model: DeepLabV3, batch: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
    """DeepLab-v3's logits [B, C, H, W] of zero-padded images whose content is `sizes[i]` at the
    top left: as `model(batch)["out"]`, except that ASPP's image pooling averages each image's
    own features only, so the padding does not dilute the global context."""
    features = model.backbone(batch)["out"]
    aspp, *head = model.classifier
    stride = -(-batch.shape[-2] // features.shape[-2])  # the output stride, from the shapes
    valid = features.new_zeros(len(sizes), 1, *features.shape[-2:])
    for row, size in enumerate(sizes):
        rows, cols = patch_grid(size, stride)  # the features of the image, padding left out
        valid[row, :, :rows, :cols] = 1
    *branches, pooling = aspp.convs
    pooled = (features * valid).sum(dim=(2, 3), keepdim=True) / valid.sum(dim=(2, 3), keepdim=True)
    for module in list(pooling)[1:]:  # ASPPPooling: AdaptiveAvgPool2d, then conv, BN, ReLU
        pooled = module(pooled)
    parts = [branch(features) for branch in branches] + [
        pooled.expand(-1, -1, *features.shape[-2:])
    ]
    out = aspp.project(torch.cat(parts, dim=1))
    for module in head:
        out = module(out)
    return _resize(out, (batch.shape[-2], batch.shape[-1]))


def _source_index(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear resampling from n_in to n_out samples (align_corners False, as F.interpolate):
    the lower and upper source index of each output sample and the upper one's weight."""
    src = ((torch.arange(n_out, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    return low, high, (src - low).float()


def upsampled_argmax(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """int64 [H, W]: argmax over classes of `logits` [C, h, w] resized bilinearly to `size`,
    computed `ARGMAX_ROWS` rows at a time so that a 12 MP answer never holds C full-size maps."""
    height, width = size
    top, bottom, down = _source_index(logits.shape[1], height, logits.device)
    left, right, across = _source_index(logits.shape[2], width, logits.device)
    out = torch.empty(size, dtype=torch.int64, device=logits.device)
    for start in range(0, height, ARGMAX_ROWS):
        rows = slice(start, start + ARGMAX_ROWS)
        weight = down[rows, None]
        strip = logits[:, top[rows]] * (1 - weight) + logits[:, bottom[rows]] * weight
        strip = strip[:, :, left] * (1 - across) + strip[:, :, right] * across
        out[rows] = strip.argmax(dim=0)
    return out
