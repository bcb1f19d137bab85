"""configs/coco20k.yaml through every stage on a fake COCO tree (Sec 4.1, Table 3 b, d, f).

The tree: instances_train2014.json over 10 tiny synthetic scenes (JPEGs), COCO category ids
that are not 1..C, crowd regions as uncompressed RLE (iscrowd 1), and an id list of 6 of them
standing in for COCO20k. K-means must see all 10, every training stage only the 6.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from jobs import pipeline
from maskdistill.config import ExperimentConfig, load_config
from maskdistill.data import build_dataset
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.evaluate import DETECTOR as DETECTOR_ROW
from maskdistill.evaluate import MINED, SEGMENTER
from maskdistill.outputs import (
    features_of,
    read_index,
    read_labeled,
    read_metrics,
    read_mined,
    read_pseudo,
)
from maskdistill.rundir import RunDir, read_manifest
from maskdistill.stages import needed
from tests.jobs.paper import TINY_PAPER

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "coco20k.yaml"
IMAGES, LISTED = 10, (2, 3, 5, 7, 8, 11)  # COCO ids 2..11; the id list names 6 of them
CATEGORY_IDS = (18, 3, 44)  # synthetic class c is COCO category CATEGORY_IDS[c - 1]
H, W = 48, 64
CROWD_EVERY = 3  # images 2, 5, 8, 11 get a crowd region in their lower right corner
TINY_COCO = (*TINY_PAPER, "mining.shard_size=4")


def _rle(mask: np.ndarray, *, compressed: bool) -> dict[str, Any]:
    if compressed:
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    flat = mask.ravel(order="F")  # COCO's crowd form: column-major runs, zeros first
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


def fake_coco(root: Path) -> Path:
    """`root/annotations/instances_train2014.json`, `root/train2014/*.jpg`, the id list."""
    scenes = SyntheticScenes(
        num_images=IMAGES, image_size=(H, W), num_classes=3, min_objects=1, max_objects=2
    )
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    images, annotations = [], []
    for coco_id, image_id in enumerate(scenes.image_ids(), start=2):
        sample = scenes.load(image_id)
        assert sample.instance_masks is not None and sample.instance_classes is not None
        name = f"COCO_train2014_{coco_id:012d}.jpg"
        Image.fromarray(sample.image).save(root / "train2014" / name, quality=95)
        images.append({"id": coco_id, "file_name": name, "height": H, "width": W})
        objects = list(zip(sample.instance_masks, sample.instance_classes, strict=True))
        regions = [(mask, int(cls), 0) for mask, cls in objects]
        if coco_id % CROWD_EVERY == 2:
            crowd = np.zeros((H, W), bool)
            crowd[36:, 48:] = True
            regions.append((crowd, 1, 1))
        for mask, cls, iscrowd in regions:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": coco_id,
                    "category_id": CATEGORY_IDS[cls - 1],
                    "segmentation": _rle(mask, compressed=not iscrowd),
                    "area": float(mask.sum()),
                    "bbox": [0, 0, 1, 1],
                    "iscrowd": iscrowd,
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(document))
    names = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in LISTED]  # LOST's line format
    (root / "coco20k_ids.txt").write_text("\n".join(names) + "\n")
    return root


def _listed() -> set[str]:
    return {f"COCO_train2014_{i:012d}" for i in LISTED}


def _everything() -> set[str]:
    return {f"COCO_train2014_{i:012d}" for i in range(2, 2 + IMAGES)}


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    root = fake_coco(tmp_path_factory.mktemp("coco"))
    overrides = [
        f"run_dir={tmp_path_factory.mktemp('run')}",
        f"data.root={root}",
        "data.coco_annotations=annotations/instances_train2014.json",
        f"data.coco_image_ids={root / 'coco20k_ids.txt'}",
        *TINY_COCO,
    ]
    config = load_config(CONFIG, overrides)
    args = argparse.Namespace(only=None, start=None, force=False)
    ran = pipeline.run_pipeline(config, args)
    assert list(ran) == needed(config) and all(ran.values())
    return config


def test_train2014_and_the_list_are_mined_once_each(coco_run: ExperimentConfig) -> None:
    run = RunDir(coco_run.run_dir)
    assert set(read_mined(run, "train2014").column("image_id").to_pylist()) == _everything()
    assert read_mined(run, "train2014").num_rows == IMAGES
    assert set(read_mined(run, "coco20k").column("image_id").to_pylist()) == _listed()
    manifest = read_manifest(run, "mine")
    assert manifest is not None and manifest.outputs == IMAGES + len(LISTED)


def test_kmeans_fits_on_all_train2014_and_labels_the_list(coco_run: ExperimentConfig) -> None:
    # Sec 4.1: the centroids come from every train2014 object; each COCO20k object gets the
    # cluster of its nearest centroid, the same as its own image in train2014.
    run = RunDir(coco_run.run_dir)
    manifest = read_manifest(run, "cluster")
    assert manifest is not None and manifest.metrics["fit_objects"] == IMAGES
    everything = {r["image_id"]: r for r in read_labeled(run, "train2014").to_pylist()}
    listed = read_labeled(run, "coco20k")
    assert set(listed.column("image_id").to_pylist()) == _listed()
    assert len(set(everything)) == IMAGES
    features = features_of(listed)
    for row, feature in zip(listed.to_pylist(), features, strict=True):
        twin = everything[row["image_id"]]
        np.testing.assert_allclose(feature, twin["feature"], rtol=1e-4, atol=1e-5)
        assert row["cluster"] == twin["cluster"]


def test_training_stages_see_only_the_list(coco_run: ExperimentConfig) -> None:
    run = RunDir(coco_run.run_dir)
    assert set(read_index(run, "coco20k").column("image_id").to_pylist()) == _listed()
    assert set(read_pseudo(run, "coco20k").column("image_id").to_pylist()) == _listed()
    assert not run.exists("distill", "train2014"), "the support split is never distilled"
    assert not run.exists("data", "train2014.parquet")
    for stage in ("detector", "segmenter"):
        manifest = read_manifest(run, stage)
        assert manifest is not None and 0 < manifest.inputs <= len(LISTED), stage


def test_evaluate_writes_table3_mask_ap_and_table1_on_the_list(coco_run: ExperimentConfig) -> None:
    run = RunDir(coco_run.run_dir)
    metrics = read_metrics(run)
    ap = metrics["mask AP"]
    for source in ("mined", "detector"):
        for row in ("multi class-agnostic", "single semantic", "multi semantic"):  # b, d, f
            scores = ap[f"{source} {row}"]
            assert set(scores) == {"AP", "AP50", "AP75"}
            assert all(0.0 <= v <= 1.0 for v in scores.values())
    for row in (MINED, DETECTOR_ROW, SEGMENTER):
        assert len(metrics[row]["iou"]) == 1 + len(CATEGORY_IDS)  # background + 3 classes
        assert 0.0 <= metrics[row]["miou"] <= 1.0
    manifest = read_manifest(run, "evaluate")
    assert manifest is not None and manifest.outputs == len(LISTED)
    listed = build_dataset(coco_run.data, "coco20k")
    crowds = [listed.load(i).crowd_masks for i in sorted(_listed())]
    assert sum(len(c) for c in crowds if c is not None) == 4  # images 2, 5, 8, 11 were scored
