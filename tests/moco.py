"""A MoCo v2 release-format checkpoint, for the detector's and the segmenter's init tests."""

import io
from pathlib import Path

import torch
import torchvision

from maskdistill.weights import MOCO_PREFIX


def moco_release_state(seed: int) -> dict[str, torch.Tensor]:
    """A MoCo v2 release-style state dict: ResNet-50 query encoder with an MLP head."""
    torch.manual_seed(seed)
    resnet = torchvision.models.resnet50(weights=None)
    body = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    for key, value in body.items():  # BN statistics unlike a fresh init, so loading shows
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 2.0)
    head = {
        "fc.0.weight": torch.randn(2048, 2048),
        "fc.0.bias": torch.randn(2048),
        "fc.2.weight": torch.randn(128, 2048),
        "fc.2.bias": torch.randn(128),
    }
    state = {MOCO_PREFIX + k: v for k, v in {**body, **head}.items()}
    state["module.encoder_k.conv1.weight"] = torch.randn(64, 3, 7, 7)
    state["module.queue"] = torch.randn(128, 16)
    return state


def save_moco(state: dict[str, torch.Tensor], path: Path) -> str:
    buffer = io.BytesIO()
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, buffer)
    path.write_bytes(buffer.getvalue())
    return str(path)
