"""configs/pascal.yaml through every stage on a fake VOC tree (Table 3's PASCAL protocol, A.4),
then `maskdistill repeat` over two seeds.

The tree (tests/data/test_voc.py): VOC2012 with train (3), val (2), trainval (5) and train_aug
(train + 2 SBD images, SegmentationClassAug), VOC2007 beside it with 3 trainval images. The
detector must train on train_aug and VOC2007 (VOC07+12), mask AP be measured on the 5 trainval
images with the mined masks scored 1, Table 1 stay on val; each repeat seed must reuse the mining.
"""

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from jobs import mine, pipeline, train_detector
from maskdistill.config import ExperimentConfig, load_config
from maskdistill.data import dataset_of
from maskdistill.data.union import SplitUnion
from maskdistill.detector import MaskTargets
from maskdistill.evaluate import MASK_AP_SET, evaluate_split
from maskdistill.outputs import detector_splits, read_labeled, read_metrics, read_pseudo
from maskdistill.repeats import REPEATS, SUMMARY_JSON, SUMMARY_MD, scalar_metrics, seed_dir
from maskdistill.rundir import RunDir, read_manifest
from maskdistill.stages import needed
from tests.data.test_voc import TREE_AUG_ONLY, TREE_TRAIN, TREE_VAL, TREE_VOC07, write_voc_tree
from tests.jobs.paper import TINY_PAPER

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pascal.yaml"
TRAINVAL = TREE_TRAIN + TREE_VAL
TINY_PASCAL = (
    *TINY_PAPER,
    "mining.shard_size=8",
    "clustering.num_clusters=3",
    "evaluation.linear_probe=false",
    "self_training.rounds=0",  # Table 2's CRF rounds: tests/jobs/test_refine.py covers them
)


@pytest.fixture(scope="module")
def pascal_run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    root = tmp_path_factory.mktemp("voc")
    write_voc_tree(root, size=(48, 64))
    overrides = [f"run_dir={tmp_path_factory.mktemp('run')}", f"data.root={root}", *TINY_PASCAL]
    config = load_config(CONFIG, overrides)
    RunDir(config.run_dir).write_config(config)  # as `maskdistill pipeline` does
    ran = pipeline.run_pipeline(config, argparse.Namespace(only=None, start=None, force=False))
    assert list(ran) == needed(config) and all(ran.values())
    return config


def test_the_config_is_the_papers_table3_protocol() -> None:
    config = load_config(CONFIG, [])
    assert config.detector.train_splits == ["train_aug", "voc07_trainval"]
    assert (config.data.val_split, config.evaluation.mask_ap_split) == ("val", "trainval")
    assert config.evaluation.mined_score == "one"


def test_the_detector_trains_on_both_years(pascal_run: ExperimentConfig) -> None:
    run = RunDir(pascal_run.run_dir)
    rows = train_detector.training_rows(pascal_run, run)
    expected = sorted(TREE_TRAIN + TREE_AUG_ONLY) + TREE_VOC07
    assert [rows.image_id(i) for i in range(len(rows))] == expected
    images = SplitUnion({s: dataset_of(pascal_run.data, s) for s in detector_splits(pascal_run)})
    image, target = MaskTargets(rows, images).load(expected.index("000007"))
    assert image.shape[1:] == (48, 64) and target["masks"].shape == (1, 48, 64)
    manifest = read_manifest(run, "detector")
    assert manifest is not None and manifest.inputs == len(expected)
    assert not run.exists("distill", "voc07_trainval"), "VOC2007 only trains the detector"


def test_mask_ap_is_measured_on_trainval_with_mined_masks_scored_one(
    pascal_run: ExperimentConfig,
) -> None:
    run = RunDir(pascal_run.run_dir)
    metrics = read_metrics(run)
    assert metrics[MASK_AP_SET] == {"split": "trainval", "images": len(TRAINVAL)}
    assert set(metrics["mask AP"]) >= {"mined single class-agnostic", "detector multi semantic"}
    manifest = read_manifest(run, "evaluate")
    assert manifest is not None and manifest.outputs == len(TREE_VAL)  # Table 1: val
    assert sorted(read_pseudo(run, "trainval").column("image_id").to_pylist()) == sorted(TRAINVAL)
    _, findings, _ = evaluate_split(pascal_run)
    assert [s.image_id for s in findings.truth] == TRAINVAL
    assert [s.image_id for s in findings.candidates] == TRAINVAL
    assert [s.scores.tolist() for s in findings.mined] == [[1.0]] * len(TRAINVAL)
    attention = read_labeled(run, "trainval").column("score").to_pylist()
    assert min(attention) < 1.0, "the ones above come from the option, not from mining"


def _summed(summary: dict[str, Any], seeds: list[int], run: RunDir) -> None:
    """summary.json against mean and sample std recomputed from each seed's metrics.json."""
    per_seed = {s: scalar_metrics(read_metrics(RunDir(seed_dir(run.uri, s)))) for s in seeds}
    assert summary["seeds"] == seeds and set(summary["metrics"]) == set(per_seed[seeds[0]])
    for name, row in summary["metrics"].items():
        values = [per_seed[s][name] for s in seeds]
        assert row["values"] == {str(s): v for s, v in zip(seeds, values, strict=True)}
        assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert row["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)  # ddof=1


def test_repeat_runs_the_stages_after_mining_per_seed_and_summarizes(
    pascal_run: ExperimentConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_mining(*args: object, **kwargs: object) -> None:
        raise AssertionError("a repeat must not mine")

    monkeypatch.setattr(mine, "mine_split", no_mining)
    run = RunDir(pascal_run.run_dir)
    mined = read_manifest(run, "mine")
    assert pipeline.repeat_main([run.uri, "--seeds", "1,2"]) == 0
    summary = json.loads(run.read_bytes(REPEATS, SUMMARY_JSON))
    _summed(summary, [1, 2], run)
    assert summary["metrics"]["mask AP images / images"]["std"] == 0.0  # same 5 images each
    table = run.read_bytes(REPEATS, SUMMARY_MD).decode()
    assert table in capsys.readouterr().out
    for seed in (1, 2):
        child = RunDir(seed_dir(run.uri, seed))
        config = child.read_config()
        assert (config.seed, config.clustering.seed) == (seed, seed)
        assert read_manifest(child, "mine") == mined  # the run's mining, copied once
        for stage in ("cluster", "detector", "segmenter", "evaluate"):
            manifest = read_manifest(child, stage)
            assert manifest is not None and manifest.upstream, stage
    assert read_manifest(run, "mine") == mined
    detectors = [read_manifest(RunDir(seed_dir(run.uri, s)), "detector") for s in (1, 2)]
    assert detectors[0] and detectors[1] and detectors[0].config_hash != detectors[1].config_hash
    assert pipeline.repeat_main([run.uri, "--seeds", "1,2"]) == 0  # resumable: both seeds reused
    assert capsys.readouterr().out.count("finished, reused") == 2


def test_repeat_refuses_a_run_without_finished_mining(tmp_path: Path, capsys: Any) -> None:
    config = load_config(CONFIG, [f"run_dir={tmp_path}", f"data.root={tmp_path}"])
    RunDir(config.run_dir).write_config(config)
    assert pipeline.repeat_main([str(tmp_path), "--seeds", "1"]) == 2
    assert "stage 'data' is not complete" in capsys.readouterr().err
