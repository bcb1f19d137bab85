"""The linear probe (Sec 4.1 protocol (i), A.2): a 1x1 conv trained on frozen segmenter features.

If the segmenter's pixel embeddings are disentangled by semantic class, a linear classifier on
them solves the segmentation task. The features are those of the trained DeepLab-v3 just before
its final 1x1 classifier conv (256 channels after the ASPP head's conv-BN-ReLU), at the output
stride; the probe's logits are upsampled bilinearly to the label size before the cross-entropy,
and its predictions are class ids, scored with `segmentation_scores(matching="identity")`.

Tuning notes: A.2's recipe (45 epochs, batch 24, SGD lr 0.1 momentum 0.9 wd 1e-4, lr / 10 after
epoch 25) is the default; the paper saw no gain from training longer. Without augmentation
(`crop_size=None`, the default) each image's features are computed once, as the images stream
in, and cached on the CPU with its labels (uint8), the image itself dropped, so the 45 epochs
cost about one forward pass of the segmenter over the train images; the cache holds
256 * (H/8) * (W/8) float32 per image (4 MiB for a 512 x 512 image at output stride 8), the
only memory that grows with the train images: cap them (EvaluationConfig.probe_max_images) on
large sets. With `crop_size`,
every epoch draws a fresh random crop and mirror per image and recomputes its features.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdistill.evaluation import confusion_matrix
from maskdistill.segmenter import normalize

Sample = tuple[np.ndarray, np.ndarray]
# A.2: SGD with momentum 0.9 and weight decay 1e-4, lr divided by 10 at each milestone
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
LR_DECAY = 0.1


def probe_features(model: nn.Module, images: Tensor) -> Tensor:
    """A.2: the frozen DeepLab-v3's features before its final 1x1 conv, float [B, C, h, w].

    images: normalised float [B, 3, H, W] (`segmenter.normalize`), moved to the model's device;
    the result stays there. The model is put in eval mode (BatchNorm statistics stay frozen) and
    runs without gradient.
    """
    backbone, head, _ = _deeplab_parts(model)
    model.eval()
    with torch.no_grad():
        return head(backbone(images.to(_device(model)))["out"])


def fit_linear_probe(
    model: nn.Module,
    samples: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int,
    epochs: int = 45,
    batch_size: int = 24,
    lr: float = 0.1,
    milestones: Sequence[int] = (25,),
    crop_size: int | None = None,
    ignore_index: int = 255,
    seed: int = 0,
    progress: Callable[[int, float, float], None] | None = None,
) -> nn.Conv2d:
    """Sec 4.1 (i), A.2: a 1x1 conv from the frozen features to `num_classes` ground-truth classes.

    samples: (uint8 RGB [H, W, 3], int labels [H, W]) pairs, `ignore_index` where unlabelled,
    read once (an iterator will do: without crops only the features and labels are kept).
    The probe starts at zero (a convex problem: the seed only orders the batches and draws the
    crops), trains on the model's device and comes back there. Loss per batch: cross-entropy
    summed over its valid pixels, divided by their number, on logits upsampled bilinearly to each
    label's size. crop_size None: whole images, features cached (see the module notes); else a
    random crop_size x crop_size window (padded right and below: mean colour, ignored labels)
    and a coin-flip mirror per image and epoch. `progress(epoch, mean loss, lr)` after each epoch.
    The model itself is never changed.
    """
    _check_training(epochs, batch_size, lr, milestones, crop_size)
    device = _device(model)
    final = _deeplab_parts(model)[2]
    checked = _checked(samples, num_classes, ignore_index)
    if crop_size is None:
        cached, labels = _cached_features(model, checked, batch_size, num_classes, ignore_index)
        images: list[Tensor] = []
    else:  # every epoch crops the images afresh: they stay
        cached, (images, labels) = None, _normalised(checked)
    if not labels:
        raise ValueError("no samples to train the linear probe on")
    probe = nn.Conv2d(final.in_channels, num_classes, kernel_size=1).to(device)
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.zero_()
    optimizer = torch.optim.SGD(
        probe.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=LR_DECAY)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        losses = []
        order = rng.permutation(len(labels))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size].tolist()
            if cached is None:
                assert crop_size is not None
                pairs = [_crop_batch(model, images, labels, batch, crop_size, ignore_index, rng)]
            else:
                pairs = _stacked(cached, labels, batch, device)
            loss = _batch_loss(probe, pairs, ignore_index)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        if progress is not None:
            mean = float(np.mean(losses)) if losses else float("nan")
            progress(epoch, mean, float(optimizer.param_groups[0]["lr"]))
        schedule.step()
    return probe.eval()


def probe_prediction(
    model: nn.Module, probe: nn.Conv2d, image: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """int64 class ids [*size] of a uint8 RGB image: probe logits upsampled bilinearly (A.3)."""
    with torch.no_grad():
        logits = probe(probe_features(model, normalize(image)[None]))
        upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return upsampled.argmax(dim=1)[0].cpu().numpy()


def probe_probabilities(
    model: nn.Module, probe: nn.Conv2d, image: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """float32 softmax [C, *size] of the probe on a uint8 RGB image (for the dense CRF, Table 2
    "linear probe + CRF"): the logits of `probe_prediction`, upsampled alike."""
    with torch.no_grad():
        logits = probe(probe_features(model, normalize(image)[None]))
        upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return upsampled[0].float().softmax(dim=0).cpu().numpy()


def probe_confusion(
    model: nn.Module,
    probe: nn.Conv2d,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int,
    ignore_index: int = 255,
) -> np.ndarray:
    """int64 [num_classes, num_classes]: [p, g] counts pixels the probe calls p whose truth is g.

    Predicted at each label's original resolution (`probe_prediction`), one image at a time;
    ignored pixels left out. Score with `segmentation_scores(matching="identity")`.
    """
    if not samples:
        raise ValueError("no samples to evaluate the linear probe on")
    if probe.out_channels != num_classes:
        raise ValueError(f"probe has {probe.out_channels} outputs, num_classes={num_classes}")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image, label in _checked(samples, num_classes, ignore_index):
        height, width = label.shape
        confusion += confusion_matrix(
            probe_prediction(model, probe, image, (height, width)),
            label,
            num_predicted=num_classes,
            num_classes=num_classes,
            ignore_index=ignore_index,
        )
    return confusion


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _deeplab_parts(model: nn.Module) -> tuple[nn.Module, nn.Sequential, nn.Conv2d]:
    """(backbone, head up to the final conv, final 1x1 conv) of a DeepLab-v3; TypeError if not."""
    backbone = getattr(model, "backbone", None)
    classifier = getattr(model, "classifier", None)
    last = classifier[-1] if isinstance(classifier, nn.Sequential) and len(classifier) else None
    if backbone is None or not isinstance(last, nn.Conv2d) or last.kernel_size != (1, 1):
        raise TypeError(
            f"{type(model).__name__} is not a DeepLab-v3 segmenter: the linear probe needs "
            "`backbone` and a `classifier` Sequential ending in a 1x1 Conv2d (build_segmenter)"
        )
    assert isinstance(classifier, nn.Sequential)
    return backbone, nn.Sequential(*list(classifier)[:-1]), last


def _check_training(
    epochs: int,
    batch_size: int,
    lr: float,
    milestones: Sequence[int],
    crop_size: int | None,
) -> None:
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size}: both must be >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr}: expected > 0")
    steps = list(milestones)
    if any(m < 1 for m in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"milestones={steps}: expected strictly increasing epochs >= 1")
    if crop_size is not None and crop_size < 1:
        raise ValueError(f"crop_size={crop_size}: expected >= 1 or None")


def _normalised(samples: Iterable[Sample]) -> tuple[list[Tensor], list[Tensor]]:
    """Normalised images [3, H, W] and int64 labels [H, W] of checked samples."""
    images, labels = [], []
    for image, label in samples:
        images.append(normalize(image))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    return images, labels


def _checked(samples: Iterable[Sample], num_classes: int, ignore_index: int) -> Iterator[Sample]:
    """Each (image, labels) pair once it is valid; ValueError naming the first bad one."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: expected >= 2")
    for index, (image, label) in enumerate(samples):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"sample {index}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}"
            )
        if label.shape != image.shape[:2] or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(
                f"sample {index}: labels must be integers [{image.shape[0]}, {image.shape[1]}] "
                f"like the image, got {label.dtype} {label.shape}"
            )
        outside = label[(label != ignore_index) & ((label < 0) | (label >= num_classes))]
        if outside.size:
            raise ValueError(
                f"sample {index}: label {outside.flat[0]} is neither a class in "
                f"0..{num_classes - 1} nor ignore_index {ignore_index}"
            )
        yield image, label


