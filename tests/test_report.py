"""`maskdistill report`: the run's Tables 1-3 beside the paper's, from metrics.json and repeats."""

from pathlib import Path

import pytest

from maskdistill import cli
from maskdistill.config import load_config
from maskdistill.repeats import write_summary
from maskdistill.report import PAPER, TABLES
from maskdistill.rundir import RunDir

# fractions as the evaluate stage writes them; the report shows 100x, one decimal
METRICS = {
    "mined masks, clustered": {"miou": 0.3904, "iou": [0.5], "mapping": [0, 1]},
    "+ Mask R-CNN": {"miou": 0.4216},
    "+ DeepLab-v3": {"miou": 0.4581},
    "linear probe (A.2)": {"miou": 0.6},
    "+ CRF self-training": {"miou": 0.47},
    "+ CRF at evaluation": {"miou": 0.495},
    "mask AP": {
        "mined multi class-agnostic": {"AP": 0.048, "AP50": 0.1234, "AP75": 0.0031},
        "detector multi class-agnostic": {"AP": 0.1, "AP50": 0.25, "AP75": 0.07},
    },
}

TABLE1 = """### Table 1: component analysis, PASCAL val, clustering (mIoU %)

| row | metrics.json | mIoU paper | mIoU run |
| --- | --- | ---: | ---: |
| Self-sup. vision transformer (Sec 3.2) | mined masks, clustered | 39.0 | 39.0 |
| + Mask R-CNN (Sec 3.2) | + Mask R-CNN | 42.0 | 42.2 |
| + Segmentation model (Sec 3.3) | + DeepLab-v3 | 45.8 | 45.8 |"""

TABLE2B = """### Table 2 (b): clustering, PASCAL val (mIoU %)

| row | metrics.json | mIoU paper | mIoU run |
| --- | --- | ---: | ---: |
| MaskDistill | + DeepLab-v3 | 45.8 | 45.8 |
| MaskDistill+CRF (self-training, CRF at evaluation) | + CRF at evaluation | 48.9 | 49.5 |
| MaskDistill+CRF (CRF at evaluation only) | + DeepLab-v3 + CRF | 48.9 | - |
| self-training, no CRF at evaluation | + CRF self-training | - | 47.0 |"""

# 0.1234 -> 12.3, 0.048 -> 4.8, 0.0031 -> 0.3; the detector's 0.25, 0.1, 0.07 -> 25.0, 10.0, 7.0
TABLE3A = """### Table 3 (a): class-agnostic, multi, PASCAL (mask AP %)

| row | metrics.json | AP50 paper | AP50 run | AP paper | AP run | AP75 paper | AP75 run |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
| MaskDistill | mined multi class-agnostic | 12.8 | 12.3 | 4.8 | 4.8 | 0.3 | 0.3 |
| MaskDistill† | detector multi class-agnostic | 24.3 | 25.0 | 9.9 | 10.0 | 6.9 | 7.0 |"""


def _run(tmp_path: Path, *overrides: str, metrics: dict | None = METRICS) -> RunDir:
    run = RunDir(str(tmp_path))
    run.write_config(load_config(None, [f"run_dir={tmp_path}", *overrides]))
    if metrics is not None:
        run.write_json(metrics, "evaluate", "metrics.json")
    return run


def test_a_pascal_run_beside_the_paper_printed_and_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, "data.kind=voc", "data.root=/data/pascal", "data.train_split=train_aug")
    assert cli.main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "report.md").read_text()
    for table in (TABLE1, TABLE2B, TABLE3A):
        assert f"\n{table}\n" in printed
    assert "| MaskDistill | linear probe (A.2) | 58.7 | 60.0 |" in printed  # Table 2 (a)
    assert "| MaskDistill+CRF | linear probe (A.2) + CRF | 62.8 | - |" in printed
    # (c) and (e) are PASCAL's; the run has no semantic AP rows: '-' beside the paper's values
    assert "| MaskDistill | mined single semantic | 24.0 | - | 9.5 | - | 6.4 | - |" in printed
    assert "| MaskDistill† | detector multi semantic | 24.8 | - | 10.7 | - | 8.0 | - |" in printed
    assert "COCO20k" not in printed
    assert "repeats" not in printed


def test_a_coco_run_gets_the_coco20k_columns_of_table_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(
        tmp_path,
        "data.kind=coco",
        "data.root=/data/coco",
        "data.coco_annotations=/data/coco/instances_train2014.json",
    )
    assert cli.main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "### Table 3 (b): class-agnostic, multi, COCO20k (mask AP %)" in printed
    assert (
        "| MaskDistill | mined multi class-agnostic | 3.1 | 12.3 | 1.3 | 4.8 | 0.5 | 0.3 |"
        in printed
    )
    assert "| MaskDistill† | detector single semantic | 14.6 | - | 6.6 | - | 5.5 | - |" in printed
    assert "PASCAL (mask AP" not in printed
    assert f"\n{TABLE1}\n" in printed  # Tables 1 and 2 are PASCAL's in the paper either way


def test_repeats_add_mean_and_sample_std_per_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path)  # synthetic: Table 3's columns are PASCAL's
    # + DeepLab-v3 over seeds 1-3: 0.44, 0.45, 0.46 -> mean 45.0, sample std 1.0 (in %);
    # AP50 of the detector on seed 1 only -> its mean alone
    per_seed = {
        1: {
            "+ DeepLab-v3": {"miou": 0.44},
            "mask AP": {"detector multi class-agnostic": {"AP50": 0.3}},
        },
        2: {"+ DeepLab-v3": {"miou": 0.45}},
        3: {"+ DeepLab-v3": {"miou": 0.46}},
    }
    write_summary(run, per_seed)
    assert cli.main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        f"# {tmp_path} beside the paper\n\nrepeats: mean ± std (ddof=1) over seeds 1, 2, 3\n"
    )
    assert "| row | metrics.json | mIoU paper | mIoU run | mIoU repeats |" in printed
    assert "| + Segmentation model (Sec 3.3) | + DeepLab-v3 | 45.8 | 45.8 | 45.0 ± 1.0 |" in printed
    assert "| + Mask R-CNN (Sec 3.2) | + Mask R-CNN | 42.0 | 42.2 | - |" in printed
    assert "| MaskDistill† | detector multi class-agnostic | 24.3 | 25.0 | 30.0 |" in printed


def test_selection_on_the_evaluation_set_and_the_mask_ap_split_are_stated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    note = "selected on the evaluation set (segmenter.select: best_on_val)"
    where = {"split": "trainval", "images": 2913}
    _run(
        tmp_path,
        metrics={**METRICS, "segmenter selection": {"note": note}, "mask AP images": where},
    )
    assert cli.main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    lines = f"note: the segmenter's rows: {note}\n\nmask AP on split trainval (2913 images)"
    assert f"\n\n{lines}\n\n### Table 1" in printed


def test_a_missing_run_or_evaluation_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 1
    assert "not a run directory" in capsys.readouterr().err
    _run(tmp_path, metrics=None)
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "has not been evaluated yet" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_every_paper_row_is_printed_for_its_data_set() -> None:
    # each table of the paper appears in exactly one data set's report, or in both (1, 2, extra)
    for table in {row.table for row in PAPER}:
        assert any(table in tables for tables in TABLES.values()), table
    assert [r.values for r in PAPER if r.table == "Table 1"] == [(39.0,), (42.0,), (45.8,)]
