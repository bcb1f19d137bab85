"""benchmarks/jpeg_folder.py (the benchmarks' JPEG folder and labels) and gpu_rates.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.masks import decode_rle, mask_to_box
from maskdistill.pseudolabels import decode_label_map

REPO = Path(__file__).resolve().parent.parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


jpeg_folder = _script("jpeg_folder")
gpu_rates = _script("gpu_rates")


def test_our_folder_holds_voc_size_jpegs_of_the_scenes_with_their_labels(tmp_path: Path) -> None:
    folder = jpeg_folder.voc_jpegs(count=3, seed=5, cache=tmp_path)
    ids = folder.image_ids()
    assert ids == ["train_000000.jpg", "train_000001.jpg", "train_000002.jpg"]
    rows = folder.detector_rows()
    labels = folder.segmenter_rows()
    for index, image_id in enumerate(ids):
        shape = ((375, 500), (500, 375))[index % 2]
        truth = SyntheticScenes(num_images=3, image_size=shape, seed=5).load(f"train_{index:06d}")
        assert truth.semantic is not None and truth.instance_masks is not None
        assert truth.instance_classes is not None
        image = folder.dataset.load(image_id).image  # decoded by ImageFolder, as users' runs
        assert image.shape == (*shape, 3)
        # JPEG quality 90: the same picture up to a few grey levels on average
        assert np.abs(image.astype(float) - truth.image).mean() < 6
        assert labels[index]["image_id"] == image_id
        assert np.array_equal(decode_label_map(labels[index]["label_png"]), truth.semantic)
        mask = decode_rle({"size": list(shape), "counts": rows[index]["mask_rle"]})
        assert np.array_equal(mask, truth.instance_masks[0])
        assert rows[index]["cluster"] == truth.instance_classes[0] - 1
        assert rows[index]["bbox"] == list(mask_to_box(mask))
        assert (rows[index]["height"], rows[index]["width"]) == shape
    made = (folder.root / "train" / ids[0]).stat().st_mtime_ns
    again = jpeg_folder.voc_jpegs(count=3, seed=5, cache=tmp_path)
    assert again == folder and (again.root / "train" / ids[0]).stat().st_mtime_ns == made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc-n3-s5-q90"]  # no leftovers


def test_a_user_folder_gets_one_blob_per_image(tmp_path: Path) -> None:
    for name, size in (("a.png", (40, 30)), ("b/c.jpg", (24, 64))):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", size, (10, 20, 30)).save(tmp_path / name)
    folder = jpeg_folder.open_folder(str(tmp_path), count=5, seed=1)
    assert folder.image_ids() == ["a.png", "b/c.jpg"] and folder.labels is None
    rows, labels = folder.detector_rows(), folder.segmenter_rows()
    for index, (image_id, shape) in enumerate((("a.png", (30, 40)), ("b/c.jpg", (64, 24)))):
        label, mask, cluster = jpeg_folder.blob_label(shape, seed=1, index=index)
        assert mask.any() and 0 <= cluster < jpeg_folder.NUM_CLASSES - 1
        assert np.array_equal(label, mask * (cluster + 1))
        assert np.array_equal(decode_label_map(labels[index]["label_png"]), label)
        assert rows[index]["image_id"] == image_id and rows[index]["cluster"] == cluster
        assert np.array_equal(
            decode_rle({"size": list(shape), "counts": rows[index]["mask_rle"]}), mask
        )
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        jpeg_folder.open_folder(str(tmp_path / "a.png"))


def test_gpu_rates_reads_rows_and_picks_the_stage_row(tmp_path: Path) -> None:
    (tmp_path / "gpu.txt").write_text("GPU 0: NVIDIA H100 80GB HBM3 (UUID: x)\n")
    (tmp_path / "segmenter_bf16.txt").write_text(
        "DeepLab-v3 resnet50 on NVIDIA H100, bf16, 512 px crops, batch 16\n"
        "peak GPU memory (step): 17.9 GiB\nrow         img/s\n"
        "step        140.00\n+data       131.50\nstage       127.25\n"
    )
    (tmp_path / "detector_fp32.txt").write_text("row img/s\nstep 40\n+data 37.5\n")
    (tmp_path / "mine_bf16.txt").write_text("Traceback (most recent call last):\n")
    collected = gpu_rates.collect(tmp_path)
    assert collected["device"] == "GPU 0: NVIDIA H100 80GB HBM3 (UUID: x)"
    assert collected["rates"] == {
        "segmenter_train/bf16": {"value": 127.25, "source": "segmenter_bf16.txt row stage"},
        "detector_train/fp32": {"value": 37.5, "source": "detector_fp32.txt row +data"},
    }
    assert collected["rows"]["segmenter_bf16"] == {"step": 140.0, "+data": 131.5, "stage": 127.25}
    assert "mine_bf16" not in collected["rows"]  # a failed benchmark gives no rate
    json.dumps(collected)  # what gpu_rates.py writes
