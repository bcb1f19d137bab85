"""Every stage at growing sizes (issue 18): does each stage's cost grow linearly in the images?

    python benchmarks/scale.py                              # N = 1000 4000 16000 train images
    python benchmarks/scale.py --sizes 1000 4000 --out /tmp/scale
    python benchmarks/scale.py --repo /tmp/scale-before     # another tree's stages (a baseline)
    python benchmarks/scale.py --project /tmp/scale/scale.json   # README: 1.28M on 8, 64 GPUs

Data: N train and N // 8 val synthetic scenes (6 classes), 64x64 JPEGs (quality 90) with label
and instance PNGs in the VOC2012 layout (`data.kind: voc`, splits train and val), rendered once
under `$MASKDISTILL_CACHE/scale` (default ~/.cache/maskdistill/scale): the images of the largest
N serve every smaller one (its ImageSets lists name their prefixes).
Run: for each N a Ray head of its own (cluster/local_cluster.py: 2 CPUs, token auth), and each
stage of the pipeline (refine off) a driver process of its own, `python -m jobs.pipeline --only
STAGE` with `--repo`'s code (cwd and PYTHONPATH, head included). The models are tiny (test_vit,
Mask R-CNN R18-FPN at 64 px keeping 3 detections, DeepLab R18 frozen but its head, output
stride 16, 32 px crops); the detector trains a fixed 10 iterations; the segmenter one epoch
(N // 8 iterations of 8 crops: its iterations are epochs x images // batch, so the fewest is
one pass, as mine, distill and evaluate make one), the linear probe one epoch on the first
1000 train images (`evaluation.probe_max_images`: the probe caches its images' features, so on
every image its memory is the split's; the baseline of 73d2e61 ran it on every image).
Shard sizes keep their defaults (1000 images).
Per stage and N: wall time of its driver process (imports and Ray connect included, ~10 s),
peak RSS of the driver (wait4's ru_maxrss) and of the largest Ray worker (VmHWM of the head's
`ray::` processes polled every 0.2 s, reset through /proc/PID/clear_refs before each stage),
bytes written under run_dir/STAGE and its Parquet parts. From the first to the last N: the
log-log slope of time, driver and worker RSS growth in bytes per added image, and the issue's
targets: slope <= 1.1, driver < 1 KB/image, worker flat (< 1 KB/image; cluster exempt, its
K-means sample is bounded by clustering.fit_samples). Writes OUT/scale.json, OUT/scale.png
(log10 seconds and MB against log10 N, one panel per stage and measure) and prints one table.
`--project JSON` instead prints the README's projection (`projection`): see its docstring.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
SIDE = 64  # pixels of every scene, square
VAL_EVERY = 8  # val images: N // 8
QUALITY = 90
SEED = 0
TIME_SLOPE = 1.1  # issue 18's targets
DRIVER_BYTES = 1024  # per image
WORKER_BYTES = 1024  # per image: "flat" (15 MB from 1k to 16k)
FLAT_EXEMPT = ("cluster",)  # its worker holds the K-means sample (clustering.fit_samples)
POLL_S = 0.2
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's own per node, not workers


def cache_root() -> Path:
    base = os.environ.get("MASKDISTILL_CACHE", str(Path.home() / ".cache" / "maskdistill"))
    return Path(base) / "scale"


def image_ids(split: str, count: int) -> list[str]:
    """The ids SyntheticScenes gives a split: `<split>_000000`, ..."""
    return [f"{split}_{i:06d}" for i in range(count)]


def scenes(count: int, *, seed: int = SEED, cache: Path | None = None, jobs: int = 1) -> Path:
    """data.root of `count` train and `count // VAL_EVERY` val scenes in the VOC2012 layout.

    The files live once in `<cache>/voc64-s<seed>` (missing ones rendered by `jobs`
    processes); `<cache>/voc64-s<seed>-n<count>` (a VOC2012 folder) links to them and lists
    its ids."""
    if count < VAL_EVERY:
        raise ValueError(f"count={count}: expected >= {VAL_EVERY} (val is count // {VAL_EVERY})")
    cache = cache_root() if cache is None else Path(cache)
    files = cache / f"voc{SIDE}-s{seed}"
    splits = {"train": image_ids("train", count), "val": image_ids("val", count // VAL_EVERY)}
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        (files / folder).mkdir(parents=True, exist_ok=True)
    todo = [
        (files, seed, split, int(i.rsplit("_", 1)[1]))
        for split, ids in splits.items()
        for i in ids
        if not (files / "SegmentationObject" / f"{i}.png").exists()  # written last
    ]
    if todo:
        with Pool(max(1, min(jobs, len(todo)))) as pool:
            pool.map(_render, todo, chunksize=64)
    root = cache / f"voc{SIDE}-s{seed}-n{count}"
    if not (root / "ImageSets" / "Segmentation" / "val.txt").exists():
        work = Path(tempfile.mkdtemp(prefix=".making-", dir=cache))
        voc = work  # VOC2012's own folder (PascalVOC takes it as data.root)
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
        for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
            (voc / folder).symlink_to(files / folder)
        for split, ids in splits.items():
            (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        try:
            work.rename(root)  # atomic: a concurrent maker's folder wins
        except OSError:
            shutil.rmtree(work)
    return root


def _render(job: tuple[Path, int, str, int]) -> None:
    """Scene `index` of `split`: JPEG, class PNG (0..6) and instance PNG (1..M), the last last."""
    from maskdistill.data.synthetic import SyntheticScenes

    files, seed, split, index = job
    sample = SyntheticScenes(
        split=split, num_images=index + 1, image_size=(SIDE, SIDE), seed=seed
    ).load(f"{split}_{index:06d}")
    assert sample.semantic is not None and sample.instance_masks is not None
    objects = np.zeros((SIDE, SIDE), dtype=np.uint8)
    for number, mask in enumerate(sample.instance_masks, start=1):
        objects[mask] = number
    image_id = sample.image_id
    for folder, name, picture in (
        ("JPEGImages", f"{image_id}.jpg", Image.fromarray(sample.image)),
        ("SegmentationClass", f"{image_id}.png", Image.fromarray(sample.semantic, mode="L")),
        ("SegmentationObject", f"{image_id}.png", Image.fromarray(objects, mode="L")),
    ):
        part = files / folder / f".{name}.part"
        picture.save(part, format="JPEG" if name.endswith(".jpg") else "PNG", quality=QUALITY)
        os.replace(part, files / folder / name)


def overrides(root: Path, run_dir: Path) -> list[str]:
    """configs/demo.yaml's keys that make the run tiny and point it at `root` (see the doc)."""
    tiny_schedule = "{base_lr: 0.004, reference_batch: %d, warmup_iters: 2, milestones: [%d]}"
    return [
        f"run_dir={run_dir}",
        "data.kind=voc",
        f"data.root={root}",
        "data.train_split=train",
        "data.val_split=val",
        "backbone.arch=test_vit",
        f"mining.short_side={SIDE}",
        "mining.resources.batch_size=16",
        "mining.resources.num_cpus=1",
        "clustering.num_clusters=6",
        "clustering.view_size=32",
        "clustering.n_init=2",
        "detector.arch=maskrcnn_resnet18_fpn",
        "detector.init=none",
        f"detector.train_short_side=[{SIDE}, {SIDE}]",
        f"detector.test_short_side={SIDE}",
        f"detector.max_size={SIDE}",
        "detector.proposals_per_image=50",
        "detector.test_proposals_per_image=20",
        "detector.roi_batch_size=32",
        "detector.detections_per_image=3",  # the mask head's cost: distill 0.1 -> 0.04 s/img
        "detector.batch_size=2",
        "detector.max_iters=10",
        "detector.checkpoint_every=10",
        "detector.schedule=" + tiny_schedule % (2, 8),
        "detector.resources.num_workers=1",
        "detector.resources.cpus_per_worker=1",
        "detector.resources.loader_workers=0",
        "detector.resources.use_gpu=false",
        "pseudo_labels.tau=0.5",
        "pseudo_labels.resources.num_gpus=0",
        "pseudo_labels.resources.num_cpus=1",
        "pseudo_labels.resources.batch_size=16",
        "segmenter.backbone=resnet18",
        "segmenter.init=none",
        "segmenter.crop_size=32",
        "segmenter.output_stride=16",
        "segmenter.frozen_stages=5",  # the ResNet frozen, only the head trains: 1 pass is cheap
        "segmenter.batch_size=8",
        "segmenter.epochs=1",
        "segmenter.schedule={base_lr: 0.004, reference_batch: 8, milestones: [1]}",
        "segmenter.resources.num_workers=1",
        "segmenter.resources.cpus_per_worker=1",
        "segmenter.resources.loader_workers=0",
        "segmenter.resources.use_gpu=false",
        "evaluation.resources.num_gpus=0",
        "evaluation.resources.num_cpus=1",
        "evaluation.resources.batch_size=16",
        "evaluation.resources.loader_workers=0",
        "evaluation.linear_probe=true",
        "evaluation.probe_epochs=1",
        "evaluation.probe_max_images=1000",  # its feature cache: a fixed sample, as at scale
        "evaluation.probe_milestones=[1]",
        "evaluation.crf=false",
        "evaluation.num_overlays=2",
        "self_training.rounds=0",
    ]


