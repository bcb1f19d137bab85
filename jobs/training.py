"""The Ray Train shell shared by the training stages: trainer, worker helpers, result check."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from ray.util.metrics import Gauge

from jobs.common import execute_stage
from maskdistill.config import ExperimentConfig, TrainingResources
from maskdistill.console import PROGRESS_FILE, ProgressFile, follow
from maskdistill.engine import (
    BatchPlan,
    Checkpointer,
    CurveWriter,
    MetricsLog,
    NonFiniteLoss,
    TrainSpec,
    train,
)
from maskdistill.loader import Batches, BatchLoader
from maskdistill.outputs import write_weights
from maskdistill.rundir import RunDir, StageManifest


class TrainingSection(Protocol):
    """The config keys every training stage has (detector, segmenter, pretrain)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def precision(self) -> str: ...
    @property
    def resources(self) -> TrainingResources: ...


Fit = Callable[[ExperimentConfig, StageManifest, Sequence[Any]], None]


def stage_runner(stage: str, fit: Fit) -> Callable[..., StageManifest | None]:
    """A training stage's `run_stage(config, *, force=False, hooks=())`: `fit` the stage unless
    it is done for the config (None then); `hooks` run before each iteration (tests)."""

    def run_stage(
        config: ExperimentConfig, *, force: bool = False, hooks: Sequence[Any] = ()
    ) -> StageManifest | None:
        return execute_stage(config, stage, lambda m: fit(config, m, hooks), force=force)

    return run_stage


