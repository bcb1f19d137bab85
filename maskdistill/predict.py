"""Segment images without ground truth: a folder or URI prefix in, label PNGs (or COCO JSON) out.

    maskdistill predict runs/demo path/or/s3://images out/or/s3://labels [--overlays]
    maskdistill predict exports/demo photos/ out/ --format coco --instances --max-side 640

SOURCE is a run directory or an export folder (`maskdistill export`). Each image `a/b.jpg` gets
`OUTPUT/a/b.png`: one channel of segmenter labels (0 background, 1 + cluster; 16-bit when there
are more than 255), the input's size; `--palette` writes them as palette PNGs with VOC's colour
map (the pixel values stay the labels). `--format coco` writes `segments.json` instead, COCO
results with one RLE segment per class present in each image; `--instances` adds the distilled
Mask R-CNN's confident instances (score > the run's tau, or `--tau`) as `instances.json`. Both
refer to the images listed in `images.json` (`COCO("images.json").loadRes("segments.json")`).
`--overlays` adds `OUTPUT/overlays/a/b.png` (instances boxed and scored when asked).
`--max-side` bounds the forward pass (default 640, `serve.max_side`'s reasoning); 0 runs at each
image's full resolution, the evaluation's protocol (A.3). Unreadable images are skipped and
listed with their reason in `OUTPUT/manifest.json`. A rerun skips images whose label PNG exists,
so an interrupted run resumes; the JSON outputs cover every image, so they are rebuilt whole.
Runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from maskdistill import storage
from maskdistill.cocoformat import image_table, instance_results, semantic_results
from maskdistill.data.base import Sample, UnreadableImage
from maskdistill.data.folder import ImageFolder
from maskdistill.inference import Detector, Instance, Segmenter
from maskdistill.pseudolabels import encode_label_map
from maskdistill.release import read_config
from maskdistill.visualize import draw_boxes, overlay, palette_png, png_bytes

DEFAULT_MAX_SIDE = 640  # ServeConfig.max_side's default, with its reasons
FORMATS = ("png", "coco")


@dataclass
class PredictReport:
    written: int = 0
    reused: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    instances: int = 0


@dataclass
class Outputs:
    """What `predict_folder` writes: label PNGs ("png") or COCO segments ("coco"), palette PNGs,
    overlays, and the detector's instances when a detector is given."""

    format: str = "png"
    palette: bool = False
    overlays: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}: expected one of {FORMATS}")


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
    outputs: Outputs | None = None,
    detector: Detector | None = None,
) -> PredictReport:
    """Write the predictions for every image of `images` under `output`; what was done."""
    outputs = outputs or Outputs()
    report = PredictReport()
    output = output.rstrip("/")
    names = label_names(images.image_ids())
    coco_ids = {image_id: n + 1 for n, image_id in enumerate(sorted(names))}
    whole = outputs.format == "coco" or detector is not None
    existing = set() if whole else storage.list_tree(output)
    pending = [i for i in names if names[i] not in existing]
    report.reused = len(names) - len(pending)
    segments: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    table: list[tuple[int, str, int, int]] = []
    for start in tqdm(range(0, len(pending), batch_size), desc="predict", unit="batch"):
        samples = _load(images, pending[start : start + batch_size], report)
        pictures = [s.image for s in samples]
        labels = segmenter.segment(pictures)
        instances = detector.instances(pictures) if detector else [[] for _ in samples]
        for sample, label_map, objects in zip(samples, labels, instances, strict=True):
            coco_id = coco_ids[sample.image_id]
            table.append((coco_id, sample.image_id, *label_map.shape))
            if outputs.format == "coco":
                segments.extend(semantic_results(coco_id, label_map))
            else:
                encoded = palette_png(label_map) if outputs.palette else encode_label_map(label_map)
                storage.write_bytes(f"{output}/{names[sample.image_id]}", encoded)
            if outputs.overlays:
                picture = png_bytes(_overlay(sample.image, label_map, objects))
                storage.write_bytes(f"{output}/overlays/{names[sample.image_id]}", picture)
            found.extend(instance_results(coco_id, objects))
            report.written += 1
            report.instances += len(objects)
    if whole:
        _write_json(f"{output}/images.json", image_table(table, segmenter.class_names))
    if outputs.format == "coco":
        _write_json(f"{output}/segments.json", segments)
    if detector is not None:
        _write_json(f"{output}/instances.json", found)
    body = {
        "written": report.written,
        "reused": report.reused,
        "skipped": report.skipped,
        "instances": report.instances if detector is not None else None,
        "class_names": segmenter.class_names,
        "max_side": segmenter.max_side,
    }
    _write_json(f"{output}/manifest.json", body)
    return report


def _load(images: ImageFolder, image_ids: Sequence[str], report: PredictReport) -> list[Sample]:
    samples = []
    for image_id in image_ids:
        try:
            samples.append(images.load(image_id))
        except UnreadableImage as err:
            report.skipped[image_id] = err.reason
    return samples


def _overlay(image: np.ndarray, labels: np.ndarray, objects: Sequence[Instance]) -> np.ndarray:
    picture = overlay(image, labels)
    if not objects:
        return picture
    captions = [f"{o.name} {o.score:.2f}" for o in objects]
    return draw_boxes(picture, [o.box for o in objects], [o.label for o in objects], captions)


def _write_json(uri: str, body: Any) -> None:
    storage.write_bytes(uri, json.dumps(body, indent=1).encode())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskdistill predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="a run directory with a trained segmenter, or an export")
    parser.add_argument("input", help="folder or URI prefix of images (searched recursively)")
    parser.add_argument("output", help="folder or URI prefix for the label PNGs")
    parser.add_argument("--format", choices=FORMATS, default="png", help="label PNGs or COCO")
    parser.add_argument("--palette", action="store_true", help="palette PNGs, VOC's colours")
    parser.add_argument("--overlays", action="store_true", help="also write colour overlays")
    parser.add_argument("--instances", action="store_true", help="the detector's instances too")
    parser.add_argument("--tau", type=float, help="instances with score > tau (the run's: default)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help="longer side of the forward pass; 0: full resolution (slow and memory-hungry on "
        "photos: a 12 MP one takes minutes on a CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_side = args.max_side or None
    try:
        segmenter = Segmenter.load(args.source, device=device, max_side=max_side)
        detector = None
        if args.instances:
            detector = Detector.load(args.source, device=device, max_side=max_side, tau=args.tau)
        outputs = Outputs(format=args.format, palette=args.palette, overlays=args.overlays)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = read_config(args.source).data
    images = ImageFolder(args.input, max_pixels=data.max_pixels, min_side=data.min_side)
    report = predict_folder(
        segmenter,
        images,
        args.output,
        batch_size=args.batch_size,
        outputs=outputs,
        detector=detector,
    )
    print(
        f"predict: {report.written} written, {report.reused} already there, "
        f"{len(report.skipped)} skipped -> {args.output}"
    )
    return 0
