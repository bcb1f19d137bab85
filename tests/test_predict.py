import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskdistill import predict
from maskdistill.export import export_run
from maskdistill.inference import Segmenter
from maskdistill.rundir import RunDir
from tests.runs import NUM_CLASSES, write_run


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    return Segmenter.load(str(write_run(tmp_path_factory.mktemp("run"))))


def _random_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 255, (*size, 3), dtype=np.uint8)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for name, size in (("a.png", (20, 28)), ("sub/b.png", (33, 17)), ("sub/c.png", (20, 28))):
        Image.fromarray(_random_image(rng, size)).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_segmenter_batches_mixed_sizes_like_single_images(segmenter: Segmenter) -> None:
    rng = np.random.default_rng(1)
    images = [_random_image(rng, size) for size in ((20, 28), (33, 17), (20, 28))]
    together = segmenter.logits(images)
    for image, logits in zip(images, together, strict=True):
        (alone,) = segmenter.logits([image])
        assert logits.shape == (NUM_CLASSES, *image.shape[:2])
        assert np.allclose(logits.numpy(), alone.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="image 0: expected uint8"):
        segmenter.segment([np.zeros((4, 4), dtype=np.uint8)])


def test_class_names_come_from_the_evaluation_when_present(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run")
    assert Segmenter.load(str(run_dir)).class_names[:2] == ["background", "cluster 0"]
    names = ["background", "disc", "ring", "cluster 2", "bar"]
    RunDir(str(run_dir)).write_json({"names": names}, "evaluate", "class_names.json")
    assert Segmenter.load(str(run_dir)).class_names == names


def test_predict_writes_a_label_png_per_image_skips_broken_ones_and_resumes(
    segmenter: Segmenter, tmp_path: Path
) -> None:
    folder = _folder(tmp_path / "images")
    out = tmp_path / "labels"
    images = predict.ImageFolder(str(folder))
    outputs = predict.Outputs(overlays=True)
    report = predict.predict_folder(segmenter, images, str(out), batch_size=2, outputs=outputs)
    assert (report.written, report.reused) == (3, 0)
    assert list(report.skipped) == ["broken.png"]
    for name in ("a.png", "sub/b.png", "sub/c.png"):
        image = np.asarray(Image.open(folder / name))
        labels = np.asarray(Image.open(out / name))
        (expected,) = segmenter.segment([image])
        assert labels.shape == image.shape[:2] and labels.max() < NUM_CLASSES
        assert (labels == expected).all()
        assert Image.open(out / "overlays" / name).mode == "RGB"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["broken.png"] and manifest["class_names"] == segmenter.class_names
    again = predict.predict_folder(segmenter, images, str(out), batch_size=2)
    assert (again.written, again.reused) == (0, 3)


def test_predict_command_names_a_run_without_a_segmenter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert predict.main([str(tmp_path), str(tmp_path), str(tmp_path / "out")]) == 2
    assert "neither an export folder (config.json) nor a run directory" in capsys.readouterr().err


def test_a_run_trained_from_moco_loads_without_its_init_file(tmp_path: Path) -> None:
    overrides = ("segmenter.init=moco", f"segmenter.init_path={tmp_path / 'gone.pth.tar'}")
    run_dir = write_run(tmp_path / "run", *overrides)
    assert Segmenter.load(str(run_dir)).num_classes == NUM_CLASSES


def test_images_sharing_a_stem_keep_their_extension_in_the_label_name() -> None:
    names = predict.label_names(["a/b.jpg", "a/b.png", "c.jpeg"])
    assert names == {"a/b.jpg": "a/b.jpg.png", "a/b.png": "a/b.png.png", "c.jpeg": "c.png"}


def test_palette_pngs_hold_the_labels_with_vocs_colours(
    segmenter: Segmenter, tmp_path: Path
) -> None:
    folder = _folder(tmp_path / "images")
    out = tmp_path / "labels"
    outputs = predict.Outputs(palette=True)
    predict.predict_folder(segmenter, predict.ImageFolder(str(folder)), str(out), outputs=outputs)
    picture = Image.open(out / "a.png")
    assert picture.mode == "P"
    colours = np.asarray(picture.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert colours[1].tolist() == [128, 0, 0] and colours[255].tolist() == [224, 224, 192]
    (expected,) = segmenter.segment([np.asarray(Image.open(folder / "a.png"))])
    assert np.array_equal(np.asarray(picture), expected)


def test_coco_format_and_instances_load_in_pycocotools(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", detector=True)
    folder = _folder(tmp_path / "images")
    out = tmp_path / "coco"
    code = predict.main(
        [str(run_dir), str(folder), str(out), "--format", "coco", "--instances", "--tau", "0"]
        + ["--overlays"]
    )
    assert code == 0
    assert not (out / "a.png").exists()  # COCO JSON instead of label PNGs
    coco = COCO(str(out / "images.json"))
    files = {image["file_name"]: image["id"] for image in coco.dataset["images"]}
    assert sorted(files) == ["a.png", "sub/b.png", "sub/c.png"]
    segmenter = Segmenter.load(str(run_dir), max_side=predict.DEFAULT_MAX_SIDE)
    segments = coco.loadRes(str(out / "segments.json"))
    for name, image_id in files.items():
        (labels,) = segmenter.segment([np.asarray(Image.open(folder / name))])
        anns = segments.loadAnns(segments.getAnnIds(imgIds=[image_id]))
        assert sorted(a["category_id"] for a in anns) == sorted(set(labels.ravel()) - {0})
        for ann in anns:
            assert np.array_equal(segments.annToMask(ann), labels == ann["category_id"])
    instances = coco.loadRes(str(out / "instances.json"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(instances.anns) == manifest["instances"] > 0
    assert {a["image_id"] for a in instances.anns.values()} == set(files.values())
    assert Image.open(out / "overlays" / "a.png").size == (28, 20)


def test_predict_refuses_a_bad_tau_and_runs_at_full_size_with_max_side_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run(tmp_path / "run", detector=True)
    folder = _folder(tmp_path / "images")
    assert (
        predict.main(
            [str(run_dir), str(folder), str(tmp_path / "x"), "--instances"] + ["--tau", "1.5"]
        )
        == 2
    )
    assert "tau" in capsys.readouterr().err
    assert predict.main([str(run_dir), str(folder), str(tmp_path / "y"), "--max-side", "0"]) == 0
    assert json.loads((tmp_path / "y" / "manifest.json").read_text())["max_side"] is None


def test_an_export_predicts_what_its_run_predicts(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", detector=True)
    exported = export_run(str(run_dir), str(tmp_path / "export")).out
    folder = _folder(tmp_path / "images")
    for source, out in ((run_dir, "from_run"), (exported, "from_export")):
        args = [str(source), str(folder), str(tmp_path / out), "--instances", "--tau", "0"]
        assert predict.main(args) == 0
    for name in ("a.png", "sub/b.png", "sub/c.png"):
        from_run = np.asarray(Image.open(tmp_path / "from_run" / name))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "from_export" / name)), from_run)
    instances = [
        json.loads((tmp_path / out / "instances.json").read_text())
        for out in ("from_run", "from_export")
    ]
    assert instances[0] == instances[1] and instances[0]