def fit_stage(
    loop: Callable[[dict[str, Any]], None],
    config: ExperimentConfig,
    stage: str,
    section: TrainingSection,
    hooks: Sequence[Any] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """`fit_workers` for one stage (its section's workers, its run-directory folder `stage`, which
    may be a subfolder such as `refine/round_0`); returns rank 0's last losses, as floats.
    `extra` joins the loop's config. The console shows rank 0's iterations as the stage's bar."""
    res = section.resources
    run = RunDir(config.run_dir)
    with follow(run.uri_of(stage, PROGRESS_FILE)):
        metrics = fit_workers(
            loop,
            {"config": config, "hooks": list(hooks), **(extra or {})},
            name=stage.replace("/", "_"),
            storage_path=run.uri_of(stage, "ray"),
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            cpus_per_worker=res.cpus_per_worker,
            max_failures=res.max_failures,
        )
    return {name: float(value) for name, value in metrics.items() if name != "iteration"}


@dataclass(frozen=True)
class Worker:
    """Where one DDP worker of a training stage runs: its rank, device and run directory."""

    config: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    run: RunDir
    hooks: Sequence[Callable[[int], None]]

    @classmethod
    def start(cls, loop_config: Mapping[str, Any], section: TrainingSection) -> Worker:
        torch.set_num_threads(math.ceil(section.resources.cpus_per_worker))
        context = ray.train.get_context()
        config: ExperimentConfig = loop_config["config"]
        return cls(
            config=config,
            rank=context.get_world_rank(),
            world=context.get_world_size(),
            device=ray.train.torch.get_device(),
            run=RunDir(config.run_dir),
            hooks=loop_config.get("hooks", ()),
        )

    def plan(self, *, global_batch: int, num_samples: int, window: int = 0) -> BatchPlan:
        """This rank's share of each iteration's global batch (a pure function: resumable),
        an epoch shuffled in windows of `window` rows (`engine.epoch_order`)."""
        return BatchPlan(
            rank=self.rank,
            world_size=self.world,
            batch_size=global_batch // self.world,
            num_samples=num_samples,
            seed=self.config.seed,
            window=window,
        )

    def train(
        self,
        stage: str,
        section: TrainingSection,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        max_iters: int,
        checkpoint_every: int,
        batches: Batches,
        losses: Callable[[torch.nn.Module, Any], Mapping[str, torch.Tensor]],
    ) -> None:
        """Resume, train to `max_iters` with checkpoints under `<stage>/checkpoints`, report the
        losses to Ray Train every `log_every` iterations (curves in `<stage>/tensorboard`) and at
        the end (or the NaN error, which the driver raises). `batches` run in the section's
        loader processes."""
        main = self.rank == 0
        hooks = list(self.hooks)
        res = section.resources
        loader = BatchLoader(
            batches,
            workers=res.loader_workers,
            prefetch=res.prefetch,
            stop=max_iters,
            pin_memory=self.device.type == "cuda",
            describe=batches.image_ids,
        )
        if main:  # the driver's bar (`fit_stage`): iterations done, at most every few seconds
            progress = ProgressFile(self.run.uri_of(stage, PROGRESS_FILE))
            progress.start(stage, max_iters, "it")
            hooks.append(progress.update)
        spec = TrainSpec(
            max_iters=max_iters,
            checkpoint_every=checkpoint_every,
            checkpoints=Checkpointer(self.run.uri_of(stage, "checkpoints")),
            log=MetricsLog(self.run.uri_of(stage, "log.jsonl")) if main else None,
            batch_at=loader,
            losses=losses,
            device=self.device,
            bf16=self.device.type == "cuda" and section.precision == "bf16",
            is_main=main,
            barrier=barrier,
            hooks=hooks,
            all_finite=all_finite(self.device),
            log_every=section.resources.log_every,
            images_per_iter=section.batch_size // self.world * self.world,
            # V2 report() is a barrier, equally often on every rank; checkpoint-less: callbacks only
            report=live_report(stage) if main else ray.train.report,
            curves=CurveWriter(self.run.uri_of(stage, "tensorboard")) if main else None,
        )
        try:
            last = train(model, optimizer, scheduler, spec)
        except NonFiniteLoss as err:
            report_to_driver({"error": str(err)}, rank=self.rank)
            return
        finally:
            loader.close()
        if main:
            progress.update(max_iters, force=True)
        report_to_driver({"iteration": max_iters, **last}, rank=self.rank)


def live_report(stage: str) -> Callable[[dict[str, float]], None]:
    """Rank 0's periodic report: to Ray Train, and as Ray metrics (Prometheus gauges tagged by
    stage and metric, which the Ray dashboard's Metrics view draws) for a live view."""
    gauge = Gauge(
        "maskdistill_training",
        description="latest training metrics of a maskdistill stage (losses, lr, images/s)",
        tag_keys=("stage", "metric"),
    )

    def report(metrics: dict[str, float]) -> None:
        ray.train.report(metrics)
        for name, value in metrics.items():
            gauge.set(float(value), tags={"stage": stage, "metric": name})

    return report


def report_to_driver(metrics: dict[str, Any], *, rank: int) -> None:
    """Every worker's final `ray.train.report`; rank 0's reaches `fit_workers`.

    Ray Train V2 keeps only metrics reported with a checkpoint (free-floating ones are dropped,
    and with them a NaN error), so rank 0 attaches a one-file checkpoint holding the metrics.
    """
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def fit_workers(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    storage_path: str,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    callbacks: Sequence[UserCallback] = (),
) -> dict[str, Any]:
    """Run `loop` on `num_workers` DDP workers; a failed group restarts up to `max_failures`
    times. Returns rank 0's last report; raises NonFiniteLoss when a worker reported one.
    `callbacks` run in the Ray Train controller and see every report of every rank."""
    resources = {"CPU": cpus_per_worker, "GPU": 1.0} if use_gpu else {"CPU": cpus_per_worker}
    _warn_if_short(resources, num_workers)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            # mypy reads ray.air's RunConfig; Ray Train V2's, used at run time, takes UserCallbacks
            callbacks=list(callbacks),  # type: ignore[arg-type]
        ),
    )
    metrics: dict[str, Any] = trainer.fit().metrics or {}
    if "error" in metrics:
        raise NonFiniteLoss(metrics["error"])
    return metrics


def _warn_if_short(per_worker: dict[str, float], num_workers: int) -> None:
    """Say so when the cluster, as it is now, cannot hold the workers (only an autoscaler can)."""
    total = ray.cluster_resources()
    for name, amount in per_worker.items():
        needed = amount * num_workers
        if total.get(name, 0.0) < needed:
            print(
                f"warning: {num_workers} workers need {needed:g} {name} in all, the cluster has "
                f"{total.get(name, 0.0):g}; training waits until an autoscaler adds nodes"
            )


def latest_state(run: RunDir, stage: str) -> dict[str, Any]:
    """The stage's latest checkpoint; FileNotFoundError naming the folder when there is none."""
    latest = Checkpointer(run.uri_of(stage, "checkpoints")).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {run.uri_of(stage, 'checkpoints')}")
    state: dict[str, Any] = Checkpointer.load(latest)
    return state


def export_weights(run: RunDir, stage: str, **extra: Any) -> dict[str, Any]:
    """Write the latest checkpoint's model (and `extra`) to `<stage>/model.pt`; return the
    checkpoint."""
    state = latest_state(run, stage)
    write_weights(run, stage, state["model"], **extra)
    return state


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_finite(device: torch.device) -> Callable[[torch.Tensor], bool]:
    """Whether the loss is finite on every rank (one scalar all-reduce per iteration)."""

    def check(loss: torch.Tensor) -> bool:
        flag = torch.tensor([float(math.isfinite(float(loss)))], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    return check
