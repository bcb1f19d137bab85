"""The trained models as plain objects, loaded strictly from a run directory. Ray-free.

The segmenter (`Segmenter`) serves the evaluation stage, `maskdistill predict` and the HTTP
service; the distilled Mask R-CNN (`load_detector`) the distill stage. The architecture comes
from the run's config; the weights from `<stage>/model.pt` (`maskdistill.outputs`).

Labels follow the pseudo labels (`maskdistill.pseudolabels`): 0 is background, `1 + k` is
cluster `k`. Their names come from `evaluate/class_names.json` when the evaluation stage has
matched clusters to ground-truth classes (Hungarian, Sec 4.1), else "background", "cluster 0", ...
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from maskdistill.backbones import to_model_input
from maskdistill.config import DetectorConfig, ExperimentConfig, SegmenterConfig
from maskdistill.detector import build_detector
from maskdistill.outputs import CLASS_NAMES_FILE, read_weights
from maskdistill.rundir import RunDir
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
    run_dir: str,
    *,
    device: torch.device | str = "cpu",
    config: ExperimentConfig | None = None,
) -> torch.nn.Module:
    """The trained detector of a run (`detector/model.pt`, strictly), in eval mode; the
    architecture from `config`, by default the run's own `config.yaml`."""
    run = RunDir(run_dir)
    config = config or run.read_config()
    state = read_weights(run, DETECTOR)
    model = detector_from_config(
        config.detector, num_classes=int(state["num_classes"]), load_init=False
    )
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def segmenter_from_config(seg: SegmenterConfig, *, num_classes: int) -> nn.Module:
    """The segmenter architecture a run's config describes (weights not loaded)."""
    return build_segmenter(
        num_classes=num_classes,
        init=seg.init,
        init_path=seg.init_path,
        output_stride=seg.output_stride,
        backbone=seg.backbone,
    )


def default_class_names(num_classes: int) -> list[str]:
    return ["background", *(f"cluster {k}" for k in range(num_classes - 1))]


class Segmenter:
    """A trained segmenter with its label names, predicting at each image's own resolution."""

    def __init__(
        self, model: nn.Module, class_names: Sequence[str], *, precision: str = "fp32"
    ) -> None:
        self.model = model.eval()
        self.class_names = list(class_names)
        self.device = next(model.parameters()).device
        self.autocast = precision == "bf16" and self.device.type == "cuda"

    @classmethod
    def from_run(
        cls,
        run_dir: str,
        *,
        device: torch.device | str = "cpu",
        config: ExperimentConfig | None = None,
    ) -> Segmenter:
        """Load `segmenter/model.pt` (strictly) and the class names of a run directory.

        The architecture comes from `config`, by default the run's own `config.yaml`.
        """
        run = RunDir(run_dir)
        config = config or run.read_config()
        state = read_weights(run, SEGMENTER)
        num_classes = int(state["num_classes"])
        model = segmenter_from_config(
            config.segmenter.model_copy(update={"init": "none", "init_path": None}),
            num_classes=num_classes,
        )
        model.load_state_dict(state["model"])
        names = default_class_names(num_classes)
        if run.exists(*CLASS_NAMES_FILE):
            names = list(run.read_json(*CLASS_NAMES_FILE)["names"])
        return cls(model.to(device), names, precision=config.segmenter.precision)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def logits(self, images: Sequence[np.ndarray]) -> list[Tensor]:
        """float32 [C, H, W] logits for each uint8 RGB [H, W, 3] image, on the CPU."""
        return self._per_image(images, lambda logits: logits.float())

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """int64 label maps [H, W], one per image (the argmax taken on the model's device)."""
        return [t.numpy() for t in self._per_image(images, lambda logits: logits.argmax(dim=1))]

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """float32 softmax [C, H, W] per image (for the dense CRF)."""
        softmax = self._per_image(images, lambda logits: logits.float().softmax(dim=1))
        return [t.numpy() for t in softmax]

    @torch.no_grad()
    def _per_image(
        self, images: Sequence[np.ndarray], reduce: Callable[[Tensor], Tensor]
    ) -> list[Tensor]:
        """`reduce` of the logits [B, C, H, W] of each same-size group, split per image, on the
        CPU. Images go to the device as uint8 and are normalised there; A.3: original size."""
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"image {i}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}"
                )
            by_size[image.shape[:2]].append(i)
        out: list[Tensor | None] = [None] * len(images)
        for indices in by_size.values():
            pixels = torch.from_numpy(np.stack([images[i] for i in indices])).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(to_model_input(pixels))["out"]
            for i, result in zip(indices, reduce(logits).cpu(), strict=True):
                out[i] = result
        return [t for t in out if t is not None]
