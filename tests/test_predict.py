import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdistill import predict
from maskdistill.inference import Segmenter
from maskdistill.rundir import RunDir
from tests.runs import NUM_CLASSES, write_run


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    return Segmenter.from_run(str(write_run(tmp_path_factory.mktemp("run"))))


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
    assert Segmenter.from_run(str(run_dir)).class_names[:2] == ["background", "cluster 0"]
    names = ["background", "disc", "ring", "cluster 2", "bar"]
    RunDir(str(run_dir)).write_json({"names": names}, "evaluate", "class_names.json")
    assert Segmenter.from_run(str(run_dir)).class_names == names


def test_predict_writes_a_label_png_per_image_skips_broken_ones_and_resumes(
    segmenter: Segmenter, tmp_path: Path
) -> None:
    folder = _folder(tmp_path / "images")
    out = tmp_path / "labels"
    images = predict.ImageFolder(str(folder))
    report = predict.predict_folder(segmenter, images, str(out), batch_size=2, overlays=True)
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
    assert "not a run directory" in capsys.readouterr().err


def test_a_run_trained_from_moco_loads_without_its_init_file(tmp_path: Path) -> None:
    overrides = ("segmenter.init=moco", f"segmenter.init_path={tmp_path / 'gone.pth.tar'}")
    run_dir = write_run(tmp_path / "run", *overrides)
    assert Segmenter.from_run(str(run_dir)).num_classes == NUM_CLASSES


def test_images_sharing_a_stem_keep_their_extension_in_the_label_name() -> None:
    names = predict.label_names(["a/b.jpg", "a/b.png", "c.jpeg"])
    assert names == {"a/b.jpg": "a/b.jpg.png", "a/b.png": "a/b.png.png", "c.jpeg": "c.png"}
