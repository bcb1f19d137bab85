"""Request decoding and response encoding, without a server."""

import io

import numpy as np
import pytest
from PIL import Image

from maskdistill.visualize import palette
from serve.codec import ApiError, class_list, class_table, label_png, overlay_png, read_image
from tests.serve.conftest import encode, png_claiming, scene


def test_class_table_golden() -> None:
    labels = np.array([[0, 0, 2], [0, 2, 2], [3, 0, 0]])
    names = ["background", "cat", "dog", "car"]
    assert class_table(labels, names) == {
        "width": 3,
        "height": 3,
        "classes": [
            {"label": 0, "name": "background", "pixels": 5, "box": [0, 0, 3, 3]},
            {"label": 2, "name": "dog", "pixels": 3, "box": [1, 0, 3, 2]},
            {"label": 3, "name": "car", "pixels": 1, "box": [0, 2, 1, 3]},
        ],
    }


@pytest.mark.parametrize(("num_classes", "mode"), [(5, "L"), (256, "L"), (300, "I;16")])
def test_label_png_round_trips(num_classes: int, mode: str) -> None:
    labels = np.random.default_rng(0).integers(0, num_classes, (7, 9))
    picture = Image.open(io.BytesIO(label_png(labels, num_classes=num_classes)))
    assert picture.mode == mode
    assert np.array_equal(np.asarray(picture).astype(np.int64), labels)


def test_overlay_png_keeps_background_pixels() -> None:
    image = scene(0, 4, 6)
    labels = np.zeros((4, 6), dtype=np.int64)
    labels[1:3, 2:5] = 1
    blended = np.asarray(Image.open(io.BytesIO(overlay_png(image, labels, alpha=1.0))))
    assert np.array_equal(blended[labels == 0], image[labels == 0])
    assert (blended[labels == 1] == palette(2)[1]).all()


def test_class_list_names_and_colours() -> None:
    rows = class_list(["background", "a", "b"])
    assert rows == [
        {"label": 0, "name": "background", "color": [0, 0, 0]},
        {"label": 1, "name": "a", "color": [128, 0, 0]},
        {"label": 2, "name": "b", "color": [0, 128, 0]},
    ]


def test_read_image_accepts_any_size_down_to_one_pixel() -> None:
    assert read_image(encode(scene(1, 1, 1)), max_pixels=10).shape == (1, 1, 3)
    image = scene(2, 5, 3)
    assert np.array_equal(read_image(encode(image), max_pixels=15), image)


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (encode(scene(3, 5, 4)), 413, "5 = 20 pixels exceeds max_pixels=19"),
        (png_claiming(100_000, 100_000), 413, "decompression bomb"),
        (b"GIF89a broken", 400, "not a decodable image"),
        (b"", 400, "empty file"),
    ],
)
def test_read_image_refusals(data: bytes, status: int, fragment: str) -> None:
    with pytest.raises(ApiError) as caught:
        read_image(data, max_pixels=19)
    assert caught.value.status == status and fragment in caught.value.message
