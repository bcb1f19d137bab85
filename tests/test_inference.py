"""The trained models on new images: bounded working size, padded batches, the detector's
instances (Sec 3.3's confident masks) and COCO results."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO

from maskdistill.cocoformat import image_table, instance_results, semantic_results
from maskdistill.inference import (
    Detector,
    Segmenter,
    padded_forward,
    padded_size,
    upsampled_argmax,
    working_size,
)
from maskdistill.masks import decode_rle
from maskdistill.names import NamesError
from maskdistill.segmenter import build_segmenter
from tests.runs import NUM_CLASSES, write_run


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmenter(num_classes=NUM_CLASSES, backbone="resnet18", init="none").eval()


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    return Detector.load(str(write_run(tmp_path_factory.mktemp("run"), detector=True)))


def blocks(seed: int, height: int, width: int) -> np.ndarray:
    """uint8 RGB of random 8 x 8 px colour blocks."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (-(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    return np.ascontiguousarray(tiles.repeat(8, axis=0).repeat(8, axis=1)[:height, :width])


def test_working_size_shrinks_the_longer_side_only_past_max_side() -> None:
    assert working_size((3000, 4000), 640) == (480, 640)  # 3000 * 640 / 4000 = 480
    assert working_size((4000, 3000), 640) == (640, 480)
    assert working_size((500, 375), 640) == (500, 375)  # never enlarged
    assert working_size((3000, 4000), None) == (3000, 4000)
    assert working_size((2000, 3), 1000) == (1000, 2)  # 3 * 0.5 = 1.5 rounds to 2, at least 1
    assert padded_size((480, 640), 128) == (512, 640)  # 480 -> 4 * 128


def test_upsampled_argmax_is_the_argmax_of_bilinear_interpolation() -> None:
    logits = torch.randn(6, 37, 53, generator=torch.Generator().manual_seed(0))
    for size in ((301, 411), (600, 20), (37, 53)):
        full = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        assert torch.equal(upsampled_argmax(logits, size), full.argmax(dim=0))


def test_padded_forward_without_padding_is_the_model(model: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)["out"]
        padded = padded_forward(model, x, [(64, 96), (64, 96)])
    assert torch.allclose(plain, padded, atol=1e-5)


def test_image_pooling_averages_the_image_and_not_its_padding(model: torch.nn.Module) -> None:
    x = torch.zeros(2, 3, 128, 128)
    x[0, :, :72, :40] = torch.randn(3, 72, 40, generator=torch.Generator().manual_seed(2))
    x[1] = torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(3))
    seen: dict[str, torch.Tensor] = {}
    pooling_conv = model.classifier[0].convs[-1][1]
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, out: seen.update(features=out["out"])),
        pooling_conv.register_forward_hook(lambda m, i, out: seen.update(pooled=i[0])),
    ]
    try:
        with torch.no_grad():
            padded_forward(model, x, [(72, 40), (128, 128)])
    finally:
        for hook in hooks:
            hook.remove()
    features = seen["features"]  # output stride 8: 72 x 40 px are 9 x 5 features
    assert features.shape[-2:] == (16, 16)
    expected = torch.stack([features[0, :, :9, :5].mean((1, 2)), features[1].mean((1, 2))])
    assert torch.allclose(seen["pooled"][:, :, 0, 0], expected, atol=1e-5)


def test_an_answer_does_not_depend_on_its_batch(model: torch.nn.Module) -> None:
    segmenter = Segmenter(model, ["background"] * NUM_CLASSES, max_side=64)
    images = [blocks(4, 60, 50), blocks(5, 200, 120), blocks(6, 64, 64), blocks(7, 20, 90)]
    together = segmenter.segment(images)
    for image, labels in zip(images, together, strict=True):
        (alone,) = segmenter.segment([image])
        assert labels.shape == image.shape[:2]
        assert np.array_equal(labels, alone)
    # the 200 x 120 image ran at 64 x 38 and was upsampled: blocks of equal labels
    logits = segmenter.logits([images[1]])[0]
    assert logits.shape == (NUM_CLASSES, 200, 120)
    decided = (logits.topk(2, dim=0).values.diff(dim=0).abs() > 1e-4)[0].numpy()
    assert np.array_equal(logits.argmax(0).numpy()[decided], together[1][decided])


