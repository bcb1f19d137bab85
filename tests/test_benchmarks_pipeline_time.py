"""benchmarks/pipeline_time.py: the recipe's work read from the configs and the time arithmetic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from maskdistill.config import load_config

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "pipeline_time", REPO / "benchmarks" / "pipeline_time.py"
)
assert _spec is not None and _spec.loader is not None
pipeline_time = importlib.util.module_from_spec(_spec)
sys.modules["pipeline_time"] = pipeline_time  # dataclasses look their module up there
_spec.loader.exec_module(pipeline_time)
Rate, Work = pipeline_time.Rate, pipeline_time.Work

PASCAL = load_config(str(REPO / "configs" / "pascal.yaml"), [])
DEMO = load_config(str(REPO / "configs" / "demo.yaml"), [])
ONE = {  # every rate 1 img/s but the ones a test reads
    "mine": Rate(100.0, "t"),
    "detector_train": Rate(10.0, "t"),
    "detector_predict": Rate(50.0, "t"),
    "segmenter_train": Rate(20.0, "t"),
    "segmenter_predict": Rate(100.0, "t"),
    "crf": Rate(0.5, "t"),
}


def _images(work: list) -> list[tuple[str, str, float]]:
    return [(w.stage, w.rate, w.images) for w in work]


def test_pascal_work_from_the_config() -> None:
    seg_images = 45 * (10582 // 16) * 16  # 45 epochs x 661 iterations x batch 16 = 475920
    assert seg_images == 475920
    assert _images(pipeline_time.recipe_work(PASCAL)) == [
        # train_aug + val + voc07_trainval (detector, VOC07+12) + trainval (mask AP)
        ("mine", "mine", 10582 + 1449 + 5011 + 2913),
        ("detector", "detector_train", 24000 * 16),
        ("distill", "detector_predict", 10582 + 1449 + 2913),  # not voc07_trainval
        ("segmenter", "segmenter_train", seg_images),
        *[
            (f"refine {r}", rate, images)
            for r in (1, 2)  # self_training.rounds: 2
            for rate, images in (
                ("segmenter_predict", 10582),
                ("crf", 10582),
                ("segmenter_train", seg_images),
            )
        ],
        ("evaluate", "segmenter_predict", 1449),
        ("evaluate", "segmenter_predict", 10582),  # the linear probe's train features
    ]


def test_demo_work_from_synthetic_sizes_and_pretrain_when_on() -> None:
    work = _images(pipeline_time.recipe_work(DEMO))
    assert work[:4] == [
        ("mine", "mine", 256 + 64),
        ("detector", "detector_train", 100 * 4),
        ("distill", "detector_predict", 256 + 64),
        ("segmenter", "segmenter_train", 3 * (256 // 8) * 8),
    ]
    pretrained = load_config(
        str(REPO / "configs" / "demo.yaml"),
        ["backbone.weights=pretrain", "backbone.arch=test_vit"],
    )
    # 50 epochs x (256 // 32 = 8) iterations x 32
    assert _images(pipeline_time.recipe_work(pretrained))[0] == (
        "pretrain",
        "pretrain_train",
        50 * 8 * 32,
    )


def test_project_divides_by_gpus_and_cores_and_adds_startup_once_per_stage() -> None:
    work = [
        Work("segmenter", "train", 4000, "segmenter_train", "bf16"),
        Work("refine 1", "predict", 1000, "segmenter_predict"),
        Work("refine 1", "CRF", 1000, "crf"),
    ]
    rows = pipeline_time.project(work, ONE, gpus=2, cores=8, startup_s=30.0)
    assert [r.seconds for r in rows] == [
        4000 / (20.0 * 2) + 30,  # 130: the bf16 rate falls back to segmenter_train
        1000 / (100.0 * 2) + 30,  # 35: the stage's first item pays the start-up
        1000 / (0.5 * 8),  # 250: CRF per core x 8 cores, no GPU, no second start-up
    ]
    specific = {**ONE, "segmenter_train/bf16": Rate(40.0, "bf16")}
    rows = pipeline_time.project(work[:1], specific, gpus=1, cores=1, startup_s=0.0)
    assert rows[0].seconds == 4000 / 40.0 and rows[0].rate.source == "bf16"


def test_pascal_total_on_one_and_eight_gpus() -> None:
    work = pipeline_time.recipe_work(PASCAL)
    one = sum(r.seconds for r in pipeline_time.project(work, ONE, gpus=1, cores=16, startup_s=0))
    gpu_seconds = (
        19955 / 100  # mine
        + 384000 / 10  # detector
        + 14944 / 50  # distill
        + 3 * 475920 / 20  # segmenter + 2 refine rounds
        + 2 * 10582 / 100  # refine predictions
        + (1449 + 10582) / 100  # evaluate
    )
    crf_seconds = 2 * 10582 / 0.5  # two rounds of CRF over train_aug, per core
    assert one == pytest.approx(gpu_seconds + crf_seconds / 16)
    eight = sum(r.seconds for r in pipeline_time.project(work, ONE, gpus=8, cores=128, startup_s=0))
    assert eight == pytest.approx(gpu_seconds / 8 + crf_seconds / 128)


def test_missing_rate_and_unknown_split_are_named() -> None:
    with pytest.raises(KeyError, match="detector_train/bf16 or detector_train"):
        pipeline_time.lookup({}, Work("detector", "x", 1, "detector_train", "bf16"))
    folder = load_config(None, ["data.kind=folder", "data.root=/x", "data.val_split=null"])
    with pytest.raises(ValueError, match="split 'train': size unknown; pass --split-images"):
        pipeline_time.recipe_work(folder)
    work = pipeline_time.recipe_work(folder, {"train": 160})
    assert work[0].images == 160  # no val split: nothing to predict on it
    assert [w.what for w in work if w.stage == "evaluate"] == ["probe features"]


def test_read_rates_labels_each_rate_and_rejects_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    entry = {"value": 42.5, "source": "segmenter stage row"}
    path.write_text(json.dumps({"device": "H100", "rates": {"segmenter_train/bf16": entry}}))
    assert pipeline_time.read_rates(path) == {
        "segmenter_train/bf16": Rate(42.5, "rates.json (H100): segmenter stage row")
    }
    path.write_text(json.dumps({"rates": {"segmenter": entry}}))
    with pytest.raises(ValueError, match="unknown rate 'segmenter'"):
        pipeline_time.read_rates(path)


def test_a_rate_without_precision_overrides_the_per_precision_defaults() -> None:
    defaults = pipeline_time.DEFAULTS["stage"]
    rates = pipeline_time.override(defaults, {"detector_train": Rate(40.0, "--rate")})
    work = Work("detector", "x", 1, "detector_train", "bf16")
    assert pipeline_time.lookup(defaults, work).value == 8.6  # the bf16 stage row
    assert pipeline_time.lookup(rates, work) == Rate(40.0, "--rate")
    assert rates["mine"] == defaults["mine"]