# ---------------------------------------------------------------- measuring


def vm_hwm(pid: int) -> int | None:
    """Peak resident bytes of process `pid` (VmHWM), None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        parents[int(entry)] = int(text[text.rindex(")") + 2 :].split()[1])
    return parents


def descendants(roots: Sequence[int], parents: Mapping[int, int]) -> set[int]:
    """Every process below `roots` in the `parents` (pid -> parent pid) tree."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class WorkerPeaks:
    """The largest VmHWM among the Ray workers (`ray::` processes) below `roots`, polled."""

    def __init__(self, roots: Sequence[int]) -> None:
        self.roots = list(roots)
        self.peak, self.title = 0, ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def workers(self) -> list[int]:
        below = descendants(self.roots, _parents())
        return [p for p in below if _title(p).startswith("ray::") and _title(p) not in AGENTS]

    def poll(self) -> None:
        for pid in self.workers():
            title = _title(pid)  # read before the peak: a worker's title follows its task
            peak = vm_hwm(pid)
            if peak is not None and peak > self.peak:
                self.peak, self.title = peak, title

    def __enter__(self) -> WorkerPeaks:
        for pid in self.workers():  # idle workers of the last stage keep their peak otherwise
            with suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.peak, self.title = 0, ""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


@dataclass(frozen=True)
class Measure:
    stage: str
    images: int  # N, train images
    seconds: float  # the driver process's wall time
    stage_seconds: float  # the stage's own, from its manifest (no imports, no Ray connect)
    driver_bytes: int
    worker_bytes: int
    worker: str  # the title of the largest worker at its peak
    written_bytes: int
    parts: int


