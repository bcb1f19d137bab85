"""benchmarks/scale.py: its data layout, its measuring of processes, the fits and the projection."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.data.voc import PascalVOC

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # scale imports its sibling pipeline_time
_spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
assert _spec is not None and _spec.loader is not None
scale = importlib.util.module_from_spec(_spec)
sys.modules["scale"] = scale  # dataclasses look their module up there
_spec.loader.exec_module(scale)
Measure = scale.Measure
MB = 2**20


def test_scenes_are_a_voc_folder_whose_files_serve_every_smaller_count(tmp_path: Path) -> None:
    root = scale.scenes(16, cache=tmp_path)
    train, val = PascalVOC(str(root), split="train"), PascalVOC(str(root), split="val")
    assert train.image_ids() == [f"train_{i:06d}" for i in range(16)]
    assert val.image_ids() == ["val_000000", "val_000001"]  # 16 // 8
    sample = val.load("val_000001")
    truth = SyntheticScenes(split="val", num_images=2, image_size=(64, 64)).load("val_000001")
    assert sample.image.shape == (64, 64, 3)
    np.testing.assert_array_equal(sample.semantic, truth.semantic)  # PNG: lossless
    assert sample.instance_classes is not None and truth.instance_classes is not None
    # instances come back by their index; classes from the class map under each
    assert sorted(sample.instance_classes) == sorted(truth.instance_classes)
    first = tmp_path / "voc64-s0" / "JPEGImages" / "train_000000.jpg"
    made = first.stat().st_mtime_ns
    bigger = scale.scenes(24, cache=tmp_path)
    assert len(PascalVOC(str(bigger), split="train").image_ids()) == 24
    assert first.stat().st_mtime_ns == made  # rendered once, shared
    assert len(list((tmp_path / "voc64-s0" / "JPEGImages").iterdir())) == 24 + 3
    with pytest.raises(ValueError, match="count=4"):
        scale.scenes(4, cache=tmp_path)


def test_descendants_walk_the_whole_tree_below_the_roots() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 30: 2, 31: 30}
    assert scale.descendants([10], parents) == {11, 12}
    assert scale.descendants([1], parents) == {10, 11, 12, 20}
    assert scale.descendants([2, 20], parents) == {30, 31}


def test_clear_refs_resets_a_process_peak_rss() -> None:
    before = scale.vm_hwm(os.getpid())
    block = np.ones(200 * MB, dtype=np.uint8)  # touched: resident
    peak = scale.vm_hwm(os.getpid())
    del block
    assert before is not None and peak is not None and peak >= 200 * MB
    Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    assert scale.vm_hwm(os.getpid()) < peak - 150 * MB
    assert scale.vm_hwm(2**22 + 1) is None  # above the default pid_max: no such process


def test_worker_peaks_find_the_largest_ray_titled_child() -> None:
    grow = "import numpy, time; b = numpy.ones(120 * 2**20, dtype='u1'); time.sleep(1.5)"
    small = "import time; time.sleep(1.5)"
    children = [
        subprocess.Popen([title, "-c", code], executable=sys.executable)  # argv[0]: the title
        for title, code in (("ray::Big", grow), ("ray::Small", small), ("python", grow + "0"))
    ]
    try:
        with scale.WorkerPeaks([os.getpid()]) as peaks:
            time.sleep(1.0)
        assert peaks.title == "ray::Big"  # the third is as big but no Ray worker
        assert 120 * MB <= peaks.peak < 300 * MB
    finally:
        for child in children:
            child.wait()


def test_run_driver_returns_the_child_peak_and_names_a_failure(tmp_path: Path) -> None:
    # ru_maxrss also counts the forked copy of this process before exec: go above it
    size = (scale.vm_hwm(os.getpid()) or 0) + 150 * MB
    code = f"import numpy; b = numpy.ones({size}, dtype='u1'); print('done')"
    log = tmp_path / "ok.log"
    peak = scale.run_driver([sys.executable, "-c", code], env=os.environ, cwd=tmp_path, log=log)
    assert size <= peak < size + 150 * MB
    assert log.read_text() == "done\n"
    bad = [sys.executable, "-c", "import sys; print('the cause'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"exited 3:\nthe cause"):
        scale.run_driver(bad, env=os.environ, cwd=tmp_path, log=tmp_path / "bad.log")


def test_folder_size_counts_bytes_and_parquet_parts(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-00000.parquet").write_bytes(b"x" * 100)
    (tmp_path / "train" / "part-00001.parquet").write_bytes(b"x" * 50)
    (tmp_path / "manifest.json").write_bytes(b"x" * 7)
    (tmp_path / "link").symlink_to(tmp_path / "manifest.json")  # not counted twice
    assert scale.folder_size(tmp_path) == (157, 2)


def _row(stage: str, n: int, seconds: float, driver: float, worker: float) -> object:
    own = seconds / 2
    return Measure(stage, n, seconds, own, int(driver), int(worker), "ray::W", 10 * n, n // 1000)


def test_slopes_growths_and_targets() -> None:
    assert scale.log_slope([1000, 16000], [10.0, 160.0]) == pytest.approx(1.0)
    # 32x the time for 16x the images: log 32 / log 16 = 5/4
    assert scale.log_slope([1000, 4000, 16000], [10.0, 99.0, 320.0]) == pytest.approx(1.25)
    # 15 MB more over 15000 more images: 1048.576 bytes per image
    assert scale.per_image([1000, 16000], [100 * MB, 115 * MB]) == pytest.approx(1048.576)
    with pytest.raises(ValueError, match="two different sizes"):
        scale.log_slope([1000], [1.0])
    rows = [
        _row("mine", 16000, 160.0, 1000 * MB, 500 * MB),  # out of order: fit sorts by N
        _row("mine", 1000, 10.0, 1000 * MB, 500 * MB),
        _row("cluster", 1000, 10.0, 1000 * MB, 100 * MB),
        _row("cluster", 16000, 320.0, 1010 * MB, 400 * MB),
    ]
    mine, cluster = scale.fit(rows)
    assert (mine.stage, mine.sizes, mine.time_slope) == ("mine", [1000, 16000], 1.0)
    assert mine.checks == {"time": True, "driver": True, "worker": True}
    assert mine.written_per_image == 10.0 and mine.parts == 16
    assert cluster.driver_per_image == pytest.approx(10 * MB / 15000)  # 699 B: under 1 KB
    # slope 1.25 misses; its worker's 20 KB/image is exempt (the K-means sample)
    assert cluster.checks == {"time": False, "driver": True, "worker": True}
    table = scale.markdown(rows, [mine, cluster]).splitlines()
    assert len(table) == 2 + 2
    assert table[2].startswith(
        "| mine | 10.0 (1000/500) | 160.0 (1000/500) | 1.00 (1.00) | 0 | 0 |"
    )
    assert table[3].endswith("| missed: time |")


def test_slope_factor_penalises_only_growth_beyond_linear() -> None:
    # 1.28M / 16000 = 80 times the images; slope 1.25 -> 80 ** 0.25 = 2.99 times linear
    assert scale.slope_factor(1.25, target=1_280_000, measured=16000) == pytest.approx(2.9907, 1e-4)
    assert scale.slope_factor(0.8, target=1_280_000, measured=16000) == 1.0


def test_projection_from_the_rates_and_the_slopes() -> None:
    stages = ("data", "mine", "cluster", "detector", "distill", "segmenter", "evaluate")
    fits = [
        scale.Fit(s, [1000, 16000], [1.0, 16.0], 1.0, 1.0, 0.0, 0.0, 0.0, 16)
        for s in stages
        if s not in ("segmenter", "data")
    ]
    # data: a slope under 1 is start-up cost; it grows linearly past the largest N
    fits.append(scale.Fit("data", [1000, 16000], [8.0, 16.0], 0.25, 0.25, 0.0, 0.0, 0.0, 2))
    fits.append(scale.Fit("segmenter", [1000, 16000], [1.0, 32.0], 1.25, 1.25, 0.0, 0.0, 0.0, 16))
    projected = scale.projection(fits, gpus=[8, 64], startup_s=0.0)
    hours = {p.stage: p for p in projected}
    assert list(hours) == list(stages)
    # segmenter: 45 epochs x (1280000 // 16 = 80000 it) x 16 = 57.6M images at the anchor's
    # 128 img/s (DeepLab-v3 bf16), times 80 ** 0.25 for its slope 1.25
    seconds = 45 * 80000 * 16 / 128 * 80**0.25
    assert hours["segmenter"].gpu_hours == pytest.approx(seconds / 3600)
    assert hours["segmenter"].hours[64] == pytest.approx(seconds / 64 / 3600)
    # detector: ceil(24000 x 1280000 / 10582) = 2903043 it x 16 at 46 img/s (bf16 anchor)
    assert math.ceil(24000 * 1_280_000 / 10582) == 2903043
    assert hours["detector"].hours[8] == pytest.approx(2903043 * 16 / 46 / 8 / 3600)
    # mine: train + val at 1185 img/s; evaluate: val, and the probe on train, at 267 img/s
    assert hours["mine"].hours[8] == pytest.approx(1_330_000 / 1185 / 8 / 3600)
    assert hours["evaluate"].hours[8] == pytest.approx(1_330_000 / 267 / 8 / 3600)
    # cluster, a CPU stage: 16 s at 16000 images, linear: 1280 s on any number of GPUs
    assert hours["cluster"].hours == {8: pytest.approx(1280 / 3600), 64: pytest.approx(1280 / 3600)}
    assert hours["data"].hours[8] == pytest.approx(1280 / 3600)
    table = scale.projection_table(projected, gpus=[8, 64], dollars=2.0).splitlines()
    total = sum(p.hours[8] for p in projected)
    assert table[-2].startswith(f"| total | | {total:.1f} |")
    assert table[-1].startswith(f"| cost at $2.00/GPU-hour | | ${total * 8 * 2:,.0f} |")


def test_overrides_are_a_valid_config_of_every_stage_but_pretrain_and_refine(
    tmp_path: Path,
) -> None:
    from maskdistill.config import load_config
    from maskdistill.stages import needed

    config = load_config(str(REPO / "configs" / "demo.yaml"), scale.overrides(tmp_path, tmp_path))
    assert (config.data.kind, config.data.root, config.run_dir) == (
        "voc",
        str(tmp_path),
        str(tmp_path),
    )
    assert (config.detector.max_iters, config.segmenter.epochs, config.self_training.rounds) == (
        10,
        1,
        0,
    )
    stages = ["data", "mine", "cluster", "detector", "distill", "segmenter", "evaluate"]
    assert needed(config) == stages
