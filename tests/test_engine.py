import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskdistill import engine
from maskdistill.config import LRSchedule
from maskdistill.engine import (
    Checkpointer,
    CurveWriter,
    MetricsLog,
    NonFiniteLoss,
    Throughput,
    TrainSpec,
    batch_indices,
    build_scheduler,
    epoch_order,
    lr_factor,
    scaled_lr,
    train,
)

SCHEDULE = LRSchedule(base_lr=0.02, reference_batch=16, warmup_iters=4, milestones=[6, 8])


def test_lr_schedule_golden_values() -> None:
    assert scaled_lr(SCHEDULE, 8) == pytest.approx(0.01)
    assert scaled_lr(SCHEDULE, 64) == pytest.approx(0.08)
    factors = [lr_factor(SCHEDULE, i) for i in range(10)]
    assert factors[0] == pytest.approx(0.001)
    assert factors[2] == pytest.approx(0.001 * 0.5 + 0.5)
    assert factors[4:6] == [1.0, 1.0]
    assert factors[6:8] == pytest.approx([0.1, 0.1])
    assert factors[8:] == pytest.approx([0.01, 0.01])


def test_batch_indices_split_each_epoch_across_ranks() -> None:
    per_rank = [
        [
            batch_indices(it, rank=r, world_size=2, batch_size=3, num_samples=12, seed=0)
            for it in (0, 1)
        ]
        for r in (0, 1)
    ]
    epoch = sorted(i for rank in per_rank for batch in rank for i in batch)
    assert epoch == list(range(12)), "one epoch visits every sample once across ranks"
    again = batch_indices(1, rank=1, world_size=2, batch_size=3, num_samples=12, seed=0)
    assert again == per_rank[1][1], "a pure function of the iteration"
    next_epoch = batch_indices(2, rank=0, world_size=2, batch_size=3, num_samples=12, seed=0)
    assert next_epoch != per_rank[0][0]


def test_a_window_as_large_as_the_data_is_the_one_permutation() -> None:
    whole = np.random.default_rng((3, 1)).permutation(10).tolist()
    for window in (0, 10, 64):
        order = [epoch_order(k, num_samples=10, seed=3, epoch=1, window=window) for k in range(10)]
        assert order == whole