def test_max_side_below_the_stride_is_refused(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="max_side=16"):
        Segmenter(model, ["background"], max_side=16)


def test_instances_are_the_confident_candidates_at_the_original_size(detector: Detector) -> None:
    image = blocks(8, 90, 120)
    (everything,) = detector.instances([image], tau=0.0)
    assert everything, "the untrained detector still proposes boxes"
    scores = np.array([i.score for i in everything])
    assert (np.diff(scores) <= 0).all()  # most confident first
    tau = float(np.median(scores))
    (kept,) = detector.instances([image], tau=tau)
    assert [i.score for i in kept] == [s for s in scores.tolist() if s > tau]
    (above_all,) = detector.instances([image], tau=min(0.999, float(scores.max()) + 1e-3))
    assert [i.score for i in above_all] == [scores.max()]  # Sec 4.1: the best when none passes
    for instance in everything:
        assert instance.mask.shape == (90, 120) and instance.mask.dtype == bool
        assert instance.name == detector.class_names[instance.label]
        assert 1 <= instance.label < NUM_CLASSES
    assert detector.tau == 0.9  # the run's pseudo_labels.tau


def test_instances_of_a_shrunk_image_come_back_at_its_size(detector: Detector) -> None:
    image = blocks(9, 90, 120)
    small = Detector(
        detector.model, detector.class_names, max_side=60, keep_best_when_none=True, tau=0.0
    )
    (found,) = small.instances([image])
    assert found
    for instance in found:
        x0, y0, x1, y1 = instance.box
        assert instance.mask.shape == (90, 120)
        assert 0 <= x0 <= x1 <= 120.01 and 0 <= y0 <= y1 <= 90.01


def test_coco_results_round_trip_through_pycocotools(detector: Detector, tmp_path: Path) -> None:
    image = blocks(10, 48, 64)
    (found,) = detector.instances([image], tau=0.0)
    labels = np.zeros((48, 64), dtype=np.int64)
    labels[5:20, 3:30], labels[30:, 40:] = 2, 4
    names = ["background", "a", "b", "c", "d"]
    table = image_table([(7, "x/y.jpg", 48, 64)], names)
    (tmp_path / "images.json").write_text(json.dumps(table))
    coco = COCO(str(tmp_path / "images.json"))
    segments = coco.loadRes(semantic_results(7, labels))
    assert sorted(a["category_id"] for a in segments.anns.values()) == [2, 4]
    for ann in segments.anns.values():
        assert np.array_equal(coco.annToMask(ann).astype(bool), labels == ann["category_id"])
    assert segments.anns[1]["bbox"] == [3, 5, 27, 15]
    results = instance_results(7, found)
    loaded = coco.loadRes(results)
    for ann, instance in zip(loaded.anns.values(), found, strict=True):
        assert np.array_equal(decode_rle(ann["segmentation"]), instance.mask)
        assert ann["score"] == instance.score
        x0, y0, x1, y1 = instance.box
        assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == names[1:]


def test_instances_of_background_clusters_are_left_out(detector: Detector) -> None:
    image = blocks(8, 90, 120)
    (everything,) = detector.instances([image], tau=0.0)
    junk = everything[0].label
    names = [n if label != junk else "background" for label, n in enumerate(detector.class_names)]
    named = Detector(detector.model, names, tau=0.0)
    (kept,) = named.instances([image])
    assert [i.score for i in kept] == [i.score for i in everything if i.label != junk]


def test_names_yaml_names_the_labels_of_both_models(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", detector=True)  # 4 clusters
    (run_dir / "names.yaml").write_text('clusters:\n  0: "dog"\n  2: "cat"\n')
    segmenter = Segmenter.load(str(run_dir))
    assert segmenter.class_names == ["background", "dog", "cluster 1", "cat", "cluster 3"]
    loaded = Detector.load(str(run_dir))
    assert loaded.class_names == segmenter.class_names  # detector labels are 1 + cluster


def test_a_merge_the_segmenter_was_not_trained_with_is_refused(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", detector=True)
    (run_dir / "names.yaml").write_text('clusters:\n  0: "dog"\n  1: 0\n  3: "background"\n')
    with pytest.raises(NamesError, match="differently from the trained segmenter"):
        Segmenter.load(str(run_dir))
    names = Detector.load(str(run_dir)).class_names
    assert names == ["background", "dog", "dog", "cluster 2", "background"]
