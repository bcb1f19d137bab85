"""Which segmenter weights a run keeps: `segmenter.select` (`last`, or `best_on_val`).

The authors' release keeps the epoch with the best mIoU on PASCAL val, the very set Table 1
reports: that is model selection on the test set, so a run made so is marked wherever its
numbers appear (`SELECTED_ON_EVAL`). `val_miou` scores a model as the evaluation does (Sec 4.1:
each image at its own resolution, clusters matched to classes); `Selection` keeps every score
and the best weights in the run directory, so a resumed run goes on comparing. Ray-free.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from maskdistill.data.base import Sample
from maskdistill.evaluation import confusion_matrix, segmentation_scores
from maskdistill.rundir import RunDir
from maskdistill.segmenter import normalize, predict_batch
from maskdistill.stages import SEGMENTER

BEST_ON_VAL = "best_on_val"
SELECTION_FILE, BEST_FILE = "selection.json", "best.pt"  # in the training folder
SELECTED_ON_EVAL = (
    "segmenter checkpoint selected on the evaluation set (segmenter.select: best_on_val, the "
    "release's choice): model selection on the test set, not a held-out protocol"
)


def best_iteration(scores: Mapping[int, float]) -> int:
    """The iteration with the highest val mIoU; the earliest on a tie; NaN never wins."""
    finite = {it: miou for it, miou in scores.items() if not math.isnan(miou)}
    if not finite:
        raise ValueError(f"no checkpoint has a val mIoU to compare: {dict(scores)}")
    return min(finite, key=lambda it: (-finite[it], it))


@torch.no_grad()
def val_miou(
    model: nn.Module,
    samples: Iterable[Sample],
    *,
    num_predicted: int,
    num_classes: int,
    matching: str,
) -> float:
    """Sec 4.1: mIoU of `model`'s predictions at each image's resolution, its labels matched
    to the `num_classes` classes (background included) by `matching`. Puts the model in eval
    mode; images without semantic ground truth are left out."""
    confusion = np.zeros((num_predicted, num_classes), dtype=np.int64)
    for sample in samples:
        if sample.semantic is None:
            continue
        predicted = predict_batch(model, normalize(sample.image)[None])[0].numpy()
        confusion += confusion_matrix(
            predicted, sample.semantic, num_predicted=num_predicted, num_classes=num_classes
        )
    if not confusion.any():
        raise ValueError("no val image with semantic ground truth to select a checkpoint on")
    return float(segmentation_scores(confusion, matching=matching)["miou"])


class Selection:
    """The val mIoU of each checkpoint iteration so far and the best one's weights
    (`<folder>/selection.json`, `<folder>/best.pt`; the folder is the segmenter stage's)."""

    def __init__(self, run: RunDir, folder: str = SEGMENTER) -> None:
        self.run = run
        self.folder = folder
        record = read_selection(run, folder) or {}
        self.scores: dict[int, float] = {
            int(it): float(miou) for it, miou in record.get("scores", {}).items()
        }

    def add(self, iteration: int, miou: float, model_state: Mapping[str, Any]) -> bool:
        """Record one checkpoint's score; its weights become best.pt when it is the best so
        far. Returns whether it is."""
        self.scores[iteration] = miou
        best = best_iteration(self.scores) == iteration
        if best:
            buffer = io.BytesIO()
            torch.save(dict(model_state), buffer)
            self.run.write_bytes(buffer.getvalue(), self.folder, BEST_FILE)
        self.run.write_json(self.record(), self.folder, SELECTION_FILE)
        return best

    def record(self) -> dict[str, Any]:
        best = best_iteration(self.scores)
        return {
            "select": BEST_ON_VAL,
            "iteration": best,
            "val_miou": self.scores[best],
            "scores": {str(it): miou for it, miou in sorted(self.scores.items())},
            "note": SELECTED_ON_EVAL,
        }

    def best_state(self) -> dict[str, Any]:
        """The best checkpoint's model state dict."""
        state: dict[str, Any] = torch.load(
            io.BytesIO(self.run.read_bytes(self.folder, BEST_FILE)), map_location="cpu"
        )
        return state


def read_selection(run: RunDir, folder: str = SEGMENTER) -> dict[str, Any] | None:
    """The segmenter's selection record when it was chosen on val (None for `last`)."""
    if not run.exists(folder, SELECTION_FILE):
        return None
    record: dict[str, Any] = run.read_json(folder, SELECTION_FILE)
    return record
