"""Segment images without ground truth: a folder or URI prefix in, label PNGs out.

    maskdistill predict runs/demo path/or/s3://images out/or/s3://labels [--overlays]

Each image `a/b.jpg` gets `OUTPUT/a/b.png`: one channel of segmenter labels (0 background,
1 + cluster; 16-bit when there are more than 255), the input's size (A.3: original resolution).
`--overlays` adds `OUTPUT/overlays/a/b.png`. Unreadable images are skipped and listed with their
reason in `OUTPUT/manifest.json`; a rerun skips images whose label PNG already exists, so an
interrupted run resumes. Runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from maskdistill import storage
from maskdistill.data.base import UnreadableImage
from maskdistill.data.folder import ImageFolder
from maskdistill.inference import Segmenter
from maskdistill.pseudolabels import encode_label_map
from maskdistill.rundir import RunDir
from maskdistill.visualize import overlay, png_bytes


@dataclass
class PredictReport:
    written: int = 0
    reused: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def label_names(image_ids: Sequence[str]) -> dict[str, str]:
    """The label PNG's path under the output for each image id (a path relative to the input):
    `a/b.jpg` -> `a/b.png`, or `a/b.jpg.png` when another image shares the stem `a/b`."""
    stems = Counter(posixpath.splitext(i)[0] for i in image_ids)
    return {
        i: f"{i}.png" if stems[posixpath.splitext(i)[0]] > 1 else f"{posixpath.splitext(i)[0]}.png"
        for i in image_ids
    }


def predict_folder(
    segmenter: Segmenter,
    images: ImageFolder,
    output: str,
    *,
    batch_size: int = 8,
    overlays: bool = False,
) -> PredictReport:
    """Write a label PNG for every image of `images` under `output`; what was done."""
    report = PredictReport()
    output = output.rstrip("/")
    existing = storage.list_tree(output)
    names = label_names(images.image_ids())
    pending = []
    for image_id, name in names.items():
        if name in existing:
            report.reused += 1
        else:
            pending.append(image_id)
    for start in tqdm(range(0, len(pending), batch_size), desc="predict", unit="batch"):
        samples = []
        for image_id in pending[start : start + batch_size]:
            try:
                samples.append(images.load(image_id))
            except UnreadableImage as err:
                report.skipped[image_id] = err.reason
        labels = segmenter.segment([s.image for s in samples])
        for sample, label_map in zip(samples, labels, strict=True):
            if overlays:
                picture = png_bytes(overlay(sample.image, label_map))
                storage.write_bytes(f"{output}/overlays/{names[sample.image_id]}", picture)
            storage.write_bytes(f"{output}/{names[sample.image_id]}", encode_label_map(label_map))
            report.written += 1
    body = {
        "written": report.written,
        "reused": report.reused,
        "skipped": report.skipped,
        "class_names": segmenter.class_names,
    }
    storage.write_bytes(f"{output}/manifest.json", json.dumps(body, indent=2).encode())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskdistill predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory with a trained segmenter")
    parser.add_argument("input", help="folder or URI prefix of images (searched recursively)")
    parser.add_argument("output", help="folder or URI prefix for the label PNGs")
    parser.add_argument("--overlays", action="store_true", help="also write colour overlays")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        segmenter = Segmenter.from_run(args.run_dir, device=device)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = RunDir(args.run_dir).read_config().data
    images = ImageFolder(args.input, max_pixels=data.max_pixels, min_side=data.min_side)
    report = predict_folder(
        segmenter, images, args.output, batch_size=args.batch_size, overlays=args.overlays
    )
    print(
        f"predict: {report.written} written, {report.reused} already there, "
        f"{len(report.skipped)} skipped -> {args.output}"
    )
    return 0
