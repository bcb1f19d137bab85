"""CRF self-training (supplementary S1, Table 2 "+CRF"): the plain functions of stage `refine`.

"Iteratively updating the pseudo-ground-truth with a CRF and the model weights": in round r the
current segmenter (round 0: `segmenter/model.pt`, then round r-1's) predicts every train image
at its original resolution, the dense CRF ([46], `maskdistill.crf`) refines the softmax, and
the refined label maps replace the pseudo labels the segmenter is retrained on, with the
segmenter's own recipe from its init (`self_training.epochs` per round). The segmenter's
logits leave the GPU at its output stride (DeepLab-v3 upsamples them bilinearly as its last
step, so upsampling on the CPU gives the same softmax at 1/64 of the bytes); the CPU does the
rest. Ray-free: `jobs/refine.py` maps it over the cluster.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.segmentation import DeepLabV3

from maskdistill.backbones import to_model_input
from maskdistill.config import CRFConfig, ExperimentConfig
from maskdistill.crf import crf_labels
from maskdistill.inference import Segmenter
from maskdistill.outputs import refine_round
from maskdistill.stages import SEGMENTER


def predicting_folder(round_index: int) -> str:
    """Whose segmenter labels round `round_index`: the segmenter stage's, then the last round's."""
    return SEGMENTER if round_index == 0 else refine_round(round_index - 1)


@torch.no_grad()
def coarse_logits(segmenter: Segmenter, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """float32 [C, h, w] per uint8 RGB image: DeepLab-v3's logits before its final bilinear
    upsampling (h, w: the image's size over the output stride), images of one size batched."""
    model = cast(DeepLabV3, segmenter.model)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_size[image.shape[:2]].append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    for indices in by_size.values():
        pixels = torch.from_numpy(np.stack([images[i] for i in indices])).to(segmenter.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=segmenter.autocast):
            logits = model.classifier(model.backbone(to_model_input(pixels))["out"])
        for i, row in zip(indices, logits.float().cpu().numpy(), strict=True):
            out[i] = row
    return [row for row in out if row is not None]


def full_softmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [C, H, W]: coarse logits upsampled as DeepLab-v3 does (bilinear, corners not
    aligned), then the softmax over classes."""
    tensor = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None]
    full = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    return full[0].softmax(dim=0).numpy()


def refine_image(
    image: np.ndarray, logits: np.ndarray, settings: CRFConfig
) -> tuple[np.ndarray, float]:
    """One train image's new pseudo label (S1): the dense CRF over the segmenter's softmax at the
    original resolution; with the share of pixels it moved off the segmenter's argmax."""
    probabilities = full_softmax(logits, image.shape[:2])
    labels = crf_labels(image, probabilities, settings)
    return labels, float((labels != probabilities.argmax(axis=0)).mean())


def round_config(config: ExperimentConfig) -> ExperimentConfig:
    """The config a round trains the segmenter with: its recipe, `self_training.epochs` epochs
    (None: the segmenter's own)."""
    epochs = config.self_training.epochs or config.segmenter.epochs
    segmenter = config.segmenter.model_copy(update={"epochs": epochs})
    return config.model_copy(update={"segmenter": segmenter})