def _same_shape_chunks(
    tensors: Sequence[Tensor], indices: list[int], size: int
) -> Iterator[list[int]]:
    """`indices` grouped by their tensor's shape, in chunks of at most `size`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(tensors[i].shape), []).append(i)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _cached_features(
    model: nn.Module,
    samples: Iterator[Sample],
    batch_size: int,
    num_classes: int,
    ignore_index: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Each sample's features (CPU) and labels, `batch_size` images at a time as they come;
    labels as uint8 where every value fits, the images not kept."""
    compact = ignore_index in range(256) and num_classes <= 256
    features: list[Tensor] = []
    labels: list[Tensor] = []
    while chunk := list(itertools.islice(samples, batch_size)):
        images = [normalize(image) for image, _ in chunk]
        start = len(features)
        features += [torch.empty(0)] * len(chunk)
        for group in _same_shape_chunks(images, list(range(len(chunk))), batch_size):
            computed = probe_features(model, torch.stack([images[i] for i in group])).cpu()
            for i, feature in zip(group, computed, strict=True):
                features[start + i] = feature
        for _, label in chunk:
            labels.append(torch.from_numpy(label.astype(np.uint8 if compact else np.int64)))
    return features, labels


def _stacked(
    features: list[Tensor], labels: list[Tensor], batch: list[int], device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """The batch as (features [b, C, h, w], labels [b, H, W]) stacks of equal-sized images."""
    return [
        (
            torch.stack([features[i] for i in chunk]).to(device),
            torch.stack([labels[i] for i in chunk]).to(device).long(),
        )
        for chunk in _same_shape_chunks(labels, batch, len(batch))
    ]


def _crop_batch(
    model: nn.Module,
    images: list[Tensor],
    labels: list[Tensor],
    batch: list[int],
    size: int,
    ignore_index: int,
    rng: np.random.Generator,
) -> tuple[Tensor, Tensor]:
    crops = [_random_crop(images[i], labels[i], size, ignore_index, rng) for i in batch]
    features = probe_features(model, torch.stack([image for image, _ in crops]))
    return features, torch.stack([label for _, label in crops]).to(features.device)


def _random_crop(
    image: Tensor, label: Tensor, size: int, ignore_index: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """A random size x size window, padded right and below where the image is smaller, and
    mirrored with probability 1/2; padding is 0 in the image (the mean colour) and ignored."""
    pad_h, pad_w = max(size - label.shape[0], 0), max(size - label.shape[1], 0)
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
    label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    top = int(rng.integers(0, label.shape[0] - size + 1))
    left = int(rng.integers(0, label.shape[1] - size + 1))
    image = image[:, top : top + size, left : left + size]
    label = label[top : top + size, left : left + size]
    if rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    return image, label


def _batch_loss(
    probe: nn.Conv2d, pairs: list[tuple[Tensor, Tensor]], ignore_index: int
) -> Tensor | None:
    """Mean cross-entropy over the valid pixels of all pairs; None when no pixel is valid."""
    total: Tensor | None = None
    valid = 0
    for features, target in pairs:
        logits = F.interpolate(
            probe(features), size=target.shape[-2:], mode="bilinear", align_corners=False
        )
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
        total = loss if total is None else total + loss
        valid += int((target != ignore_index).sum())
    if total is None or valid == 0:
        return None
    return total / valid
