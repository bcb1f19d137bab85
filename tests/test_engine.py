from pathlib import Path

import pytest
import torch

from maskdistill.config import LRSchedule
from maskdistill.engine import (
    Checkpointer,
    MetricsLog,
    NonFiniteLoss,
    Prefetch,
    TrainSpec,
    batch_indices,
    build_scheduler,
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


def _run(folder: Path, hooks: tuple = (), max_iters: int = 10) -> tuple[torch.nn.Module, list]:
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
        checkpoint_every=2,
        checkpoints=Checkpointer(str(folder / "checkpoints")),
        log=MetricsLog(str(folder / "log.jsonl")),
        batch_at=batch_at,
        losses=losses,
        hooks=hooks,
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


def test_prefetch_reads_ahead_but_never_past_the_end() -> None:
    asked: list[int] = []

    def load(iteration: int) -> int:
        asked.append(iteration)
        return 10 * iteration

    prefetch = Prefetch(load, 2, stop=4)
    assert [prefetch(i) for i in range(4)] == [0, 10, 20, 30]
    prefetch.pool.shutdown(wait=True)
    assert sorted(asked) == [0, 1, 2, 3], "each iteration loaded once, none at or past stop"
    unbounded = Prefetch(load, 2)
    assert unbounded(5) == 50
    unbounded.pool.shutdown(wait=True)
    assert sorted(asked[4:]) == [5, 6, 7]
