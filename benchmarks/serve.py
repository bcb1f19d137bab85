"""Latency and throughput of the HTTP service under a bounded concurrent load, on localhost.

    RAY_AUTH_MODE=token python benchmarks/serve.py                       # CPU, tiny, ~1 minute
    RAY_AUTH_MODE=token python benchmarks/serve.py --run-dir runs/demo --requests 256 \\
        --concurrency 16 --size 320x320 --num-gpus 1 --batch-sizes 1,8,16

Starts Ray in-process, serves the run (default: an untrained resnet18 segmenter written to a
temporary run directory) with one replica, and for each `max_batch_size` sends `--requests`
PNG images of `--size` from `--concurrency` client threads, each waiting for its answer before
sending the next (a closed loop). Prints latency p50/p95, throughput and the mean batch the
replica ran (X-Batch-Size). The first `--concurrency` requests warm up and are not counted.
Measured on the 2-core CPU dev machine (shared with other work, so noisy), defaults (96
requests of 64x64, 8 clients, untrained resnet18, one replica with one torch thread), two runs:
max_batch_size 1: p50 576 / 416 ms, p95 841 / 576 ms, 13.4 / 18.1 req/s;
max_batch_size 8: p50 263 / 273 ms, p95 580 / 356 ms, 24.1 / 28.4 req/s, mean batch 4.6 / 3.2.
Batching amortises the per-call overhead even on a CPU. A GPU replica (--num-gpus 1) has not
been measured yet.
"""

import argparse
import importlib
import io
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import requests
import torch
from PIL import Image

from maskdistill.config import load_config
from maskdistill.rundir import RunDir
from maskdistill.segmenter import build_segmenter


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", help="trained run (default: an untrained tiny one)")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="64x64", help="HxW of the request images")
    parser.add_argument("--batch-sizes", default="1,8", help="max_batch_size values to compare")
    parser.add_argument("--wait", type=float, default=0.01, help="batch_wait_timeout_s")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the replica")
    parser.add_argument("--format", default="png", choices=["png", "json", "overlay"])
    parser.add_argument("--port", type=int, default=8765)
    return parser.parse_args()


def untrained_run(root: Path, num_classes: int = 6) -> str:
    """config.yaml and an untrained resnet18 DeepLab-v3 as segmenter/model.pt."""
    overrides = [f"run_dir={root}", "segmenter.backbone=resnet18", "segmenter.init=none"]
    run = RunDir(str(root))
    run.write_config(load_config(None, overrides))
    model = build_segmenter(num_classes=num_classes, backbone="resnet18", init="none")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "num_classes": num_classes}, buffer)
    run.write_bytes(buffer.getvalue(), "segmenter", "model.pt")
    return run.uri


def request_bodies(height: int, width: int, count: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            buffer, format="PNG"
        )
        bodies.append(buffer.getvalue())
    return bodies


def load(
    url: str, bodies: list[bytes], *, total: int, concurrency: int, fmt: str
) -> dict[str, float]:
    """Closed-loop load: `concurrency` clients share `total` requests; latencies in seconds."""
    next_index = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    batches: list[int] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            sent = time.perf_counter()
            response = session.post(
                f"{url}/segment",
                data=bodies[i % len(bodies)],
                headers={"Content-Type": "image/png"},
                params={"format": fmt},
            )
            elapsed = time.perf_counter() - sent
            response.raise_for_status()
            with lock:
                latencies.append(elapsed)
                batches.append(int(response.headers["X-Batch-Size"]))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "p50_ms": 1000 * quantiles[49],
        "p95_ms": 1000 * quantiles[94],
        "throughput": total / wall,
        "mean_batch": statistics.fmean(batches),
    }


def main() -> None:
    args = parse()
    # run as a file, this folder leads sys.path and this file's name hides the `serve` package
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    app = importlib.import_module("serve.app")
    height, width = (int(side) for side in args.size.split("x"))
    bodies = request_bodies(height, width)
    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run_dir or untrained_run(Path(scratch) / "run")
        rows = []
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            settings = {
                "max_batch_size": batch,
                "batch_wait_timeout_s": args.wait,
                "min_replicas": 1,
                "max_replicas": 1,
                "num_gpus": args.num_gpus,
            }
            url = app.start(run_dir, port=args.port, overrides=settings)
            try:
                load(
                    url,
                    bodies,
                    total=args.concurrency,
                    concurrency=args.concurrency,
                    fmt=args.format,
                )
                rows.append(
                    (
                        batch,
                        load(
                            url,
                            bodies,
                            total=args.requests,
                            concurrency=args.concurrency,
                            fmt=args.format,
                        ),
                    )
                )
            finally:
                app.stop()
    print(
        f"\n{args.requests} requests of {height}x{width} PNG, {args.concurrency} concurrent "
        f"clients, format={args.format}, one replica, num_gpus={args.num_gpus}"
    )
    print(f"{'max_batch_size':>14} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'mean batch':>10}")
    for batch, row in rows:
        print(
            f"{batch:>14} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
            f"{row['throughput']:>7.2f} {row['mean_batch']:>10.2f}"
        )


if __name__ == "__main__":
    main()
