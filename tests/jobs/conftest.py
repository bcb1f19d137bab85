from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from maskdistill.config import ExperimentConfig, load_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One in-process Ray with fixed resources for the whole test module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# The demo config shrunk to seconds: timm's 64-wide test ViT on 12 + 4 small scenes.
TINY = (
    "data.synthetic.train_images=12",
    "data.synthetic.val_images=4",
    "data.synthetic.image_size=[48, 64]",
    "backbone.arch=test_vit",
    "mining.short_side=48",
    "mining.resources.batch_size=4",
    "mining.shard_size=5",
    "clustering.view_size=32",
    "clustering.n_init=2",
)


def tiny_config(run_dir: Path, *overrides: str) -> ExperimentConfig:
    return load_config(DEMO, [f"run_dir={run_dir}", *TINY, *overrides])


def image_folder(root: Path, good: int, bad: dict[str, bytes]) -> Path:
    """`good` random PNG/JPEG images plus the planted bad files, in nested folders."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    for i in range(good):
        pixels = rng.integers(0, 255, (40 + 4 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / ("sub" if i % 2 else ".") / f"good_{i}.png")
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return root