def folder_size(path: Path) -> tuple[int, int]:
    """Bytes of the files under `path` and how many of them are Parquet parts."""
    total = parts = 0
    for folder, _, names in os.walk(path):
        for name in names:
            file = Path(folder, name)
            if not file.is_symlink():
                total += file.stat().st_size
            parts += name.endswith(".parquet")
    return total, parts


def run_driver(command: list[str], *, env: Mapping[str, str], cwd: Path, log: Path) -> int:
    """Run `command`, output to `log`; its peak RSS in bytes (wait4's ru_maxrss, KiB on Linux;
    at least this process's RSS at the fork, small here). A failure raises with the log's tail."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=dict(env), cwd=cwd, stdout=out, stderr=out)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # interrupted: the driver goes too
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command[:6])}... exited {process.returncode}:\n{tail}")
    return usage.ru_maxrss * 1024


def _local_cluster() -> Any:
    spec = importlib.util.spec_from_file_location(
        "local_cluster", REPO / "cluster/local_cluster.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@contextmanager
def ray_head(root: Path, *, code: Path) -> Iterator[tuple[dict[str, str], list[int]]]:
    """A 2-CPU Ray head of its own whose workers import `code`: (client env, node pids)."""
    local = _local_cluster()
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code)  # the head's workers import `code`'s maskdistill
    try:
        cluster = local.up(root=root, workers=0, head_cpus=2)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= cluster.client_env() | {"RAY_ADDRESS": cluster.gcs_address, "PYTHONPATH": str(code)}
    try:
        yield env, cluster.pids
    finally:
        local.down(root=root)


def stages_of(root: Path, code: Path) -> list[str]:
    """The stages `jobs.pipeline` runs for the scale config (refine and pretrain off)."""
    probe = (
        "import sys; from maskdistill.config import load_config; "
        "from maskdistill.stages import needed; "
        "print(' '.join(needed(load_config('configs/demo.yaml', sys.argv[1:]))))"
    )
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, "-c", probe, *overrides(root, Path("/nonexistent"))]
    return subprocess.run(
        command, env=env, cwd=code, capture_output=True, text=True, check=True
    ).stdout.split()


def measure_size(count: int, *, out: Path, code: Path, jobs: int) -> list[Measure]:
    """Every stage on `count` train images, each its own driver, on a fresh Ray head."""
    root = scenes(count, jobs=jobs)
    run_dir = out / f"run-n{count}"
    shutil.rmtree(run_dir, ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    args = [a for o in overrides(root, run_dir) for a in ("--set", o)]
    rows = []
    head = Path(tempfile.mkdtemp(prefix="scale", dir="/tmp"))  # short: Ray's socket paths
    try:
        with ray_head(head, code=code) as (env, pids):
            for stage in stages_of(root, code):
                command = [sys.executable, "-m", "jobs.pipeline", "--config", "configs/demo.yaml"]
                command += ["--only", stage, *args]
                log = out / "logs" / f"n{count}-{stage}.log"
                begin = time.perf_counter()
                with WorkerPeaks(pids) as workers:
                    driver = run_driver(command, env=env, cwd=code, log=log)
                    workers.poll()
                seconds = time.perf_counter() - begin
                written, parts = folder_size(run_dir / stage)
                manifest = json.loads((run_dir / stage / "manifest.json").read_text())
                own = float(manifest["seconds"])
                row = Measure(
                    stage, count, seconds, own, driver, workers.peak, workers.title, written, parts
                )
                print(
                    f"N={count} {stage:<10} {seconds:7.1f} s ({own:.1f} s in the stage)  "
                    f"driver {driver / 2**20:6.0f} MB  "
                    f"worker {workers.peak / 2**20:6.0f} MB ({workers.title})  "
                    f"{written / 2**20:7.1f} MB in {parts} parts  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                rows.append(row)
    finally:
        shutil.rmtree(head, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- fitting


def log_slope(sizes: Sequence[float], values: Sequence[float]) -> float:
    """The log-log slope from the first to the last point: log(v1/v0) / log(n1/n0)."""
    if len(sizes) < 2 or sizes[-1] == sizes[0]:
        raise ValueError(f"a slope needs two different sizes, got {list(sizes)}")
    return math.log(values[-1] / values[0]) / math.log(sizes[-1] / sizes[0])


def per_image(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Growth from the first to the last point per added image (bytes per image for RSS)."""
    if len(sizes) < 2 or sizes[-1] == sizes[0]:
        raise ValueError(f"a growth needs two different sizes, got {list(sizes)}")
    return (values[-1] - values[0]) / (sizes[-1] - sizes[0])


