import io
import socket
import struct
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from PIL import Image

from maskdistill.config import ServeConfig
from maskdistill.inference import Detector, Segmenter
from serve import app
from tests.runs import write_run

# the run's `serve:` section: one replica, batches of at most 4 (the tests check both)
RUN_SERVE = ("serve.max_batch_size=4", "serve.max_replicas=1", "serve.batch_wait_timeout_s=0.1")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("served_run"), *RUN_SERVE, detector=True)


@pytest.fixture(scope="session")
def segmenter(trained_run: Path) -> Segmenter:
    """The run's segmenter as a replica loads it: the default serve.max_side, pad_multiple."""
    serving = ServeConfig()
    return Segmenter.load(
        str(trained_run), max_side=serving.max_side, pad_multiple=serving.pad_multiple
    )


@pytest.fixture(scope="session")
def detector(trained_run: Path) -> Detector:
    return Detector.load(str(trained_run), max_side=ServeConfig().max_side)


def scene(seed: int, height: int = 24, width: int = 32) -> np.ndarray:
    """uint8 RGB blocks of random colours (8 x 8 px), so labels differ across the image."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (-(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    return np.ascontiguousarray(blocks.repeat(8, axis=0).repeat(8, axis=1)[:height, :width])


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def assert_same_labels(got: np.ndarray, image: np.ndarray, segmenter: Segmenter) -> None:
    """`got` equals `segmenter.segment([image])` except where the top two logits are within 1e-5
    (float rounding, which depends on batch composition and thread count, may flip the argmax
    there; the untrained model's logits spread about 0.06, so such ties stay rare)."""
    (logits,) = segmenter.logits([image])
    expected = logits.argmax(dim=0).numpy()
    top2 = logits.topk(2, dim=0).values
    decided = (top2[0] - top2[1]).numpy() >= 1e-5
    assert got.shape == expected.shape == image.shape[:2]
    assert decided.mean() > 0.98
    assert np.array_equal(got[decided], expected[decided])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving(run_dir: Path, overrides: Mapping[str, Any]) -> Iterator[str]:
    """A real Ray (2 CPUs) and `serve.run` of the app on a free localhost port; its base URL."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield app.start(str(run_dir), port=free_port(), overrides=overrides)
    finally:
        app.stop()
        ray.shutdown()
