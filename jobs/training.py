"""The Ray Train shell shared by the training stages: trainer, worker helpers, result check."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from maskdistill import storage
from maskdistill.engine import Checkpointer, NonFiniteLoss
from maskdistill.rundir import RunDir


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
) -> dict[str, Any]:
    """Run `loop` on `num_workers` DDP workers; a failed group restarts up to `max_failures`
    times. Returns rank 0's last report; raises NonFiniteLoss when a worker reported one."""
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


def export_weights(run: RunDir, stage: str, **extra: Any) -> dict[str, Any]:
    """Write the latest checkpoint's model (and `extra`) to `<stage>/model.pt`; return the
    checkpoint."""
    latest = Checkpointer(run.uri_of(stage, "checkpoints")).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {run.uri_of(stage, 'checkpoints')}")
    state = Checkpointer.load(latest)
    buffer = io.BytesIO()
    torch.save({"model": state["model"], **extra}, buffer)
    storage.write_bytes(run.uri_of(stage, "model.pt"), buffer.getvalue())
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
