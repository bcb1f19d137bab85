"""A trained-looking run directory without training, for the inference, predict and serve tests."""

import io
from pathlib import Path

import torch

from maskdistill.config import load_config
from maskdistill.rundir import RunDir
from maskdistill.segmenter import build_segmenter

NUM_CLASSES = 5


def write_run(run_dir: Path, *overrides: str) -> Path:
    """A run directory as `Segmenter.from_run` reads it: config.yaml and an untrained
    resnet18 DeepLab-v3 (seeded, so its label maps vary within an image) as segmenter/model.pt."""
    config = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "segmenter.backbone=resnet18",
            "segmenter.init=none",
            "segmenter.precision=fp32",
            *overrides,
        ],
    )
    run = RunDir(str(run_dir))
    run.write_config(config)
    torch.manual_seed(0)
    model = build_segmenter(num_classes=NUM_CLASSES, backbone="resnet18", init="none")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "num_classes": NUM_CLASSES}, buffer)
    run.write_bytes(buffer.getvalue(), "segmenter", "model.pt")
    return run_dir
