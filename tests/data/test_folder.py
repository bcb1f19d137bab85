"""ImageFolder over real files in tmp_path: listing, ids, URIs and skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdistill.config import DataConfig
from maskdistill.data import build_dataset
from maskdistill.data.base import SkipLog, UnreadableImage, iter_samples
from maskdistill.data.folder import ImageFolder
from maskdistill.data.images import IMAGE_EXTENSIONS


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, np.ndarray]:
    """Lossless images at several depths, plus files that are not images."""
    pixels = {
        rel: write_image(tmp_path / rel, seed)
        for seed, rel in enumerate(["b.png", "a.PNG", "sub/c.bmp", "sub/deeper/d.tiff"])
    }
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "labels.json").write_text("{}")
    return pixels


def test_lists_images_recursively_with_relative_sorted_ids(
    tmp_path: Path, tree: dict[str, np.ndarray]
) -> None:
    folder = ImageFolder(str(tmp_path))
    assert folder.image_ids() == sorted(tree)
    assert folder.class_names == ()


def test_non_image_extensions_are_ignored(tmp_path: Path, tree: dict[str, np.ndarray]) -> None:
    ids = ImageFolder(str(tmp_path)).image_ids()
    assert not any(i.endswith((".txt", ".json")) for i in ids)
    assert all(Path(i).suffix.lower() in IMAGE_EXTENSIONS for i in ids)


def test_load_returns_pixels_without_ground_truth(
    tmp_path: Path, tree: dict[str, np.ndarray]
) -> None:
    folder = ImageFolder(str(tmp_path))
    for image_id, pixels in tree.items():
        sample = folder.load(image_id)
        assert sample.image_id == image_id
        np.testing.assert_array_equal(sample.image, pixels)
        assert sample.semantic is None and sample.instance_masks is None
        assert sample.instance_classes is None


def test_file_uri_matches_plain_path(tmp_path: Path, tree: dict[str, np.ndarray]) -> None:
    plain = ImageFolder(str(tmp_path))
    uri = ImageFolder(tmp_path.as_uri())
    assert uri.image_ids() == plain.image_ids()
    image_id = "sub/deeper/d.tiff"
    np.testing.assert_array_equal(uri.load(image_id).image, plain.load(image_id).image)


def test_relative_root_is_resolved(
    tmp_path: Path, tree: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path / "sub")
    folder = ImageFolder(".")
    assert folder.image_ids() == ["c.bmp", "deeper/d.tiff"]
    np.testing.assert_array_equal(folder.load("c.bmp").image, tree["sub/c.bmp"])


def test_unknown_id_raises_key_error_naming_it(tmp_path: Path, tree: dict[str, np.ndarray]) -> None:
    with pytest.raises(KeyError, match="nope.png"):
        ImageFolder(str(tmp_path)).load("nope.png")


def test_iter_samples_skips_bad_files_with_reasons(tmp_path: Path) -> None:
    good = {rel: write_image(tmp_path / rel, seed) for seed, rel in enumerate(["1.png", "x/2.png"])}
    good["3.jpg"] = write_image(tmp_path / "3.jpg", 7)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    write_image(tmp_path / "x" / "tiny.png", 8, size=(4, 4))
    skips = SkipLog()
    samples = list(iter_samples(ImageFolder(str(tmp_path)), skips=skips))
    assert sorted(s.image_id for s in samples) == sorted(good)
    reasons = skips.reasons()
    assert set(reasons) == {"corrupt.jpg", "x/tiny.png"}
    assert reasons["corrupt.jpg"].startswith("not a decodable image")
    assert "min_side" in reasons["x/tiny.png"]


def test_limits_are_passed_to_the_decoder(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0, size=(20, 30))
    skips = SkipLog()
    assert list(iter_samples(ImageFolder(str(tmp_path), max_pixels=599), skips=skips)) == []
    assert "max_pixels=599" in skips.reasons()["a.png"]
    assert len(list(iter_samples(ImageFolder(str(tmp_path), min_side=20)))) == 1
    with pytest.raises(UnreadableImage, match="min_side=21"):
        ImageFolder(str(tmp_path), min_side=21).load("a.png")


def test_missing_root_error_names_root_and_extensions(tmp_path: Path) -> None:
    root = str(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError) as caught:
        ImageFolder(root)
    message = str(caught.value)
    assert root in message
    assert ".jpg" in message and ".png" in message


def test_root_without_images_raises(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolder(str(tmp_path))


def test_root_that_is_a_file_raises(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolder(str(tmp_path / "a.png"))


@pytest.mark.parametrize("split", ["", "sub"])
def test_relative_path_is_under_the_data_root_with_the_split_folder(
    tmp_path: Path, tree: dict[str, np.ndarray], split: str
) -> None:
    dataset = build_dataset(DataConfig(kind="folder", root=str(tmp_path)), split)
    names = [dataset.relative_path(i) for i in dataset.image_ids()]
    assert names == sorted(rel for rel in tree if rel.startswith(f"{split}/" if split else ""))
    assert all((tmp_path / name).is_file() for name in names)
    with pytest.raises(KeyError, match="nope.png"):
        dataset.relative_path("nope.png")
