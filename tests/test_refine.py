"""CRF self-training (S1, Table 2 "+CRF"): the CRF's speed knobs, the refined labels, the
logits that leave the GPU, the evaluation's rows and tables, the config and the stage contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdistill import crf, evaluate
from maskdistill.config import ConfigError, CRFConfig, load_config
from maskdistill.crf import crf_labels, kept_classes
from maskdistill.data.base import Sample
from maskdistill.evaluate import Findings, score_crf_rows, table1, table2
from maskdistill.inference import Segmenter, segmenter_from_config
from maskdistill.outputs import read_weights
from maskdistill.probe import probe_features
from maskdistill.refine import (
    coarse_logits,
    full_softmax,
    predicting_folder,
    refine_image,
    round_config,
)
from maskdistill.release import served_folder
from maskdistill.rundir import RunDir
from maskdistill.segmenter import build_segmenter, normalize
from maskdistill.stages import DETECTOR, OFF, SEGMENTER, fingerprint, needed, stage_hashes
from tests.runs import NUM_CLASSES, write_run

needs_densecrf = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None, reason=f"needs the crf extra: {crf.INSTALL}"
)
RED, BLUE = (220, 40, 40), (40, 60, 220)


def _two_colours(height: int, width: int, edge: int) -> np.ndarray:
    """Red left of column `edge`, blue from it on."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:, :edge], image[:, edge:] = RED, BLUE
    return image


@needs_densecrf
def test_dropping_classes_below_min_probability_keeps_the_full_crfs_labels() -> None:
    # 2 present classes with noisy 0.6 / 0.4 unaries on a red | blue image, 4 absent ones at
    # p = 1e-5 < 1e-3 everywhere: the CRF over 2 classes gives exactly the 6-class labels.
    rng = np.random.default_rng(0)
    image = _two_colours(24, 24, 12)
    truth = (np.arange(24)[None, :] >= 12).repeat(24, axis=0).astype(np.int64)
    noisy = np.where(rng.random(truth.shape) < 0.2, 1 - truth, truth)
    present = np.where(noisy == 1, 0.6, 0.4) - 2e-5
    probabilities = np.full((6, 24, 24), 1e-5, dtype=np.float32)
    probabilities[2], probabilities[4] = 1 - present - 2e-5, present  # absent: 0, 1, 3, 5
    assert kept_classes(probabilities, 1e-3).tolist() == [2, 4]
    full = crf_labels(image, probabilities, CRFConfig(min_probability=0.0))
    dropped = crf_labels(image, probabilities, CRFConfig(min_probability=1e-3))
    np.testing.assert_array_equal(dropped, full)
    np.testing.assert_array_equal(full, np.where(truth == 1, 4, 2))  # cleaned to the colours


def test_one_class_left_is_the_answer_without_a_crf() -> None:
    # Class 1 at 0.9999 everywhere, the others 5e-5 < 1e-3: label 1 at every pixel.
    probabilities = np.full((3, 5, 7), 5e-5, dtype=np.float32)
    probabilities[1] = 1 - 1e-4
    labels = crf_labels(np.zeros((5, 7, 3), np.uint8), probabilities, CRFConfig())
    assert labels.dtype == np.int64 and (labels == 1).all()
    assert kept_classes(probabilities, 0.5).tolist() == [1]
    assert kept_classes(probabilities, 0.0).tolist() == [0, 1, 2]


@needs_densecrf
def test_refined_label_snaps_to_the_colour_edge_and_counts_what_it_moved() -> None:
    # Coarse logits on a 2 x 4 grid put the boundary mid-image (column 16 of 32: bilinear
    # upsampling is symmetric about it); the colours change at column 12. The CRF moves
    # columns 12-15 to class 1: 4 of 32 columns, changed = 0.125.
    image = _two_colours(16, 32, 12)
    logits = np.zeros((2, 2, 4), dtype=np.float32)
    logits[0, :, :2], logits[1, :, 2:] = 0.5, 0.5
    labels, changed = refine_image(image, logits, CRFConfig())
    assert full_softmax(logits, (16, 32)).argmax(axis=0)[0].tolist() == [0] * 16 + [1] * 16
    np.testing.assert_array_equal(labels, np.repeat([[0] * 12 + [1] * 20], 16, axis=0))
    assert changed == pytest.approx(4 / 32)