@pytest.mark.parametrize(("num_samples", "window"), [(10, 3), (12, 4), (1000, 64), (65, 64)])
def test_windowed_epochs_visit_every_sample_once_a_window_at_a_time(
    num_samples: int, window: int
) -> None:
    order = [
        epoch_order(k, num_samples=num_samples, seed=0, epoch=2, window=window)
        for k in range(num_samples)
    ]
    assert sorted(order) == list(range(num_samples))
    # the places run through whole windows: consecutive places share a window until it is spent
    windows = [i // window for i in order]
    runs = [w for i, w in enumerate(windows) if i == 0 or w != windows[i - 1]]
    assert sorted(runs) == list(range(-(-num_samples // window))), "each window visited once"
    other = [
        epoch_order(k, num_samples=num_samples, seed=0, epoch=3, window=window)
        for k in range(num_samples)
    ]
    assert other != order, "each epoch its own order"


def test_batch_indices_with_a_window_split_each_epoch_across_ranks() -> None:
    options = {"world_size": 2, "batch_size": 3, "num_samples": 12, "seed": 0, "window": 4}
    epoch = sorted(i for it in (0, 1) for r in (0, 1) for i in batch_indices(it, rank=r, **options))
    assert epoch == list(range(12))


class _Boom(RuntimeError):
    pass


class _FailOnce:
    """Raises once at `iteration`, remembering in a file that it did (survives a restart)."""

    def __init__(self, iteration: int, marker: Path) -> None:
        self.iteration, self.marker = iteration, marker

    def __call__(self, iteration: int) -> None:
        if iteration == self.iteration and not self.marker.exists():
            self.marker.write_text("failed once")
            raise _Boom(f"injected failure at iteration {iteration}")


def _run(
    folder: Path,
    hooks: tuple = (),
    max_iters: int = 10,
    *,
    checkpoint_every: int = 2,
    log: MetricsLog | None = None,
    **spec_fields: Any,
) -> tuple[torch.nn.Module, list]:
    """Train a linear model on 20 samples, 4 a batch; `spec_fields` go to the TrainSpec."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    target = data @ torch.tensor([[1.0], [-2.0], [0.5]])
    optimizer = torch.optim.SGD(model.parameters(), lr=scaled_lr(SCHEDULE, 4), momentum=0.9)
    scheduler = build_scheduler(optimizer, SCHEDULE)

    def batch_at(iteration: int) -> list[int]:
        noise = torch.rand(())  # consumes the global RNG: its state must come back on resume
        indices = batch_indices(
            iteration, rank=0, world_size=1, batch_size=4, num_samples=20, seed=0
        )
        return [i for i in indices if noise >= 0]

    def losses(m: torch.nn.Module, batch: list[int]) -> dict[str, torch.Tensor]:
        return {"mse": ((m(data[batch]) - target[batch]) ** 2).mean()}

    spec = TrainSpec(
        max_iters=max_iters,
        checkpoint_every=checkpoint_every,
        checkpoints=Checkpointer(str(folder / "checkpoints")),
        log=log or MetricsLog(str(folder / "log.jsonl")),
        batch_at=batch_at,
        losses=losses,
        hooks=hooks,
        **spec_fields,
    )
    train(model, optimizer, scheduler, spec)
    return model, spec.log.read() if spec.log else []


def test_killed_run_resumes_at_the_same_iteration_and_lr(tmp_path: Path) -> None:
    straight, straight_log = _run(tmp_path / "straight")
    hook = _FailOnce(5, tmp_path / "marker")
    with pytest.raises(_Boom):
        _run(tmp_path / "killed", hooks=(hook,))
    assert (
        Checkpointer(str(tmp_path / "killed" / "checkpoints")).latest().endswith("iter_00000004.pt")
    )
    resumed, resumed_log = _run(tmp_path / "killed", hooks=(hook,))
    steps = [r for r in resumed_log if "event" not in r]
    assert [r["iteration"] for r in steps] == list(range(10)), "no iteration lost or repeated"
    event = next(r for r in resumed_log if r.get("event") == "resumed")
    assert event["iteration"] == 4
    straight_steps = [r for r in straight_log if "event" not in r]
    assert [r["lr"] for r in steps] == pytest.approx([r["lr"] for r in straight_steps])
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in straight_steps])
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_run_resumed_at_its_last_checkpoint_logs_the_resume_and_trains_no_step(
    tmp_path: Path,
) -> None:
    _run(tmp_path)  # finished: the last checkpoint is iteration 10, like a kill before the manifest
    before = MetricsLog(str(tmp_path / "log.jsonl")).read()
    _, log = _run(tmp_path)
    assert [r for r in log if "event" not in r] == [r for r in before if "event" not in r]
    assert log[-1]["event"] == "resumed" and log[-1]["iteration"] == 10


def test_only_the_last_checkpoints_are_kept(tmp_path: Path) -> None:
    _run(tmp_path)
    assert Checkpointer(str(tmp_path / "checkpoints")).names() == [
        "iter_00000008.pt",
        "iter_00000010.pt",
    ]


def test_a_finished_run_does_nothing_more(tmp_path: Path) -> None:
    first, _ = _run(tmp_path)
    again, log = _run(tmp_path)
    assert len([r for r in log if "event" not in r]) == 10
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_non_finite_loss_stops_with_the_iteration(tmp_path: Path) -> None:
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = TrainSpec(
        max_iters=5,
        checkpoint_every=5,
        checkpoints=Checkpointer(str(tmp_path)),
        log=None,
        batch_at=lambda it: it,
        losses=lambda m, it: {"bad": m(torch.ones(1)).sum() * (float("nan") if it == 3 else 1.0)},
    )
    with pytest.raises(NonFiniteLoss, match="iteration 3.*'bad': nan"):
        train(model, optimizer, build_scheduler(optimizer, SCHEDULE), spec)


def _steps(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if "event" not in r]


def test_reports_come_every_log_every_iterations_with_losses_lr_and_speed(tmp_path: Path) -> None:
    reports: list[dict[str, float]] = []
    _, log = _run(tmp_path, log_every=3, images_per_iter=4, report=reports.append)
    assert [r["iteration"] for r in reports] == [2, 5, 8]
    logged = {r["iteration"]: r for r in log}
    for report in reports:
        it = int(report["iteration"])
        assert set(report) == {"iteration", "mse", "loss", "lr", "images_per_s"}
        assert report["lr"] == pytest.approx(scaled_lr(SCHEDULE, 4) * lr_factor(SCHEDULE, it))
        assert report["lr"] == logged[it]["lr"]
        assert report["mse"] == report["loss"] == logged[it]["mse"]
        assert 0 < report["images_per_s"] < math.inf


def test_a_resumed_run_reports_at_the_same_iterations(tmp_path: Path) -> None:
    reports: list[dict[str, float]] = []
    hook = _FailOnce(5, tmp_path / "marker")
    fields: dict[str, Any] = {"log_every": 3, "images_per_iter": 4, "report": reports.append}
    with pytest.raises(_Boom):
        _run(tmp_path, (hook,), **fields)
    _run(tmp_path, (hook,), **fields)
    assert [r["iteration"] for r in reports] == [2, 5, 8], "resumed at 4: 5 and 8 follow"


def test_throughput_counts_global_images_since_the_last_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([10.0, 12.0, 13.0])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    throughput = Throughput(4, images_per_iter=8)  # resumed at 4: counts from there
    assert throughput(6) == pytest.approx(2 * 8 / 2.0)
    assert throughput(9) == pytest.approx(3 * 8 / 1.0)


def _part_files(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Name -> (bytes, mtime, inode) of each part: a rewritten part changes all three."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(folder.iterdir())
    }


def _parts_log(tmp_path: Path, *chunks: range) -> MetricsLog:
    log = MetricsLog(str(tmp_path / "log.jsonl"), parts=True)
    for chunk in chunks:
        for it in chunk:
            log.add({"iteration": it, "loss": float(it)})
        log.flush()
    return log


def test_the_log_is_one_file_locally_and_parts_on_object_stores(tmp_path: Path) -> None:
    assert MetricsLog("s3://bucket/run/detector/log.jsonl").parts
    assert MetricsLog("gs://bucket/run/detector/log.jsonl").parts
    assert not MetricsLog(str(tmp_path / "log.jsonl")).parts
    assert not MetricsLog(f"file://{tmp_path}/log.jsonl").parts
    local = MetricsLog(str(tmp_path / "log.jsonl"))
    for it in range(3):
        local.add({"iteration": it})
        local.flush()
    assert [r["iteration"] for r in local.read()] == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"], "appended, no parts"


def test_each_flush_is_a_new_part_and_earlier_parts_are_never_rewritten(tmp_path: Path) -> None:
    log = _parts_log(tmp_path, range(0, 3))
    parts = tmp_path / "log.jsonl.parts"
    first = _part_files(parts)
    assert [name[:8] for name in first] == ["00000000"]
    log.add({"iteration": 3, "loss": 3.0})
    log.flush()
    log.flush()  # nothing pending: no part
    second = _part_files(parts)
    assert [name[:8] for name in second] == ["00000000", "00000003"]
    name = next(iter(first))
    assert second[name] == first[name], "the first part is untouched"
    assert not (tmp_path / "log.jsonl").exists()
    assert [r["iteration"] for r in log.read()] == [0, 1, 2, 3]
    assert [r["loss"] for r in log.read()] == [0.0, 1.0, 2.0, 3.0]


def test_truncate_rewrites_only_the_straddling_part_and_deletes_later_ones(
    tmp_path: Path,
) -> None:
    log = _parts_log(tmp_path, range(0, 3), range(3, 6), range(6, 9))
    parts = tmp_path / "log.jsonl.parts"
    before = _part_files(parts)
    first, straddling, later = before
    log.truncate(4)
    after = _part_files(parts)
    assert list(after) == [first, straddling], "the part from 6 is deleted whole"
    assert after[first] == before[first], "parts before the cut are not rewritten"
    assert after[straddling][2] != before[straddling][2], "the straddling one is"
    assert [r["iteration"] for r in log.read()] == [0, 1, 2, 3]
    log.truncate(3)
    assert _part_files(parts) == {first: before[first]}, "a part starting at the cut goes whole"
    assert [r["iteration"] for r in log.read()] == [0, 1, 2]


def test_a_log_file_from_before_parts_is_read_and_truncated_with_them(tmp_path: Path) -> None:
    old = MetricsLog(str(tmp_path / "log.jsonl"), parts=False)
    for it in range(3):
        old.add({"iteration": it})
    old.flush()
    log = _parts_log(tmp_path, range(3, 5))
    assert [r["iteration"] for r in log.read()] == [0, 1, 2, 3, 4]
    log.truncate(2)
    assert [r["iteration"] for r in log.read()] == [0, 1]
    assert not list((tmp_path / "log.jsonl.parts").iterdir())


def test_a_run_logging_in_parts_resumes_cleanly(tmp_path: Path) -> None:
    _, straight = _run(tmp_path / "straight")
    hook = _FailOnce(5, tmp_path / "marker")
    killed = tmp_path / "killed"

    def log() -> MetricsLog:
        return MetricsLog(str(killed / "log.jsonl"), parts=True)

    with pytest.raises(_Boom):
        _run(killed, hooks=(hook,), log=log(), log_every=1)
    assert "00000004" in [p.name[:8] for p in (killed / "log.jsonl.parts").iterdir()]
    _, resumed = _run(killed, hooks=(hook,), log=log(), log_every=1)
    assert [r["iteration"] for r in _steps(resumed)] == list(range(10)), "iteration 4 once"
    assert [r for r in resumed if "event" in r][0]["iteration"] == 4
    assert [r["loss"] for r in _steps(resumed)] == pytest.approx(
        [r["loss"] for r in _steps(straight)]
    )
    assert not (killed / "log.jsonl").exists()


def _curve(folder: Path, tag: str) -> tuple[list[int], list[float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Scalars(tag)
    return [e.step for e in scalars], [e.value for e in scalars]


def test_curves_hold_the_logged_losses_every_log_every_iterations(tmp_path: Path) -> None:
    curves = CurveWriter(str(tmp_path / "tensorboard"))
    _, log = _run(tmp_path, max_iters=30, log_every=5, images_per_iter=4, curves=curves)
    logged = {r["iteration"]: r for r in log}
    steps, losses = _curve(tmp_path / "tensorboard", "loss")
    assert steps == [4, 9, 14, 19, 24, 29]
    assert losses == pytest.approx([logged[s]["loss"] for s in steps], rel=1e-6)
    assert _curve(tmp_path / "tensorboard", "mse")[1] == pytest.approx(losses, rel=1e-6)
    lr_steps, lrs = _curve(tmp_path / "tensorboard", "lr")
    assert lrs == pytest.approx([logged[s]["lr"] for s in lr_steps], rel=1e-6)
    speed_steps, speeds = _curve(tmp_path / "tensorboard", "images_per_s")
    assert speed_steps == steps and all(0 < v < math.inf for v in speeds)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1, "one event file, flushed"


def test_curves_on_an_object_store_upload_each_flush_once_and_survive_a_resume(
    tmp_path: Path,
) -> None:
    _, straight = _run(tmp_path / "straight", max_iters=30, checkpoint_every=8, log_every=5)
    folder = tmp_path / "killed" / "tensorboard"
    hook = _FailOnce(22, tmp_path / "marker")
    fields: dict[str, Any] = {"max_iters": 30, "checkpoint_every": 8, "log_every": 5}
    with pytest.raises(_Boom):  # reported 4, 9, 14, 19; resumes at 16, so 19 comes again
        _run(tmp_path / "killed", (hook,), curves=CurveWriter(str(folder), parts=True), **fields)
    first = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(first) == 4, "a fresh event file for each flush with new points"
    _run(tmp_path / "killed", (hook,), curves=CurveWriter(str(folder), parts=True), **fields)
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(files) == 7 and {n: files[n] for n in first} == first, "none re-uploaded"
    steps, losses = _curve(folder, "loss")
    assert steps == [4, 9, 14, 19, 24, 29], "the first attempt's 19 is purged"
    expected = {r["iteration"]: r["loss"] for r in straight}
    assert losses == pytest.approx([expected[s] for s in steps], rel=1e-6)


def test_without_tensorboard_curves_warn_once_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises
    curves = CurveWriter(str(tmp_path / "tensorboard"))
    _run(tmp_path, log_every=2, curves=curves)
    assert capsys.readouterr().out.count("warning:") == 1
    assert not (tmp_path / "tensorboard").exists()
