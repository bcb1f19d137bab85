"""The service over HTTP: a real `serve.run` on localhost, every format and every error code."""

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from maskdistill.data.images import decode_image
from maskdistill.inference import Detector, Segmenter
from maskdistill.masks import decode_rle, mask_to_box
from maskdistill.visualize import overlay, palette
from tests.runs import NUM_CLASSES
from tests.serve.conftest import (
    assert_same_labels,
    encode,
    png_claiming,
    scene,
    serving,
)

pytestmark = pytest.mark.slow  # Ray and Serve start-up: about 30 s on 2 cores

MAX_BODY = 200_000
MAX_PIXELS = 1_000_000
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def url(trained_run: Path) -> Iterator[str]:
    # args override the run's serve section (max_batch_size 4 etc. come from config.yaml)
    with serving(trained_run, {"max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS}) as base:
        yield base


def post(url: str, image: np.ndarray, **params: Any) -> requests.Response:
    return requests.post(f"{url}/segment", data=encode(image), headers=PNG, params=params)


def label_map(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.mode == "L"
    return np.asarray(picture).astype(np.int64)


def test_png_is_the_label_map_at_the_input_size(url: str, segmenter: Segmenter) -> None:
    image = scene(0, 27, 35)
    labels = label_map(post(url, image))
    assert labels.shape == (27, 35) and labels.max() < NUM_CLASSES
    assert len(np.unique(labels)) > 1  # a non-trivial map, so the comparison means something
    assert_same_labels(labels, image, segmenter)
    assert np.array_equal(label_map(post(url, image, format="png")), labels)


def test_multipart_field_gives_the_raw_body_result(url: str) -> None:
    image = scene(1)
    raw = label_map(post(url, image))
    for part in (("x.png", encode(image), "image/png"), ("x.png", encode(image))):
        multipart = requests.post(f"{url}/segment", files={"image": part})
        assert np.array_equal(label_map(multipart), raw)


def test_jpeg_is_segmented_as_decoded(url: str, segmenter: Segmenter) -> None:
    data = encode(scene(2, 32, 40), "JPEG")
    response = requests.post(f"{url}/segment", data=data, headers={"Content-Type": "image/jpeg"})
    assert_same_labels(label_map(response), decode_image(data, "jpeg"), segmenter)


def test_json_lists_present_classes_with_counts_and_boxes(url: str, segmenter: Segmenter) -> None:
    image = scene(3, 30, 20)
    response = post(url, image, format="json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    table = response.json()
    assert (table["width"], table["height"]) == (20, 30)
    assert sum(row["pixels"] for row in table["classes"]) == 30 * 20
    labels = label_map(post(url, image))
    assert [row["label"] for row in table["classes"]] == sorted(np.unique(labels).tolist())
    for row in table["classes"]:
        assert row["name"] == segmenter.class_names[row["label"]]
        assert row["pixels"] == int((labels == row["label"]).sum())
        assert tuple(row["box"]) == mask_to_box(labels == row["label"])


def test_overlay_is_the_image_blended_with_label_colours(url: str) -> None:
    image = scene(4, 26, 34)
    response = post(url, image, format="overlay", alpha=0.7)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.mode == "RGB" and picture.size == (34, 26)
    labels = label_map(post(url, image))
    assert np.array_equal(np.asarray(picture), overlay(image, labels, alpha=0.7))


def test_health_classes_and_docs(url: str, segmenter: Segmenter) -> None:
    assert requests.get(f"{url}/healthz").json() == {"status": "ok"}
    classes = requests.get(f"{url}/classes").json()["classes"]
    assert [c["label"] for c in classes] == list(range(NUM_CLASSES))
    assert [c["name"] for c in classes] == segmenter.class_names
    assert [c["color"] for c in classes] == palette(NUM_CLASSES)[:NUM_CLASSES].tolist()
    spec = requests.get(f"{url}/openapi.json").json()
    assert {"/segment", "/instances", "/classes", "/healthz"} <= set(spec["paths"])
    segment = spec["paths"]["/segment"]["post"]
    assert {"image/*", "multipart/form-data"} <= set(segment["requestBody"]["content"])
    assert {"400", "401", "413", "415", "422"} <= set(segment["responses"])
    docs = requests.get(f"{url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


class Chunked:
    """A body of `size` zero bytes that requests streams without Content-Length (chunked)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, self.size, 10_000):
            yield b"\0" * min(10_000, self.size - start)


BAD_REQUESTS: dict[str, tuple[dict[str, Any], int, str]] = {
    "garbage": ({"data": b"not an image", "headers": PNG}, 400, "not a decodable image"),
    "empty": ({"data": b"", "headers": PNG}, 400, "empty file"),
    "truncated": ({"data": encode(scene(5))[:60], "headers": PNG}, 400, "not a decodable"),
    "no multipart boundary": (
        {"data": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        "multipart",
    ),
    "body over the limit": (
        {"data": b"\0" * (MAX_BODY + 1), "headers": PNG},
        413,
        "max_body_bytes",
    ),
    "chunked body over the limit": (
        {"data": Chunked(MAX_BODY + 20_000), "headers": PNG},
        413,
        "max_body_bytes",
    ),
    "pixels over max_pixels": (
        {"data": png_claiming(1001, 1000), "headers": PNG},
        413,
        "1001 x 1000 = 1001000 pixels exceeds max_pixels=1000000",
    ),
    "decompression bomb": (
        {"data": png_claiming(100_000, 100_000), "headers": PNG},
        413,
        "decompression bomb",
    ),
    "text body": ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
    "no content type": ({"data": encode(scene(6))}, 415, "(none)"),
    "text part": ({"files": {"image": ("a.txt", b"hi", "text/plain")}}, 415, "text/plain"),
    "bad format": (
        {"data": encode(scene(6)), "headers": PNG, "params": {"format": "gif"}},
        422,
        "format",
    ),
    "alpha out of range": (
        {"data": encode(scene(6)), "headers": PNG, "params": {"format": "overlay", "alpha": 2}},
        422,
        "alpha",
    ),
    "form without image": ({"files": {"picture": ("a.png", encode(scene(6)))}}, 422, "'image'"),
}


def send(url: str, request: dict[str, Any]) -> requests.Response:
    return requests.post(f"{url}/segment", **request)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_json_errors(url: str, case: str) -> None:
    request, status, fragment = BAD_REQUESTS[case]
    response = send(url, request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"} and fragment in response.json()["error"]


def test_unknown_routes_and_methods_get_json_errors(url: str) -> None:
    assert requests.get(f"{url}/nothing").json() == {"error": "Not Found"}
    wrong_method = requests.get(f"{url}/segment")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_still_answers_correctly_after_bad_requests(url: str, segmenter: Segmenter) -> None:
    for request, status, _ in BAD_REQUESTS.values():
        assert send(url, request).status_code == status
    image = scene(7)
    assert_same_labels(label_map(post(url, image)), image, segmenter)
    assert requests.get(f"{url}/healthz").status_code == 200


def test_concurrent_requests_are_batched_with_unbatched_results(
    url: str, segmenter: Segmenter
) -> None:
    images = [scene(10 + i, *((24, 32) if i % 2 else (20, 28))) for i in range(8)]
    start = threading.Barrier(len(images))

    def request(image: np.ndarray) -> tuple[np.ndarray, int]:
        start.wait()
        response = post(url, image)
        return label_map(response), int(response.headers["X-Batch-Size"])

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(request, images))
    sizes = [size for _, size in results]
    assert max(sizes) > 1, sizes  # some requests shared a forward pass
    assert max(sizes) <= 4, sizes  # the run's serve.max_batch_size
    for image, (labels, _) in zip(images, results, strict=True):
        assert_same_labels(labels, image, segmenter)  # Segmenter.segment on the image alone


def test_a_photo_runs_at_max_side_and_answers_at_its_size(url: str, segmenter: Segmenter) -> None:
    image = scene(20, 700, 1000)  # serve.max_side 640: the forward runs at 448 x 640
    data = encode(image, "JPEG")
    response = requests.post(f"{url}/segment", data=data, headers={"Content-Type": "image/jpeg"})
    labels = label_map(response)
    assert labels.shape == (700, 1000)
    assert_same_labels(labels, decode_image(data, "jpeg"), segmenter)


def test_instances_are_the_detectors_with_rle_masks(url: str, detector: Detector) -> None:
    image = scene(21, 60, 80)
    response = post_instances(url, image, tau=0.0)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"], body["tau"]) == (80, 60, 0.0)
    (expected,) = detector.instances([image], tau=0.0)
    assert len(body["instances"]) == len(expected) > 0
    for got, want in zip(body["instances"], expected, strict=True):
        assert (got["label"], got["name"]) == (want.label, want.name)
        assert got["score"] == pytest.approx(want.score, abs=1e-5)
        assert got["box"] == pytest.approx(list(want.box), abs=1e-3)
        assert np.array_equal(decode_rle(got["segmentation"]), want.mask)
    default = post_instances(url, image).json()
    assert default["tau"] == detector.tau  # the run's pseudo_labels.tau
    assert all(i["score"] > detector.tau for i in default["instances"]) or (
        len(default["instances"]) == 1  # Sec 4.1: the best one when none passes
        and default["instances"][0]["score"] == body["instances"][0]["score"]
    )


def test_instances_as_coco_results(url: str) -> None:
    image = scene(22, 40, 48)
    table = post_instances(url, image, tau=0.0).json()["instances"]
    results = post_instances(url, image, tau=0.0, format="coco", image_id=12).json()
    assert [r["category_id"] for r in results] == [i["label"] for i in table]
    for result, instance in zip(results, table, strict=True):
        x0, y0, x1, y1 = instance["box"]
        assert result["image_id"] == 12 and result["segmentation"] == instance["segmentation"]
        assert result["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])


def post_instances(url: str, image: np.ndarray, **params: Any) -> requests.Response:
    return requests.post(f"{url}/instances", data=encode(image), headers=PNG, params=params)


BAD_INSTANCE_REQUESTS: dict[str, tuple[dict[str, Any], int, str]] = {
    "garbage": ({"data": b"not an image", "headers": PNG}, 400, "not a decodable image"),
    "body over the limit": (
        {"data": b"\0" * (MAX_BODY + 1), "headers": PNG},
        413,
        "max_body_bytes",
    ),
    "text body": ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
    "bad format": (
        {"data": encode(scene(6)), "headers": PNG, "params": {"format": "png"}},
        422,
        "format",
    ),
    "tau of 1": ({"data": encode(scene(6)), "headers": PNG, "params": {"tau": 1}}, 422, "tau"),
    "negative image_id": (
        {"data": encode(scene(6)), "headers": PNG, "params": {"image_id": -1}},
        422,
        "image_id",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INSTANCE_REQUESTS))
def test_bad_instance_requests_get_json_errors(url: str, case: str) -> None:
    request, status, fragment = BAD_INSTANCE_REQUESTS[case]
    response = requests.post(f"{url}/instances", **request)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fragment in response.json()["error"]
    assert requests.get(f"{url}/healthz").status_code == 200
