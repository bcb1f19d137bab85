"""Where a run's outputs live and how they read back: writers and readers agree."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from maskdistill import outputs
from maskdistill.clustering import assign, fit_kmeans
from maskdistill.config import load_config
from maskdistill.rundir import Fingerprint, RunDir, stage_run


def test_kmeans_reads_back_and_labels_new_features_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    support = rng.normal(size=(60, 8)).astype(np.float32)
    other = rng.normal(size=(10, 8)).astype(np.float32)
    for whiten in ("none", "pca", "std"):
        fitted = fit_kmeans(support, 3, n_init=2, seed=0, whiten=whiten)
        run = RunDir(str(tmp_path / f"run_{whiten}"))
        outputs.write_kmeans(run, fitted)
        again = outputs.read_kmeans(run)
        np.testing.assert_array_equal(again.centroids, fitted.centroids)
        assert again.inertia == pytest.approx(fitted.inertia)
        np.testing.assert_array_equal(assign(other, again), assign(other, fitted))
        np.testing.assert_array_equal(assign(support, again), fitted.labels)


def test_tables_read_back_by_split_and_folder_root_is_images(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    rows = [{"image_id": "a.jpg", "height": 3, "width": 4, "num_instances": None}]
    table = pa.Table.from_pylist(rows, schema=outputs.INDEX_SCHEMA)
    outputs.write_table(run, table, *outputs.index_path(""))
    assert (tmp_path / "data" / "images.parquet").exists()
    assert outputs.read_index(run, "").to_pylist() == rows
    assert (
        outputs.mined_folder("val") == "mine/val" and outputs.pseudo_folder("") == "distill/images"
    )
    assert outputs.read_mined(run, "train").num_rows == 0  # nothing mined yet: empty, typed
    assert outputs.read_pseudo(run, "train", ["image_id"]).column_names == ["image_id"]


def test_coco20k_mines_the_list_and_train2014_once_and_distills_only_the_list() -> None:
    config = load_config(Path(__file__).parents[1] / "configs" / "coco20k.yaml", [])
    assert (config.data.train_split, config.data.val_split) == ("coco20k", "coco20k")
    assert config.clustering.support_split == "train2014" and config.evaluation.mask_ap
    assert not config.evaluation.linear_probe  # 19817 images' features would be cached
    assert outputs.mined_splits(config) == ["coco20k", "train2014"]  # val == train: once
    assert outputs.distilled_splits(config) == ["coco20k"]  # the support split: K-means only
    own = load_config(None, ["clustering.support_split=val"])  # support also used: distilled
    assert outputs.distilled_splits(own) == outputs.mined_splits(own) == ["train", "val"]


def test_pascal_mines_voc07_and_trainval_and_distills_only_what_is_scored() -> None:
    config = load_config(Path(__file__).parents[1] / "configs" / "pascal.yaml", [])
    assert outputs.detector_splits(config) == ["train_aug", "voc07_trainval"]
    assert outputs.mask_ap_split(config) == "trainval"
    assert outputs.mined_splits(config) == ["train_aug", "val", "voc07_trainval", "trainval"]
    assert outputs.distilled_splits(config) == ["train_aug", "val", "trainval"]
    plain = load_config(None, [])  # defaults: the train split trains, AP on val, nothing more
    assert (outputs.detector_splits(plain), outputs.mask_ap_split(plain)) == (["train"], "val")
    assert outputs.mined_splits(plain) == outputs.distilled_splits(plain) == ["train", "val"]


def test_splits_weights_and_class_count_come_from_the_run(tmp_path: Path) -> None:
    config = load_config(None, [f"run_dir={tmp_path}", "clustering.support_split=extra"])
    assert outputs.mined_splits(config) == ["train", "val", "extra"]
    own = load_config(None, [f"run_dir={tmp_path}", "backbone.weights=pretrain"])
    assert outputs.backbone_weights(own) == f"{tmp_path}/pretrain/backbone.pth"
    assert outputs.backbone_weights(config) == "random"
    run = RunDir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no cluster stage"):
        outputs.num_classes(run)
    with stage_run(run, Fingerprint("cluster", "h")) as manifest:
        manifest.metrics["clusters"] = 5
    assert outputs.num_classes(run) == 6  # clusters + background
    with pytest.raises(FileNotFoundError, match="no trained detector"):
        outputs.read_weights(run, "detector")
    outputs.write_weights(run, "detector", {"w": torch.zeros(2)}, num_classes=6)
    assert outputs.read_weights(run, "detector")["num_classes"] == 6
