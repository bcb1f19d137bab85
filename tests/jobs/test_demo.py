from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import demo
from maskdistill.rundir import RunDir
from tests.runs import write_run

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_the_demo_query_segments_a_held_out_image_and_saves_the_answer(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", "data.synthetic.image_size=[40, 56]")
    config = RunDir(str(run_dir)).read_config()
    answer = demo.query_service(config)
    image = demo.held_out_image(config)
    assert image.shape == (40, 56, 3)
    assert sum(c["pixels"] for c in answer["classes"]) == 40 * 56
    picture = np.asarray(Image.open(answer["picture"]))
    assert picture.shape[2] == 3 and picture.shape[1] > picture.shape[0]  # image | overlay
    assert (run_dir / "demo" / "query.json").exists()
