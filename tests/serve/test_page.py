"""The page at `/` in headless Chromium (Playwright) against one real Serve app with auth on.

What the page shows is checked against the server's own answers to the page's requests and
against maskdistill's Python code: the legend against /segment?format=json, the overlay canvas
against `visualize.overlay`, the downloads byte for byte, the RLE decoder against pycocotools.
"""

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from maskdistill.inference import Segmenter
from maskdistill.masks import decode_rle, encode_rle, mask_to_box
from maskdistill.visualize import overlay, palette
from serve.page import page_html
from tests.serve.conftest import assert_same_labels, encode, scene, serving

try:
    from playwright.sync_api import Browser, Page, Route, sync_playwright
except ImportError:  # pragma: no cover - the `test` extra installs it
    sync_playwright = None

pytestmark = pytest.mark.slow  # Ray and Serve start-up, then a browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN_ENV = "MASKDISTILL_TEST_PAGE_TOKEN"
TOKEN = "p4ge-t0ken"
ARTIFACTS = Path(
    os.environ.get("MASKDISTILL_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)
# the image canvas's (or any canvas's) backing pixels as base64, row-major RGBA
CANVAS_PIXELS = """id => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = '';
  for (let i = 0; i < d.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, d.subarray(i, i + 0x8000));
  }
  return {width: c.width, height: c.height, data: btoa(s)};
}"""
LEGEND_ROWS = """rows => rows.map(r => ({
  label: Number(r.dataset.label), pixels: Number(r.dataset.pixels),
  name: r.querySelector('.name').textContent, share: r.querySelector('.share').textContent,
  colour: getComputedStyle(r.querySelector('.swatch')).backgroundColor,
  shown: r.querySelector('input').checked,
}))"""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def browser() -> Iterator["Browser"]:
    """Debian's Chromium, headless; missing, it skips the module, except in CI where it fails."""
    missing = None
    if sync_playwright is None:
        missing = "the Python package playwright is not installed (pip install -e '.[test]')"
    elif not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if missing:
        if in_ci():
            pytest.fail(f"CI must run the page tests: {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def url(browser: "Browser", trained_run: Path) -> Iterator[str]:
    """One app for every test here, auth on (the page sends the token it is given)."""
    os.environ[TOKEN_ENV] = TOKEN  # before ray.init: the replicas inherit it
    try:
        with serving(trained_run, {"auth_token_env": TOKEN_ENV}) as base:
            yield base
    finally:
        del os.environ[TOKEN_ENV]


@pytest.fixture
def page(browser: "Browser") -> Iterator["Page"]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    try:
        yield context.new_page()
    finally:
        context.close()


def open_page(page: "Page", url: str, token: str | None = TOKEN) -> None:
    page.goto(url)
    if token is not None:
        page.fill("#token", token)


def finished(page: "Page", before: int) -> str:
    """Wait until the page has ended the image after run `before`; its state (ready, error)."""
    page.wait_for_function(f"Number(document.body.dataset.done) > {before}", timeout=60_000)
    return str(page.evaluate("document.body.dataset.state"))


def done(page: "Page") -> int:
    return int(page.evaluate("Number(document.body.dataset.done)"))


def upload(page: "Page", path: Path, data: bytes, *, mime: str | None = None) -> str:
    """Choose the file `path` (holding `data`) in the file input; the page's state at the end.
    `mime` overrides the type the browser gives the file (else taken from its extension)."""
    before = done(page)
    path.write_bytes(data)
    if mime is None:
        page.set_input_files("#file", str(path))
    else:
        page.set_input_files("#file", {"name": path.name, "mimeType": mime, "buffer": data})
    return finished(page, before)


def canvas(page: "Page", element_id: str) -> np.ndarray:
    got = page.evaluate(CANVAS_PIXELS, element_id)
    flat = np.frombuffer(base64.b64decode(got["data"]), dtype=np.uint8)
    return flat.reshape(got["height"], got["width"], 4)


def keep_screenshot(page: "Page", name: str) -> None:
    """A test artefact: the page as shown, in $MASKDISTILL_TEST_ARTIFACTS (test-artifacts/)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def error_text(page: "Page") -> str:
    return page.inner_text("#error") if page.is_visible("#error") else ""


class Recorder:
    """The server's answers to the page's POSTs, as the page got them: each request goes on
    to the server through Playwright (route.fetch), its answer is kept and handed back."""

    def __init__(self, page: "Page", pattern: str = "**/segment**", query: str = "") -> None:
        self.answers: list[tuple[str, bytes]] = []
        self.query = query  # added to each request's URL on its way
        page.route(pattern, self.forward)

    def forward(self, route: "Route") -> None:
        response = route.fetch(url=route.request.url + self.query)
        if route.request.method == "POST":
            self.answers.append((route.request.url, response.body()))
        route.fulfill(response=response)

    def __call__(self, query: str) -> list[bytes]:
        return [body for address, body in self.answers if query in address]


def png_labels(data: bytes) -> np.ndarray:
    picture = Image.open(io.BytesIO(data))
    assert picture.mode == "L"
    return np.asarray(picture).astype(np.int64)


def assert_share(text: str, percent: float) -> None:
    """The legend's "12.3 %" (or "<0.1 %" for a sliver) is `percent` to one decimal."""
    text = text.replace("\u00a0", " ")  # the page keeps the number and "%" on one line
    if percent < 0.05:
        assert text == "<0.1 %"
    else:
        assert text.endswith(" %") and abs(float(text[:-2]) - percent) <= 0.05 + 1e-9, text


def assert_overlay(page: "Page", image: np.ndarray, labels: np.ndarray, alpha: float) -> None:
    got = canvas(page, "overlay")
    assert got.shape == (*image.shape[:2], 4)
    assert (got[..., 3] == 255).all()
    diff = np.abs(got[..., :3].astype(int) - overlay(image, labels, alpha=alpha).astype(int))
    assert diff.max() <= 1, f"{(diff > 1).sum()} channel values differ by more than rounding"


def test_rle_decoder_matches_pycocotools(browser: "Browser") -> None:
    """decodeRle of pycocotools' compressed strings gives the numpy masks back, for masks
    empty, full, tiny, random and large (runs needing several 5-bit chunks)."""
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.zeros((5, 7), bool),
        np.ones((6, 3), bool),
        rng.random((24, 32)) < 0.5,
        rng.random((37, 19)) < 0.05,
        rng.random((19, 37)) < 0.95,
        np.pad(np.ones((300, 200), bool), ((40, 60), (70, 30))),  # long runs
        rng.random((480, 640)) < 0.001,
    ]
    blob = np.zeros((64, 48), bool)
    blob[10:50, 5:40] = True
    masks.append(blob)
    encoded = [encode_rle(mask) for mask in masks]
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_content(page_html())  # the decoder needs no server
        decoded = page.evaluate(
            "rles => rles.map(r => Array.from(maskdistill.decodeRle(r)).join(''))", encoded
        )
        uncompressed = page.evaluate(
            "r => Array.from(maskdistill.decodeRle(r)).join('')",
            {"size": [3, 2], "counts": [1, 2, 3]},  # the list form of COCO RLE too
        )
    finally:
        context.close()
    for mask, rle, text in zip(masks, encoded, decoded, strict=True):
        got = np.frombuffer(text.encode(), dtype=np.uint8).reshape(mask.shape) == ord("1")
        assert np.array_equal(got, mask), rle
        assert np.array_equal(got, decode_rle(rle))
    # runs go down the columns: (0,0)=0, (1,0)=1, (2,0)=1, then column 1 all 0; rows read out
    assert uncompressed == "001010"


def test_upload_shows_overlay_legend_and_downloads(
    page: "Page", url: str, tmp_path: Path, segmenter: Segmenter
) -> None:
    image = scene(3, 96, 128)  # the test model paints two classes in it, one a small share
    answers = Recorder(page)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_page(page, url)
    assert page.title() == "MaskDistill" and page.inner_text("h1") == "MaskDistill"
    assert upload(page, tmp_path / "scene.png", encode(image)) == "ready", error_text(page)
    assert all(address.startswith((url, "blob:", "data:")) for address in requested), requested

    (png,) = answers("segment?format=png")
    (table_bytes,) = answers("segment?format=json")
    labels = png_labels(png)
    assert_same_labels(labels, image, segmenter)  # the page's answer is the model's
    assert np.array_equal(canvas(page, "image")[..., :3], image)

    # the legend: the classes of the server's JSON but background, largest first
    table = json.loads(table_bytes)
    total = table["width"] * table["height"]
    expected = [c for c in table["classes"] if c["label"] != 0]
    assert len(expected) >= 2, "the scene should show a few classes"
    rows = page.eval_on_selector_all("#legend li", LEGEND_ROWS)
    assert [r["label"] for r in rows] == [
        c["label"] for c in sorted(expected, key=lambda c: (-c["pixels"], c["label"]))
    ]
    colours = palette(256)
    by_label = {c["label"]: c for c in expected}
    for row in rows:
        want = by_label[row["label"]]
        assert (row["name"], row["pixels"]) == (want["name"], want["pixels"])
        assert_share(row["share"], 100 * want["pixels"] / total)
        assert row["colour"] == "rgb({}, {}, {})".format(*colours[row["label"]])
        assert row["shown"]
    assert np.array_equal(
        np.bincount(labels.ravel(), minlength=256)[[r["label"] for r in rows]],
        [r["pixels"] for r in rows],
    )

    # the overlay at the default opacity, after the slider, then with one class switched off
    assert page.input_value("#alpha") == "0.5"
    assert_overlay(page, image, labels, 0.5)
    page.fill("#alpha", "0.8")
    assert page.inner_text("#alpha-value") == "0.80"
    assert_overlay(page, image, labels, 0.8)
    off = rows[0]["label"]
    page.uncheck(f"#legend li[data-label='{off}'] input")
    assert_overlay(page, image, np.where(labels == off, 0, labels), 0.8)
    shown = canvas(page, "overlay")[..., :3]
    assert np.array_equal(shown[labels == off], image[labels == off])  # its colour is gone
    page.check(f"#legend li[data-label='{off}'] input")
    assert_overlay(page, image, labels, 0.8)
    assert len(answers("/segment")) == 2  # redrawn without asking the server again

    # the downloads are the bytes the server sent
    for link, body, name in (
        ("#dl-png", png, "scene-labels.png"),
        ("#dl-json", table_bytes, "scene-segment.json"),
    ):
        with page.expect_download() as download:
            page.click(link)
        assert download.value.suggested_filename == name
        assert Path(download.value.path()).read_bytes() == body

    keep_screenshot(page, "page.png")


def fake_instances(image: np.ndarray) -> tuple[dict[str, Any], list[np.ndarray]]:
    """An /instances answer with two elliptic masks in the upper half of `image`."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[:height, :width]
    masks = [
        ((ys - 7) / 5) ** 2 + ((xs - 8) / 6) ** 2 <= 1,
        ((ys - 8) / 4) ** 2 + ((xs - 23) / 6) ** 2 <= 1,
    ]
    instances = [
        {
            "label": label,
            "name": name,
            "score": score,
            "box": [float(v) for v in mask_to_box(mask)],
            "segmentation": encode_rle(mask),
        }
        for mask, label, name, score in zip(
            masks, (1, 3), ("person", "dog"), (0.934, 0.5), strict=True
        )
    ]
    return {"width": width, "height": height, "tau": 0.5, "instances": instances}, masks


def test_instances_are_drawn_over_the_overlay(page: "Page", url: str, tmp_path: Path) -> None:
    image = scene(7, 24, 32)
    answer, masks = fake_instances(image)
    seen: list[dict[str, Any]] = []

    def fulfil(route: "Route") -> None:
        request = route.request
        seen.append(
            {
                "method": request.method,
                "url": request.url,
                "body": request.post_data_buffer,
                "headers": request.headers,
            }
        )
        route.fulfill(status=200, content_type="application/json", body=json.dumps(answer))

    answers = Recorder(page)
    page.route("**/instances**", fulfil)
    open_page(page, url)
    page.check("#instances")
    data = encode(image)
    assert upload(page, tmp_path / "objects.png", data) == "ready", error_text(page)
    assert page.evaluate("document.body.dataset.instances") == "ready"

    (request,) = seen
    assert request["method"] == "POST" and request["url"] == f"{url}/instances?format=json"
    assert request["body"] == data
    assert request["headers"]["content-type"] == "image/png"
    assert request["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert page.locator("#instance-list li").all_inner_texts() == ["person 0.93", "dog 0.50"]

    layer = canvas(page, "instance-layer")
    scale = layer.shape[1] // image.shape[1]
    assert scale > 1 and layer.shape[:2] == (image.shape[0] * scale, image.shape[1] * scale)
    centres = layer[scale // 2 :: scale, scale // 2 :: scale]  # one sample per image pixel
    union = masks[0] | masks[1]
    assert (centres[union][:, 3] > 0).all()  # every mask pixel is tinted
    below = np.zeros_like(union)
    below[15:] = True  # under both boxes (rows 2..13): nothing drawn there
    assert (centres[below][:, 3] == 0).all()
    for mask in masks:
        x0, y0, x1, y1 = mask_to_box(mask)
        assert not mask[y0, x0]  # an ellipse leaves the box's corner free: only the stroke is there
        assert layer[y0 * scale + 2, x0 * scale, 3] == 255  # the box's left edge near the corner
        assert layer[y1 * scale - 2, x1 * scale - 1, 3] == 255  # its right edge near the bottom
    colours = {tuple(centres[m][:, :3].mean(axis=0).round()) for m in masks}
    assert len(colours) == 2  # one colour per instance
    (png,) = answers("segment?format=png")
    assert_overlay(page, image, png_labels(png), 0.5)  # the layer leaves the overlay as it was

    page.uncheck("#instances")
    assert (canvas(page, "instance-layer")[..., 3] == 0).all()
    assert page.locator("#instance-list li").count() == 0
    page.check("#instances")  # again: the image is sent again, the answer drawn again
    page.wait_for_function(
        "document.body.dataset.instances === 'ready' && "
        "document.querySelectorAll('#instance-list li').length === 2"
    )
    assert len(seen) == 2
    keep_screenshot(page, "page-instances.png")


def test_instances_from_the_real_route(page: "Page", url: str, tmp_path: Path) -> None:
    """The real route's answer drawn: tau=0 is added on the way (the test run's untrained
    detector keeps nothing at the run's tau), so its RLE masks reach the decoder."""
    answers = Recorder(page, "**/instances**", query="&tau=0")
    open_page(page, url)
    page.check("#instances")
    image = scene(8, 64, 64)
    assert upload(page, tmp_path / "real.png", encode(image)) == "ready", error_text(page)
    assert page.evaluate("document.body.dataset.instances") == "ready", error_text(page)
    (body,) = answers("instances?format=json")
    answer = json.loads(body)
    assert answer["instances"], "tau=0 should keep some of the detector's instances"
    texts = page.locator("#instance-list li").all_inner_texts()
    assert texts == [f"{i['name']} {i['score']:.2f}" for i in answer["instances"]]
    layer = canvas(page, "instance-layer")
    scale = layer.shape[1] // image.shape[1]
    centres = layer[scale // 2 :: scale, scale // 2 :: scale]
    union = np.zeros(image.shape[:2], bool)
    for instance in answer["instances"]:
        union |= decode_rle(instance["segmentation"])
    assert (centres[union][:, 3] > 0).all()


@pytest.mark.parametrize(
    ("name", "mime", "status"),
    [("broken.png", "image/png", 400), ("notes.txt", "text/plain", 415)],
    ids=["not decodable", "not an image type"],
)
def test_server_errors_are_shown(
    page: "Page", url: str, tmp_path: Path, name: str, mime: str, status: int
) -> None:
    data = b"this is not an image\n"
    server = requests.post(
        f"{url}/segment",
        data=data,
        headers={"Content-Type": mime, "Authorization": f"Bearer {TOKEN}"},
    )
    assert server.status_code == status
    open_page(page, url)
    assert upload(page, tmp_path / name, data, mime=mime) == "error"
    shown = error_text(page)
    assert f"({status})" in shown and server.json()["error"] in shown
    assert page.get_attribute("#dl-png", "aria-disabled") == "true"


def test_token_is_asked_for_and_sent(page: "Page", url: str, tmp_path: Path) -> None:
    open_page(page, url, token=None)
    page.wait_for_selector("#error:not([hidden])")  # GET /classes at load got 401
    assert "needs a token" in error_text(page)
    data = encode(scene(9))
    assert upload(page, tmp_path / "locked.png", data) == "error"
    assert "needs a token" in error_text(page) and "bearer token" in error_text(page)
    assert "needed" in (page.get_attribute("#token-label", "class") or "")
    keep_screenshot(page, "page-token.png")

    before = done(page)
    page.fill("#token", "wrong")
    page.press("#token", "Enter")  # a new token retries the image that failed
    assert finished(page, before) == "error" and "needs a token" in error_text(page)

    before = done(page)
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    assert finished(page, before) == "ready", error_text(page)
    assert error_text(page) == ""
    assert page.locator("#legend li").count() >= 1


def test_dropped_file_is_segmented(page: "Page", url: str) -> None:
    open_page(page, url)
    before = done(page)
    transfer = page.evaluate_handle(
        """([b64, name]) => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], name, {type: 'image/png'}));
          return transfer;
        }""",
        [base64.b64encode(encode(scene(10))).decode(), "dropped.png"],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert finished(page, before) == "ready", error_text(page)
    assert "dropped.png" in page.inner_text("#status")
    assert page.locator("#legend li").count() >= 1
