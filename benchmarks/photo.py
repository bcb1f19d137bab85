"""A 12 MP phone photo through the service's request path: time and peak memory per max_side.

    python benchmarks/photo.py                          # 640 and full size, resnet50, ~10 min
    python benchmarks/photo.py --max-sides 640,1024 --image my_photo.jpg --run-dir runs/pascal

Each setting runs in a fresh process (so its peak RSS is its own) the three steps of
`POST /segment?format=png`: decode the JPEG (`serve.codec.read_image`), `Segmenter.segment`
with `serve.max_side` (0: full resolution, what the service did before max_side existed), and
the label PNG (`serve.codec.label_png`). HTTP transfer of the file over loopback is left out.
The default image is a 4000 x 3000 JPEG (quality 92) of a synthetic scene, written once under
the cache folder; the default model an untrained resnet50 DeepLab-v3 at output stride 8 with
21 classes (the paper's PASCAL segmenter; weights do not change its cost). Torch uses every
core unless `--threads`.

Measured on the 2-core CPU dev machine, otherwise idle (2026-11-29; "peak rss" is the process's
peak, "request" the peak above the loaded model):
| max_side | decode s | segment s | png s | total s | peak rss MB | request MB |
| 640 | 0.22 | 9.39 | 0.22 | 9.83 | 1435 | 364 |
| 1024 | 0.21 | 13.96 | 0.20 | 14.36 | 1575 | 504 |
| full | 0.21 | 132.39 | 0.16 | 132.75 | 6301 | 5230 |
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path(tempfile.gettempdir()) / "maskdistill-bench"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", help="a JPEG (default: a synthetic 4000 x 3000 one)")
    parser.add_argument("--run-dir", help="a trained run (default: untrained resnet50, 21 classes)")
    parser.add_argument("--max-sides", default="640,0", help="0 is full resolution")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one setting
    return parser.parse_args()


def photo(path: Path) -> Path:
    """A 4000 x 3000 JPEG of a synthetic scene, made once."""
    if not path.exists():
        from maskdistill.data.synthetic import SyntheticScenes

        scenes = SyntheticScenes(num_images=1, image_size=(375, 500))
        scene = scenes.load(scenes.image_ids()[0]).image
        big = Image.fromarray(scene).resize((4000, 3000), Image.Resampling.BICUBIC)
        noise = np.random.default_rng(1).normal(0, 6, (3000, 4000, 3))
        pixels = np.clip(np.asarray(big, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=92)
    return path


def untrained_run(root: Path) -> str:
    import io

    import torch

    from maskdistill.config import load_config
    from maskdistill.rundir import RunDir
    from maskdistill.segmenter import build_segmenter

    if not (root / "segmenter" / "model.pt").exists():
        config = load_config(None, [f"run_dir={root}", "segmenter.init=none"])
        run = RunDir(str(root))
        run.write_config(config)
        model = build_segmenter(num_classes=21, backbone="resnet50", init="none")
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "num_classes": 21}, buffer)
        run.write_bytes(buffer.getvalue(), "segmenter", "model.pt")
    return str(root)


def measure(run_dir: str, image: Path, max_side: int, threads: int) -> dict[str, float]:
    """One setting, in this process: seconds per step and memory in MB."""
    import torch

    from maskdistill.inference import Segmenter

    # run as a file, this folder leads sys.path and benchmarks/serve.py hides the `serve` package
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    codec = importlib.import_module("serve.codec")
    if threads:
        torch.set_num_threads(threads)
    segmenter = Segmenter.load(run_dir, max_side=max_side or None)
    segmenter.segment([np.zeros((64, 64, 3), dtype=np.uint8)])  # first-call set-up
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data = image.read_bytes()
    start = time.perf_counter()
    pixels = codec.read_image(data, max_pixels=40_000_000)
    decoded = time.perf_counter()
    (labels,) = segmenter.segment([pixels])
    segmented = time.perf_counter()
    codec.label_png(labels, num_classes=segmenter.num_classes)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "max_side": max_side,
        "decode_s": decoded - start,
        "segment_s": segmented - decoded,
        "png_s": done - segmented,
        "total_s": done - start,
        "peak_rss_mb": peak,
        "request_mb": peak - baseline,
    }


def main() -> None:
    args = parse()
    image = Path(args.image) if args.image else photo(CACHE / "photo_4000x3000.jpg")
    run_dir = args.run_dir or untrained_run(CACHE / "run_resnet50")
    if args.one is not None:
        print(json.dumps(measure(run_dir, image, args.one, args.threads)))
        return
    with Image.open(image) as picture:
        print(f"{image}: {picture.width} x {picture.height}, {image.stat().st_size / 1e6:.1f} MB")
    print("| max_side | decode s | segment s | png s | total s | peak rss MB | request MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side in (int(s) for s in args.max_sides.split(",")):
        command = [sys.executable, __file__, "--one", str(side), "--threads", str(args.threads)]
        command += ["--image", str(image), "--run-dir", run_dir]
        row = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
        print(
            f"| {side or 'full'} | {row['decode_s']:.2f} | {row['segment_s']:.2f} | "
            f"{row['png_s']:.2f} | {row['total_s']:.2f} | {row['peak_rss_mb']:.0f} | "
            f"{row['request_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
