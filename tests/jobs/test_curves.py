"""A training stage under Ray Train shows its curves: reports to Ray every `log_every`
iterations, TensorBoard event files under `<stage>/tensorboard/`."""

import json
from pathlib import Path
from typing import Any

import pytest
import ray.train
import ray.train.torch
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import training
from jobs.training import Worker, fit_workers
from maskdistill.engine import MetricsLog
from maskdistill.loader import SampleBatches
from maskdistill.rundir import RunDir
from tests.jobs.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

STAGE = "segmenter"
SEGMENTER = (
    "segmenter.batch_size=4",
    "segmenter.resources.num_workers=2",
    "segmenter.resources.cpus_per_worker=0.5",
    "segmenter.resources.use_gpu=false",
    "segmenter.resources.loader_workers=0",
    "segmenter.resources.log_every=2",
)
MAX_ITERS = 6


class Rows:
    """Sample i is the row index i of the linear model's data."""

    def __len__(self) -> int:
        return 16

    def load(self, index: int, *, variant: int = 0) -> int:
        return index

    def image_id(self, index: int) -> str:
        return f"row{index}"


def _loop(loop_config: dict[str, Any]) -> None:
    """A stage's worker with a linear model: `Worker.train` for 6 iterations, lr halved at 3."""
    section = loop_config["config"].segmenter
    worker = Worker.start(loop_config, section)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(3, 1))
    data = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    target = data.sum(1, keepdim=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    plan = worker.plan(global_batch=section.batch_size, num_samples=16)

    def losses(m: torch.nn.Module, batch: list[int]) -> dict[str, torch.Tensor]:
        return {"mse": ((m(data[batch]) - target[batch]) ** 2).mean()}

    worker.train(
        STAGE,
        section,
        model,
        optimizer,
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5),
        max_iters=MAX_ITERS,
        checkpoint_every=3,
        batches=SampleBatches(Rows(), plan, list),
        losses=losses,
    )


class _Recorder(ray.train.UserCallback):
    """Writes down each report the Ray Train controller saw: a JSON list of every rank's
    metrics a line (the controller is an actor, so to a file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def _curve(folder: str, tag: str) -> tuple[list[int], list[float]]:
    events = EventAccumulator(folder)
    events.Reload()
    scalars = events.Scalars(tag)
    return [e.step for e in scalars], [e.value for e in scalars]


def test_a_stage_reports_its_curves_to_ray_train_and_tensorboard(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run", *SEGMENTER)
    resources = config.segmenter.resources
    seen = tmp_path / "reports.jsonl"
    final = fit_workers(
        _loop,
        {"config": config},
        name=STAGE,
        storage_path=str(tmp_path / "ray"),
        num_workers=resources.num_workers,
        use_gpu=False,
        cpus_per_worker=resources.cpus_per_worker,
        max_failures=0,
        callbacks=[_Recorder(str(seen))],
    )
    reports = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [[m["iteration"] for m in r] for r in reports] == [[1, 1], [3, 3], [5, 5], [6, 6]]
    assert reports[-1][0] == final, "the last report is the driver's"
    progress = [r[0] for r in reports[:-1]]  # rank 0's
    run = RunDir(config.run_dir)
    log = {r["iteration"]: r for r in MetricsLog(run.uri_of(STAGE, "log.jsonl")).read()}
    assert [p["loss"] for p in progress] == [log[it]["loss"] for it in (1, 3, 5)]
    assert [p["lr"] for p in progress] == pytest.approx([0.05, 0.025, 0.025])
    assert all(p["images_per_s"] > 0 for p in progress)
    assert all(set(p) == {"iteration", "mse", "loss", "lr", "images_per_s"} for p in progress)
    steps, losses = _curve(run.uri_of(STAGE, "tensorboard"), "loss")
    assert steps == [1, 3, 5]
    assert losses == pytest.approx([p["loss"] for p in progress], rel=1e-6)
    assert _curve(run.uri_of(STAGE, "tensorboard"), "images_per_s")[0] == steps


def test_rank_zero_reports_go_to_ray_train_and_to_ray_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reports: list[dict[str, float]] = []
    sets: list[tuple[float, dict[str, str]]] = []

    class Gauge:
        def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
            assert (name, tag_keys) == ("maskdistill_training", ("stage", "metric"))

        def set(self, value: float, tags: dict[str, str]) -> None:
            sets.append((value, tags))

    monkeypatch.setattr(training, "Gauge", Gauge)
    monkeypatch.setattr(training.ray.train, "report", reports.append)
    metrics = {"iteration": 19, "loss": 1.5, "lr": 0.02}
    training.live_report("detector")(metrics)
    assert reports == [metrics]
    assert sets == [
        (19.0, {"stage": "detector", "metric": "iteration"}),
        (1.5, {"stage": "detector", "metric": "loss"}),
        (0.02, {"stage": "detector", "metric": "lr"}),
    ]