@dataclass(frozen=True)
class Fit:
    stage: str
    sizes: list[int]
    seconds: list[float]
    time_slope: float  # of the driver process's wall time: the target's
    stage_slope: float  # of the stage's own time: without the ~10 s of imports and connect
    driver_per_image: float  # bytes
    worker_per_image: float  # bytes
    written_per_image: float  # bytes, at the last size
    parts: int  # at the last size

    @property
    def checks(self) -> dict[str, bool]:
        """The issue's targets, each met or not."""
        return {
            "time": self.time_slope <= TIME_SLOPE,
            "driver": self.driver_per_image < DRIVER_BYTES,
            "worker": self.stage in FLAT_EXEMPT or self.worker_per_image < WORKER_BYTES,
        }


def fit(rows: Sequence[Measure]) -> list[Fit]:
    """One fit per stage, over its rows in increasing N, stages in their first-seen order."""
    stages = list(dict.fromkeys(r.stage for r in rows))
    fits = []
    for stage in stages:
        mine = sorted((r for r in rows if r.stage == stage), key=lambda r: r.images)
        sizes = [r.images for r in mine]
        fits.append(
            Fit(
                stage=stage,
                sizes=sizes,
                seconds=[r.seconds for r in mine],
                time_slope=log_slope(sizes, [r.seconds for r in mine]),
                stage_slope=log_slope(sizes, [max(r.stage_seconds, 1e-3) for r in mine]),
                driver_per_image=per_image(sizes, [r.driver_bytes for r in mine]),
                worker_per_image=per_image(sizes, [r.worker_bytes for r in mine]),
                written_per_image=mine[-1].written_bytes / sizes[-1],
                parts=mine[-1].parts,
            )
        )
    return fits