@needs_densecrf
def test_max_side_runs_smaller_and_upsamples_to_the_image() -> None:
    # 64 x 128 at max_side 32: the CRF sees 16 x 32; the colour edge at column 64 falls on a
    # cell boundary (column 16 of 32), so the nearest-upsampled labels are exact.
    image = _two_colours(64, 128, 64)
    probabilities = np.full((2, 64, 128), 0.5, dtype=np.float32)
    probabilities[0, :, :64], probabilities[1, :, :64] = 0.7, 0.3
    probabilities[0, :, 64:], probabilities[1, :, 64:] = 0.3, 0.7
    labels = crf_labels(image, probabilities, CRFConfig(max_side=32))
    assert labels.shape == (64, 128)
    np.testing.assert_array_equal(labels, np.repeat([[0] * 64 + [1] * 64], 64, axis=0))


def _tiny_segmenter(num_classes: int = 3) -> Segmenter:
    config = load_config(None, ["segmenter.backbone=resnet18", "segmenter.init=none"])
    torch.manual_seed(0)
    model = segmenter_from_config(config.segmenter, num_classes=num_classes)
    return Segmenter(model, ["background", "a", "b"][:num_classes])


def test_coarse_logits_upsampled_give_the_segmenters_softmax() -> None:
    # What the GPU actor sends (logits at output stride 8) upsampled on the CPU equals the
    # segmenter's own full-size softmax, for two image sizes in one call.
    segmenter = _tiny_segmenter()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, size, dtype=np.uint8) for size in ((40, 56, 3), (33, 47, 3))]
    coarse = coarse_logits(segmenter, images)
    assert [c.shape for c in coarse] == [(3, 5, 7), (3, 5, 6)]
    for image, small, full in zip(images, coarse, segmenter.logits(images), strict=True):
        expected = full.softmax(dim=0).numpy()
        np.testing.assert_allclose(full_softmax(small, image.shape[:2]), expected, atol=1e-5)


def test_rounds_predict_with_the_previous_model_and_train_with_the_recipe() -> None:
    assert predicting_folder(0) == "segmenter"
    assert predicting_folder(2) == "refine/round_1"
    config = load_config(None, ["segmenter.epochs=7", "self_training.rounds=2"])
    assert round_config(config).segmenter == config.segmenter  # epochs None: the same recipe
    shorter = round_config(load_config(None, ["segmenter.epochs=7", "self_training.epochs=3"]))
    assert shorter.segmenter.epochs == 3
    assert shorter.segmenter.model_copy(update={"epochs": 7}) == config.segmenter


def test_refine_runs_only_with_rounds_and_its_keys_reach_it_and_evaluate_only() -> None:
    off = load_config()
    assert "refine" not in needed(off)
    with pytest.raises(ValueError, match="'refine' is not part .*self_training.rounds > 0"):
        fingerprint(off, "refine")
    assert "rounds > 0" in OFF["refine"]
    on = load_config(None, ["self_training.rounds=1"])
    assert needed(on)[-3:] == ["segmenter", "refine", "evaluate"]
    base = stage_hashes(on)
    for override in ("crf.theta_beta=5", "self_training.rounds=2", "crf.min_probability=0"):
        changed = stage_hashes(load_config(None, ["self_training.rounds=1", override]))
        assert [n for n in base if base[n] != changed[n]] == ["refine", "evaluate"], override
    resources = [
        "self_training.resources.num_cpus=2",
        "self_training.resources.concurrency=3",
        "self_training.resources.predictor.num_gpus=0",
    ]
    assert stage_hashes(load_config(None, ["self_training.rounds=1", *resources])) == base


