"""A trained-looking run directory without training, for the inference, predict and serve tests."""

import io
from pathlib import Path

import torch

from maskdistill.config import load_config
from maskdistill.inference import detector_from_config
from maskdistill.rundir import RunDir
from maskdistill.segmenter import build_segmenter
from maskdistill.stages import DETECTOR, SEGMENTER

NUM_CLASSES = 5


def write_run(run_dir: Path, *overrides: str, detector: bool = False) -> Path:
    """A run directory as `Segmenter.load` reads it: config.yaml and an untrained
    resnet18 DeepLab-v3 (seeded, so its label maps vary within an image) as segmenter/model.pt;
    with `detector`, also an untrained, seeded resnet18 Mask R-CNN as detector/model.pt."""
    config = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "segmenter.backbone=resnet18",
            "segmenter.init=none",
            "segmenter.precision=fp32",
            "detector.arch=maskrcnn_resnet18_fpn",
            "detector.init=none",
            "detector.test_short_side=128",
            "detector.max_size=256",
            "detector.test_proposals_per_image=50",
            "detector.detections_per_image=10",
            *overrides,
        ],
    )
    run = RunDir(str(run_dir))
    run.write_config(config)
    torch.manual_seed(0)
    model = build_segmenter(num_classes=NUM_CLASSES, backbone="resnet18", init="none")
    _save(run, SEGMENTER, model)
    if detector:
        _save(run, DETECTOR, detector_from_config(config.detector, num_classes=NUM_CLASSES))
    return run_dir


def _save(run: RunDir, stage: str, model: torch.nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "num_classes": NUM_CLASSES}, buffer)
    run.write_bytes(buffer.getvalue(), stage, "model.pt")