def markdown(rows: Sequence[Measure], fits: Sequence[Fit]) -> str:
    """One table: per stage, each N's seconds (driver MB / worker MB), slope, growths, targets."""
    sizes = sorted({r.images for r in rows})
    cell = {(r.stage, r.images): r for r in rows}
    head = ["stage", *[f"N={n}: s (driver/worker MB)" for n in sizes]]
    head += [
        "time slope (stage's own)",
        "driver B/img",
        "worker B/img",
        "written B/img",
        "parts",
        "targets",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in fits:
        cells = [f.stage]
        for n in sizes:
            r = cell[(f.stage, n)]
            cells.append(
                f"{r.seconds:.1f} ({r.driver_bytes / 2**20:.0f}/{r.worker_bytes / 2**20:.0f})"
            )
        failed = [name for name, ok in f.checks.items() if not ok]
        cells += [
            f"{f.time_slope:.2f} ({f.stage_slope:.2f})",
            f"{f.driver_per_image:.0f}",
            f"{f.worker_per_image:.0f}" + (" (exempt)" if f.stage in FLAT_EXEMPT else ""),
            f"{f.written_per_image:.0f}",
            str(f.parts),
            "met" if not failed else "missed: " + ", ".join(failed),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34))  # fmt: skip


def loglog_panel(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    size: tuple[int, int] = (420, 320),
) -> Image.Image:
    """Every series on log-log axes that span whole decades, with a dotted slope-1 line from
    the lowest first point: a stage parallel to it grows linearly, a steeper one faster."""
    width, height = size
    left, top, right, bottom = 48, 24, 110, 28
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy if y > 0]
    x0, x1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)

    def at(x: float, y: float) -> tuple[float, float]:
        u = (math.log10(x) - x0) / (x1 - x0)
        v = (math.log10(y) - y0) / (y1 - y0)
        return left + u * (width - left - right), height - bottom - v * (height - top - bottom)

    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    draw.text((left, 4), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline=(150, 150, 150))
    for decade in range(y0, y1 + 1):
        y = at(10**x0, 10**decade)[1]
        draw.text((4, y - 6), f"1e{decade}", fill="black")
    for decade in range(x0, x1 + 1):
        x = at(10**decade, 10**y0)[0]
        draw.text((x - 10, height - bottom + 4), f"1e{decade}", fill="black")
    firsts = [(sx[0], sy[0]) for sx, sy in series.values() if sy[0] > 0]
    if firsts:
        fx, fy = min(firsts, key=lambda p: p[1])
        guide = [at(fx, fy), at(10**x1, fy * 10**x1 / fx)]
        draw.line(guide, fill=(200, 200, 200), width=1)
    for k, (name, (sx, sy)) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [at(x, y) for x, y in zip(sx, sy, strict=True) if y > 0]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - right + 8, top + 14 * k), name, fill=colour)
    return picture