def test_bad_crf_and_self_training_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"self_training.rounds = -1.*>= 0"):
        load_config(None, ["self_training.rounds=-1"])
    with pytest.raises(ConfigError, match=r"crf.max_side = 8.*equal to 32"):
        load_config(None, ["crf.max_side=8"])
    with pytest.raises(ConfigError, match=r"crf.min_probability = 1.*< 1"):
        load_config(None, ["crf.min_probability=1"])


@needs_densecrf
def test_crf_rows_are_scored_and_tabled() -> None:
    # One 16 x 24 image of class 1 (left) and 2 (right). The untrained segmenter's rows hold
    # one confusion each; table 1 and 2 list the three new rows by their paper names.
    segmenter = _tiny_segmenter()
    semantic = np.repeat([[1] * 12 + [2] * 12], 16, axis=0).astype(np.uint8)
    sample = Sample("a", _two_colours(16, 24, 12), semantic, None, None)
    findings = Findings(num_predicted=3, num_classes=3, num_overlays=0)
    features = probe_features(segmenter.model, normalize(sample.image)[None])
    probe = torch.nn.Conv2d(features.shape[1], 3, 1)
    score_crf_rows(
        findings, segmenter, [sample], CRFConfig(), self_trained=True, linear_probe=probe
    )
    rows = (evaluate.SELF_TRAINED, evaluate.CRF_EVAL, evaluate.PROBE_CRF)
    assert set(findings.confusion) == set(rows)
    assert all(findings.confusion[row].sum() == 16 * 24 for row in rows)
    metrics = {row: {"miou": 0.5} for row in (*rows, evaluate.PROBE, evaluate.SEGMENTER)}
    assert all(f"| {row} | 50.0 |" in table1(metrics) for row in rows)
    assert table2(metrics).splitlines()[2:] == [
        "| MaskDistill | 50.0 | 50.0 |",
        "| MaskDistill+CRF (self-training) | - | 50.0 |",
        "| MaskDistill+CRF | 50.0 | 50.0 |",
    ]


def test_predict_serve_and_export_read_the_last_trained_rounds_segmenter(tmp_path: Path) -> None:
    # rounds 2: round_1 holds the final model once trained; before that, the segmenter stage's.
    run_dir = write_run(tmp_path / "run", "self_training.rounds=2")
    run = RunDir(str(run_dir))
    stage_weights = read_weights(run, SEGMENTER)["model"]
    assert served_folder(str(run_dir), SEGMENTER, run.read_config()) == SEGMENTER
    torch.manual_seed(1)
    retrained = build_segmenter(num_classes=NUM_CLASSES, backbone="resnet18", init="none")
    torch.save(
        {"model": retrained.state_dict(), "num_classes": NUM_CLASSES},
        tmp_path / "round.pt",
    )
    run.write_bytes((tmp_path / "round.pt").read_bytes(), "refine/round_1", "model.pt")
    config = run.read_config()
    assert served_folder(str(run_dir), SEGMENTER, config) == "refine/round_1"
    served = Segmenter.load(str(run_dir)).model.state_dict()
    first = next(k for k in retrained.state_dict() if k.endswith("weight"))
    torch.testing.assert_close(served[first], retrained.state_dict()[first])
    assert not torch.equal(served[first], stage_weights[first])
    explicit = Segmenter.load(str(run_dir), folder=SEGMENTER).model.state_dict()
    torch.testing.assert_close(explicit[first], stage_weights[first])  # the evaluation's row
    off = load_config(None, [f"run_dir={run_dir}", "self_training.rounds=0"])
    assert served_folder(str(run_dir), SEGMENTER, off) == SEGMENTER
    assert served_folder(str(run_dir), DETECTOR, config) == DETECTOR
