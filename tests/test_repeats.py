"""`maskdistill repeat`'s Ray-free parts: seeds, seed configs, shared mining, the summary."""

from pathlib import Path

import pytest

from maskdistill import repeats
from maskdistill.config import ExperimentConfig, load_config
from maskdistill.rundir import RunDir, stage_run, stage_state
from maskdistill.stages import fingerprint


def test_seeds_parse_and_bad_entries_are_named() -> None:
    assert repeats.parse_seeds("1, 2,3") == [1, 2, 3]
    assert repeats.parse_seeds("0") == [0]
    for text, bad in (("1,x", "'x'"), ("1,-2", "'-2'"), ("", "''"), ("4,4", "seed 4 is given")):
        with pytest.raises(ValueError, match=bad):
            repeats.parse_seeds(text)


def test_every_number_of_metrics_json_is_flattened_and_lists_left_out() -> None:
    metrics = {
        "+ DeepLab-v3": {"miou": 0.5, "iou": [0.25, None], "mapping": [0, 1]},
        "linear probe (A.2)": {"miou": 0.75},
        "mask AP": {"mined single class-agnostic": {"AP": 0.2, "AP50": 1, "AP75": 0.0}},
        "mask AP images": {"split": "trainval", "images": 5},
        "flag": True,
    }
    assert repeats.scalar_metrics(metrics) == {
        "+ DeepLab-v3 / miou": 0.5,
        "linear probe (A.2) / miou": 0.75,
        "mask AP / mined single class-agnostic / AP": 0.2,
        "mask AP / mined single class-agnostic / AP50": 1.0,
        "mask AP / mined single class-agnostic / AP75": 0.0,
        "mask AP images / images": 5.0,
    }


def test_summary_is_mean_and_sample_std_with_each_seeds_value() -> None:
    per_seed = {
        1: {"row": {"miou": 0.5}, "only": {"miou": 0.3}},
        2: {"row": {"miou": 0.7}},
        3: {"row": {"miou": 0.6}},
    }
    summary = repeats.summarize(per_seed)
    row = summary["metrics"]["row / miou"]
    # mean (0.5 + 0.7 + 0.6) / 3 = 0.6; squares 0.01 + 0.01 + 0 = 0.02, / (3 - 1) -> std 0.1
    assert row["mean"] == pytest.approx(0.6) and row["std"] == pytest.approx(0.1)
    assert row["n"] == 3 and row["values"] == {"1": 0.5, "2": 0.7, "3": 0.6}
    lone = summary["metrics"]["only / miou"]
    assert (lone["mean"], lone["std"], lone["n"]) == (0.3, None, 1)  # ddof=1: no std of one
    assert summary["seeds"] == [1, 2, 3] and "ddof=1" in summary["std"]
    lines = repeats.summary_table(summary).splitlines()
    assert lines[0] == "| metric | mean | std (ddof=1) | seed 1 | seed 2 | seed 3 |"
    assert lines[2] == "| row / miou | 0.6000 | 0.1000 | 0.5000 | 0.7000 | 0.6000 |"
    assert lines[3] == "| only / miou | 0.3000 |  | 0.3000 |  |  |"


def test_a_seeds_config_changes_its_run_dir_and_seeds_only(tmp_path: Path) -> None:
    config = load_config(None, [f"run_dir={tmp_path}", "clustering.seed=9", "seed=4"])
    child = repeats.seed_config(config, 3)
    assert child.run_dir == f"{tmp_path}/repeats/seed_3"
    assert (child.seed, child.clustering.seed) == (3, 3)
    same = child.model_copy(update={"run_dir": config.run_dir, "seed": 4})
    same.clustering.seed = 9
    assert same == config


def _complete(run: RunDir, config: ExperimentConfig, *names: str) -> None:
    for name in names:
        with stage_run(run, fingerprint(config, name)) as manifest:
            run.write_bytes(name.encode(), name, "train", "part-00000.parquet")
            manifest.outputs = 1


def test_seeds_copy_the_runs_finished_mining_once(tmp_path: Path) -> None:
    config = load_config(None, [f"run_dir={tmp_path}"])
    run, child_config = RunDir(str(tmp_path)), repeats.seed_config(config, 1)
    with pytest.raises(ValueError, match="stage 'data' is not complete"):
        repeats.check_shared(run, config, child_config)
    _complete(run, config, "data", "mine")
    assert repeats.check_shared(run, config, child_config) == ["data", "mine"]
    child = RunDir(child_config.run_dir)
    assert repeats.copy_shared(run, child, child_config) == ["data", "mine"]
    assert child.read_bytes("mine", "train", "part-00000.parquet") == b"mine"
    assert stage_state(child, fingerprint(child_config, "mine")) == "done"
    assert repeats.copy_shared(run, child, child_config) == []  # a rerun copies nothing
    assert not repeats.seed_finished(child_config)  # cluster .. evaluate still to run


def test_a_run_that_pretrains_with_the_seed_cannot_share_its_mining(tmp_path: Path) -> None:
    config = load_config(None, [f"run_dir={tmp_path}", "backbone.weights=pretrain"])
    run = RunDir(str(tmp_path))
    _complete(run, config, "data", "pretrain", "mine")
    with pytest.raises(ValueError, match="stage 'pretrain' depends on `seed`"):
        repeats.check_shared(run, config, repeats.seed_config(config, 2))