def picture(rows: Sequence[Measure], path: Path) -> None:
    """Seconds, driver MB and worker MB against N (log-log), every stage in each panel."""
    measures = (
        ("wall seconds", lambda r: r.seconds),
        ("driver peak MB", lambda r: r.driver_bytes / 2**20),
        ("largest worker peak MB", lambda r: r.worker_bytes / 2**20),
    )
    stages = list(dict.fromkeys(r.stage for r in rows))
    panels = []
    for name, value in measures:
        series = {}
        for stage in stages:
            mine = sorted((r for r in rows if r.stage == stage), key=lambda r: r.images)
            series[stage] = ([r.images for r in mine], [value(r) for r in mine])
        panels.append(np.asarray(loglog_panel(series, title=f"{name} against N images")))
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


# ---------------------------------------------------------------- projection

PROJECT_IMAGES = 1_280_000  # ImageNet-1k train
PROJECT_VAL = 50_000  # ImageNet-1k val
PASCAL_TRAIN = 10_582  # train_aug, what configs/pascal.yaml's detector iterations were set for
DOLLARS_PER_GPU_HOUR = 3.0


def _pipeline_time() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pipeline_time

    return pipeline_time


def slope_factor(slope: float, *, target: int, measured: int) -> float:
    """How much longer than linear a stage of log-log `slope` takes at `target` images than the
    rates (which are linear from `measured`) say: (target / measured) ** (slope - 1), never
    below 1 (a slope under 1 is fixed start-up cost, already counted by the rates' startup)."""
    return max(1.0, (target / measured) ** (slope - 1.0))


@dataclass(frozen=True)
class Projected:
    stage: str
    gpu_hours: float  # at ideal scaling: the same on any number of GPUs (start-up aside)
    hours: dict[int, float]  # GPUs -> wall hours


def projection(
    fits: Sequence[Fit],
    *,
    gpus: Sequence[int],
    images: int = PROJECT_IMAGES,
    val: int = PROJECT_VAL,
    defaults: str = "anchor",
    cores_per_gpu: int = 16,
    startup_s: float | None = None,
) -> list[Projected]:
    """Each stage of configs/pascal.yaml (refine off, one train and one val split) on `images`
    train and `val` val images: pipeline_time's work (segmenter: its epochs; detector: its
    iterations scaled by images / 10582, the same epochs as on PASCAL) over its `defaults`
    rates, times `slope_factor` of this benchmark's measured slope at its largest N. GPUs scale
    ideally; data and cluster (CPU stages, not in pipeline_time) are this machine's time at the
    largest N extrapolated with their slope (at least 1), the same on any number of GPUs."""
    pt = _pipeline_time()
    config = pt.load_config(
        str(REPO / "configs" / "pascal.yaml"),
        ["detector.train_splits=null", "evaluation.mask_ap_split=null", "self_training.rounds=0"],
    )
    iters = math.ceil(config.detector.max_iters * images / PASCAL_TRAIN)
    config = config.model_copy(
        update={"detector": config.detector.model_copy(update={"max_iters": iters})}
    )
    sizes = {config.data.train_split: images, config.data.val_split: val}
    work = pt.recipe_work(config, sizes)
    rates = pt.DEFAULTS[defaults]
    startup = pt.STARTUP_S if startup_s is None else startup_s
    by_stage = {f.stage: f for f in fits}
    out = []
    for stage in dict.fromkeys([*(w.stage for w in work), "data", "cluster"]):
        f = by_stage.get(stage)
        if stage in ("data", "cluster"):
            if f is None:
                continue
            growth = (images / f.sizes[-1]) ** max(1.0, f.time_slope)  # < 1: start-up cost
            hours = f.seconds[-1] * growth / 3600
            out.append(Projected(stage, 0.0, {g: hours for g in gpus}))
            continue
        if f is None:
            raise KeyError(f"no measured slope for stage {stage!r}; measured: {list(by_stage)}")
        factor = slope_factor(f.time_slope, target=images, measured=f.sizes[-1])
        items = [w for w in work if w.stage == stage]
        wall = {}
        for g in gpus:
            rows = pt.project(items, rates, gpus=g, cores=g * cores_per_gpu, startup_s=startup)
            wall[g] = sum(r.seconds for r in rows) * factor / 3600
        one = pt.project(items, rates, gpus=1, cores=cores_per_gpu, startup_s=0.0)
        out.append(Projected(stage, sum(r.seconds for r in one) * factor / 3600, wall))
    order = ["data", "mine", "cluster", "detector", "distill", "segmenter", "evaluate"]
    return sorted(out, key=lambda p: order.index(p.stage) if p.stage in order else len(order))


