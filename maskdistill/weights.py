"""Loading pretrained weights into torch modules, shared by the backbone, detector and segmenter.

Strict state-dict loading with an error that lists missing, unexpected and mis-shaped keys,
MoCo (v1/v2) checkpoint conversion to a plain ResNet state dict, and frozen BatchNorm.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from maskdistill.storage import read_bytes

INITS = ("moco", "imagenet", "none")  # ResNet inits of the detector and the segmenter
MOCO_PREFIX = "module.encoder_q."
_MOCO_NOTE = f"after keeping {MOCO_PREFIX}* without the prefix and dropping fc.*"
_LIST_LIMIT = 10  # names shown per line of a mismatch report


def load_strict(
    module: nn.Module, state: Mapping[str, Tensor], *, source: str, what: str, note: str = ""
) -> None:
    """Load every tensor of `module` from `state`; ValueError naming `source` and `what` if any
    key is missing, unexpected or mis-shaped (`module` may then be partly loaded, as in torch)."""
    expected = module.state_dict()
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    fitting = {k: v for k, v in state.items() if k not in mismatched}
    result = module.load_state_dict(fitting, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    if missing or result.unexpected_keys or mismatched:
        shapes = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in mismatched
        ]
        raise ValueError(
            f"{source}: weights do not match {what}{f' ({note})' if note else ''}\n"
            f"  missing keys: {key_listing(missing)}\n"
            f"  unexpected keys: {key_listing(result.unexpected_keys)}\n"
            f"  shape mismatches: {key_listing(shapes)}"
        )


def key_listing(items: Sequence[str]) -> str:
    """'N: a, b, ...' with at most `_LIST_LIMIT` items shown, then '... (K more)'."""
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return f"{len(items)}{': ' + shown if items else ''}{more}"


def moco_state_dict(uri: str) -> dict[str, Tensor]:
    """The query encoder of a MoCo checkpoint, `module.encoder_q.` stripped, its `fc` head dropped.

    Official release format: {"state_dict": {"module.encoder_q.conv1.weight": ..., ...}}.
    """
    try:
        raw = torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise ValueError(f"{uri}: not a readable torch checkpoint: {err}") from err
    state = raw.get("state_dict") if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{uri}: not a MoCo checkpoint (no 'state_dict' mapping)")
    return {
        key[len(MOCO_PREFIX) :]: value
        for key, value in state.items()
        if key.startswith(MOCO_PREFIX) and not key.startswith(f"{MOCO_PREFIX}fc.")
    }


def load_moco(body: nn.Module, uri: str) -> None:
    """Load a MoCo checkpoint's query encoder strictly into a ResNet body (see `load_strict`)."""
    load_strict(body, moco_state_dict(uri), source=uri, what="the ResNet body", note=_MOCO_NOTE)


def freeze_batchnorm(module: nn.Module) -> None:
    """Replace each BatchNorm2d in `module` whose affine parameters are frozen (requires_grad
    False) by a FrozenBatchNorm2d of the same state, so its statistics stay fixed in training."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and child.affine and not child.weight.requires_grad:
            setattr(module, name, _frozen_copy(child))
        else:
            freeze_batchnorm(child)


def _frozen_copy(batchnorm: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d with `batchnorm`'s weight, bias, running mean and variance and eps."""
    frozen = FrozenBatchNorm2d(batchnorm.num_features, eps=batchnorm.eps)
    frozen.load_state_dict(batchnorm.state_dict())
    return frozen
