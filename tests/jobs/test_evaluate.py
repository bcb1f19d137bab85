from pathlib import Path

import numpy as np
import pytest

from jobs import evaluate
from maskdistill.config import ExperimentConfig
from maskdistill.masks import encode_rle


def test_mined_label_map_paints_the_mask_with_one_plus_its_cluster() -> None:
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True
    row = {"mask_rle": encode_rle(mask)["counts"], "cluster": 2}
    labels = evaluate.mined_label_map(row, (4, 5))
    assert labels.dtype == np.int64
    assert (labels[mask] == 3).all() and (labels[~mask] == 0).all()
    assert not evaluate.mined_label_map(None, (4, 5)).any()


def test_label_names_follow_the_matching_and_fall_back_to_clusters() -> None:
    names = evaluate.label_names([0, 2, -1, 1], ["background", "cat", "dog"])
    assert names == ["background", "dog", "cluster 1", "cat"]
    assert evaluate.label_names([-1, -1], ["background"]) == ["background", "cluster 0"]


def test_table1_lists_present_rows_in_the_papers_order_in_percent() -> None:
    metrics = {evaluate.SEGMENTER: {"miou": 0.5}, evaluate.MINED: {"miou": 0.125}}
    lines = evaluate.table1(metrics).splitlines()
    assert lines[2] == f"| {evaluate.MINED} | 12.5 |"
    assert lines[3] == f"| {evaluate.SEGMENTER} | 50.0 |"
    assert len(lines) == 4


def test_findings_sum_confusions_over_images() -> None:
    findings = evaluate.Findings(num_predicted=3, num_classes=2, num_overlays=0)
    truth = np.array([[0, 1], [1, 255]])
    findings.add("row", np.array([[0, 2], [2, 1]]), truth)
    findings.add("row", np.array([[1, 1], [1, 1]]), truth)
    assert findings.confusion["row"].tolist() == [[1, 0], [1, 2], [0, 2]]


def test_evaluation_needs_a_val_split(tmp_path: Path) -> None:
    config = ExperimentConfig.model_validate(
        {"run_dir": str(tmp_path), "data": {"val_split": None}}
    )
    with pytest.raises(ValueError, match="val_split"):
        evaluate.evaluate_split(config)