def projection_table(projected: Sequence[Projected], *, gpus: Sequence[int], dollars: float) -> str:
    """Markdown: hours per stage on each GPU count, total hours and cost (GPUs x hours x $)."""
    head = ["stage", "GPU-hours", *[f"hours on {g} GPUs" for g in gpus]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in projected:
        gpu_hours = f"{p.gpu_hours:.1f}" if p.gpu_hours else "CPU"
        lines.append(
            f"| {p.stage} | {gpu_hours} | " + " | ".join(f"{p.hours[g]:.2f}" for g in gpus) + " |"
        )
    totals = [sum(p.hours[g] for p in projected) for g in gpus]
    lines.append("| total | | " + " | ".join(f"{t:.1f}" for t in totals) + " |")
    cost = [t * g * dollars for t, g in zip(totals, gpus, strict=True)]
    lines.append(
        f"| cost at ${dollars:.2f}/GPU-hour | | " + " | ".join(f"${c:,.0f}" for c in cost) + " |"
    )
    return "\n".join(lines)


def read_rows(path: Path) -> list[Measure]:
    return [Measure(**row) for row in json.loads(path.read_text())["rows"]]


def read_fits(path: Path) -> list[Fit]:
    return fit(read_rows(path))


# ---------------------------------------------------------------- command line


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--out", type=Path, default=Path("runs/scale"), help="runs, logs, results")
    parser.add_argument("--repo", type=Path, default=REPO, help="the tree whose stages run")
    parser.add_argument("--jobs", type=int, default=1, help="processes rendering the scenes")
    parser.add_argument(
        "--add", type=Path, metavar="JSON", help="an earlier scale.json's rows (other sizes)"
    )
    parser.add_argument("--project", type=Path, metavar="JSON", help="print the projection")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--images", type=int, default=PROJECT_IMAGES)
    parser.add_argument("--dollars", type=float, default=DOLLARS_PER_GPU_HOUR, help="$/GPU-hour")
    parser.add_argument(
        "--defaults", choices=("anchor", "stage"), default="anchor", help="pipeline_time's rates"
    )
    args = parser.parse_args(argv)
    if len(set(args.sizes)) < 2 and not args.project and not args.add:
        parser.error(f"--sizes {args.sizes}: need two different sizes (or --add) for a slope")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally`: the Ray head goes down
    if args.project:
        fits = read_fits(args.project)
        projected = projection(fits, gpus=args.gpus, images=args.images, defaults=args.defaults)
        print(projection_table(projected, gpus=args.gpus, dollars=args.dollars))
        return 0
    out, code = args.out.resolve(), args.repo.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [] if args.add is None else read_rows(args.add)
    for count in sorted(args.sizes):
        begin = time.perf_counter()
        rows += measure_size(count, out=out, code=code, jobs=args.jobs)
        print(f"N={count}: {time.perf_counter() - begin:.0f} s in all", flush=True)
    fits = fit(rows)
    result = {
        "repo": str(code),
        "load_average": os.getloadavg(),
        "rows": [asdict(r) for r in rows],
        "fits": [asdict(f) | {"checks": f.checks} for f in fits],
    }
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    picture(rows, out / "scale.png")
    print(markdown(rows, fits))
    print(f"\n{out / 'scale.json'}, {out / 'scale.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
