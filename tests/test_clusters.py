"""`maskdistill clusters`: names from the evaluation's matching, K lists, bad input."""

from pathlib import Path

import pytest
import yaml

from maskdistill import clusters
from maskdistill.config import load_config
from maskdistill.data import build_dataset
from maskdistill.evaluate import MINED
from maskdistill.rundir import RunDir, StageManifest, write_manifest


def _run(tmp_path: Path, sizes: list[int]) -> RunDir:
    """A run with a cluster stage of `sizes` masks per cluster (synthetic data: 6 classes)."""
    run = RunDir(str(tmp_path))
    run.write_config(load_config(None, [f"run_dir={tmp_path}"]))
    metrics = {"clusters": len(sizes), **{f"size_{k}": n for k, n in enumerate(sizes)}}
    write_manifest(run, StageManifest("cluster", "h", metrics=metrics))
    return run


def test_init_names_take_the_class_each_cluster_was_matched_to(tmp_path: Path) -> None:
    run = _run(tmp_path, [5, 3, 2, 0])
    # Labels 1 + k are clusters: cluster 0 -> class 2, 1 -> none, 2 -> background (0), 3 -> 5.
    run.write_json({MINED: {"miou": 0.1, "mapping": [0, 2, -1, 0, 5]}}, "evaluate", "metrics.json")
    classes = ["background", *build_dataset(load_config().data, "val").class_names]
    assert clusters.main([str(tmp_path), "--init-names"]) == 0
    names = yaml.safe_load((tmp_path / "names.yaml").read_text())["clusters"]
    assert names == {0: classes[2], 1: "cluster 1", 2: "cluster 2", 3: classes[5]}
    text = (tmp_path / "names.yaml").read_text()
    assert "matched to the classes of the 'val' split" in text and "50.0%" in text


@pytest.mark.parametrize(
    ("text", "ks"),
    [("10,20,30", [10, 20, 30]), ("2-5", [2, 3, 4, 5]), ("8, 2-3", [2, 3, 8]), ("4,4", [4])],
)
def test_k_lists(text: str, ks: list[int]) -> None:
    assert clusters.parse_ks(text) == ks


@pytest.mark.parametrize("text", ["1,2", "a-b", "", "3-"])
def test_bad_k_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--k"):
        clusters.parse_ks(text)


def test_bad_input_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert clusters.main([str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    _run(tmp_path, [1, 1])
    assert clusters.main([str(tmp_path), "--k", "2,3"]) == 2
    assert "mine stage has not run" in capsys.readouterr().err
    (tmp_path / "names.yaml").write_text("clusters:\n  5: dog\n")
    assert clusters.main([str(tmp_path)]) == 2
    assert "cluster 5: no such cluster" in capsys.readouterr().err
