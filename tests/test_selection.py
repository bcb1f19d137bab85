"""`segmenter.select: best_on_val`: checkpoint scores, kept weights, the evaluation's mark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from maskdistill.data.base import Sample
from maskdistill.evaluate import SEGMENTER, SELECTION, table1, table2
from maskdistill.rundir import RunDir
from maskdistill.selection import (
    SELECTED_ON_EVAL,
    Selection,
    best_iteration,
    read_selection,
    val_miou,
)


def test_best_iteration_is_the_highest_earliest_on_a_tie_never_nan() -> None:
    assert best_iteration({100: 0.30, 200: 0.42, 300: 0.42}) == 200
    assert best_iteration({100: float("nan"), 200: 0.1}) == 200
    with pytest.raises(ValueError, match="no checkpoint has a val mIoU"):
        best_iteration({100: float("nan")})


def test_selection_keeps_the_better_of_two_checkpoints_and_survives_a_resume(
    tmp_path: Path,
) -> None:
    run = RunDir(str(tmp_path / "run"))
    first, second = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
    selection = Selection(run)
    assert selection.add(100, 0.30, first.state_dict()) is True
    assert selection.add(200, 0.25, second.state_dict()) is False  # worse: best.pt stays
    resumed = Selection(run)  # a restarted worker reads the scores back
    assert resumed.scores == {100: 0.30, 200: 0.25}
    best = resumed.best_state()
    assert torch.equal(best["weight"], first.weight) and not torch.equal(
        best["weight"], second.weight
    )
    assert resumed.add(300, 0.35, second.state_dict()) is True  # better: replaces best.pt
    assert torch.equal(resumed.best_state()["weight"], second.weight)
    record = read_selection(run)
    assert record is not None
    assert (record["iteration"], record["val_miou"], record["note"]) == (
        300,
        0.35,
        SELECTED_ON_EVAL,
    )
    assert "test set" in record["note"]
    assert read_selection(RunDir(str(tmp_path / "other"))) is None  # select: last


class Brightness(nn.Module):
    """Label 1 where the (normalised) red channel is above the mean colour, else 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": torch.stack([-x[:, 0], x[:, 0]], dim=1) * self.scale}


def test_val_miou_is_the_evaluations_hungarian_miou() -> None:
    # 2 x 4 image: left half dark (predicted 0), right half bright (predicted 1). Truth: dark is
    # background except pixel (0, 0), class 2; bright is class 2; class 1 absent (left out).
    # Hungarian: 0 -> 0, 1 -> 2. IoU(0) = 3 / (4 + 3 - 3) = 3/4, IoU(2) = 4 / (4 + 5 - 4) = 4/5,
    # mIoU = (0.75 + 0.8) / 2 = 0.775
    image = np.zeros((2, 4, 3), dtype=np.uint8)
    image[:, 2:] = 255
    truth = np.array([[2, 0, 2, 2], [0, 0, 2, 2]], dtype=np.uint8)
    samples = [Sample("a", image, truth), Sample("unlabelled", image)]
    miou = val_miou(Brightness(), samples, num_predicted=2, num_classes=3, matching="hungarian")
    assert miou == pytest.approx(0.775)
    with pytest.raises(ValueError, match="no val image with semantic ground truth"):
        val_miou(Brightness(), samples[1:], num_predicted=2, num_classes=3, matching="hungarian")


def test_tables_mark_the_segmenter_rows_selected_on_the_evaluation_set(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    Selection(run).add(100, 0.5, nn.Conv2d(1, 1, 1).state_dict())
    rows = {"mined masks, clustered": {"miou": 0.2}, SEGMENTER: {"miou": 0.5}}
    plain = table1(rows)
    assert "*" not in plain
    marked = table1({**rows, SELECTION: read_selection(run)})
    assert f"| {SEGMENTER} * | 50.0 |" in marked
    assert "| mined masks, clustered | 20.0 |" in marked  # not the segmenter's: unmarked
    assert SELECTED_ON_EVAL in marked and "iteration 100 of 1 compared" in marked
    assert SELECTED_ON_EVAL in table2({**rows, SELECTION: read_selection(run)})
