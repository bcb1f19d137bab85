"""The README's first command: the whole pipeline on synthetic scenes, then the service, once.

    make demo          # = python -m jobs.demo --config configs/demo.yaml

Runs every stage of `jobs.pipeline` (Ray in-process), starts the HTTP segmentation service on
the trained run, sends it one image of the synthetic `test` split (held out from every stage),
saves the answer as `run_dir/demo/query.png` (image | service overlay) with its JSON summary,
stops the service and prints the stage table and Table 1 of this run. Takes the pipeline's
flags (`--from`, `--only`, `--force`, `--set`).
"""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from jobs import pipeline
from jobs.common import start
from maskdistill import console
from maskdistill.config import ExperimentConfig
from maskdistill.data import build_dataset
from maskdistill.outputs import TABLE1_FILE
from maskdistill.rundir import RunDir
from maskdistill.visualize import image_grid, png_bytes

QUERY_SPLIT = "test"


def held_out_image(config: ExperimentConfig) -> np.ndarray:
    """The first image of a split no stage has seen (synthetic `test`)."""
    dataset = build_dataset(config.data, QUERY_SPLIT)
    return dataset.load(dataset.image_ids()[0]).image


def post_image(url: str, image: np.ndarray, image_format: str) -> bytes:
    request = urllib.request.Request(
        f"{url}/segment?format={image_format}",
        data=png_bytes(image),
        headers={"Content-Type": "image/png"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        body: bytes = response.read()
        return body


def query_service(config: ExperimentConfig) -> dict[str, Any]:
    """Start the service on this run, segment one held-out image, save the answer, stop."""
    from serve import app

    console.quiet_loggers()  # Ray Serve gave its logger a console handler when imported
    run = RunDir(config.run_dir)
    url = app.start(run.uri)
    try:
        image = held_out_image(config)
        overlay = np.asarray(
            Image.open(io.BytesIO(post_image(url, image, "overlay"))).convert("RGB")
        )
        answer: dict[str, Any] = json.loads(post_image(url, image, "json"))
    finally:
        app.stop()
    run.write_bytes(png_bytes(image_grid([[image, overlay]])), "demo", "query.png")
    run.write_json(answer, "demo", "query.json")
    answer["picture"] = run.path("demo", "query.png")
    return answer


def main(argv: Sequence[str] | None = None) -> int:
    config, args = start(__doc__, argv, extra=pipeline.add_arguments)
    ran = pipeline.run_pipeline(config, args)
    answer = query_service(config)
    run = RunDir(config.run_dir)
    print(pipeline.summary(run, ran))
    print()
    print(run.read_bytes(*TABLE1_FILE).decode(), end="")
    found = ", ".join(f"{c['name']} ({c['pixels']} px)" for c in answer["classes"])
    print(f"service answer for one held-out image: {found}")
    print(f"picture: {answer['picture']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
