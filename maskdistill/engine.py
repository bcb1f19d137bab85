"""Training machinery shared by the detector and the segmenter: schedule, checkpoints, log, loop.

Ray-free: a Ray Train worker (or a plain process) builds the model and calls `train`. A run
is resumable from its checkpoint folder at the same iteration, learning rate and data order:
batches are drawn by iteration, checkpoints hold the model, optimizer, scheduler, grad scaler
and every RNG state.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskdistill import storage
from maskdistill.config import LRSchedule

CHECKPOINT = re.compile(r"^iter_(\d{8})\.pt$")
WARMUP_FACTOR = 0.001  # detectron2's linear warm-up starts at 1/1000 of the base lr
KEEP_CHECKPOINTS = 2
LOG_FLUSH_EVERY = 20


def scaled_lr(schedule: LRSchedule, global_batch: int) -> float:
    """The linear scaling rule: `base_lr` is for `reference_batch` images per step."""
    return schedule.base_lr * global_batch / schedule.reference_batch


def lr_factor(schedule: LRSchedule, iteration: int) -> float:
    """Linear warm-up, then x gamma at each milestone passed (A.1, A.3)."""
    factor = schedule.gamma ** sum(iteration >= m for m in schedule.milestones)
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= WARMUP_FACTOR * (1 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration scheduler; the optimizer's lr must already be `scaled_lr`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(schedule, it))


def batch_indices(
    iteration: int, *, rank: int, world_size: int, batch_size: int, num_samples: int, seed: int
) -> list[int]:
    """This rank's sample indices for `iteration`: a pure function, so a resumed run sees the
    same batches. Each epoch is a permutation of the data split evenly across ranks."""
    per_step = batch_size * world_size
    steps_per_epoch = max(1, num_samples // per_step)
    epoch, step = divmod(iteration, steps_per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(num_samples)
    start = step * per_step + rank * batch_size
    return [int(order[(start + i) % num_samples]) for i in range(batch_size)]


class NonFiniteLoss(FloatingPointError):
    """A loss became NaN or infinite; the run stops instead of training on garbage."""


@dataclass
class Checkpointer:
    """Checkpoints `iter_XXXXXXXX.pt` under `folder` (local path or URI); the last few kept."""

    folder: str
    keep: int = KEEP_CHECKPOINTS

    def names(self) -> list[str]:
        return [n for n in storage.list_files(self.folder) if CHECKPOINT.match(n)]

    def latest(self) -> str | None:
        names = self.names()
        return f"{self.folder.rstrip('/')}/{names[-1]}" if names else None

    def save(self, iteration: int, state: Mapping[str, Any]) -> str:
        buffer = io.BytesIO()
        torch.save({**state, "iteration": iteration, "rng": rng_state()}, buffer)
        uri = f"{self.folder.rstrip('/')}/iter_{iteration:08d}.pt"
        storage.write_bytes(uri, buffer.getvalue())
        for old in self.names()[: -self.keep]:
            storage.delete_file(f"{self.folder.rstrip('/')}/{old}")
        return uri

    @staticmethod
    def load(uri: str) -> dict[str, Any]:
        state: dict[str, Any] = torch.load(
            io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False
        )
        return state


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """JSON lines, one per iteration, under the run directory; written by the main rank."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.pending: list[str] = []

    def read(self) -> list[dict[str, Any]]:
        try:
            text = storage.read_bytes(self.uri).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]

    def truncate(self, iteration: int) -> None:
        """Forget entries at or after `iteration` (written after the checkpoint resumed from)."""
        kept = [r for r in self.read() if r.get("iteration", -1) < iteration]
        storage.write_bytes(self.uri, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def add(self, record: Mapping[str, Any]) -> None:
        self.pending.append(json.dumps(record))

    def flush(self) -> None:
        if self.pending:
            lines = "".join(line + "\n" for line in self.pending)
            storage.append_bytes(self.uri, lines.encode())
            self.pending.clear()


class Prefetch:
    """`fn(iteration)` computed up to `depth` iterations ahead on a thread pool (data loading);
    never for iterations at or past `stop` (the end of training) when it is given."""

    def __init__(self, fn: Callable[[int], Any], depth: int, *, stop: int | None = None) -> None:
        self.fn, self.depth, self.stop = fn, depth, stop
        self.pool = ThreadPoolExecutor(max_workers=depth)
        self.futures: dict[int, Future[Any]] = {}

    def __call__(self, iteration: int) -> Any:
        end = iteration + self.depth + 1
        if self.stop is not None:
            end = max(iteration + 1, min(end, self.stop))
        for ahead in range(iteration, end):
            if ahead not in self.futures:
                self.futures[ahead] = self.pool.submit(self.fn, ahead)
        for stale in [k for k in self.futures if k < iteration]:
            self.futures.pop(stale).cancel()
        return self.futures.pop(iteration).result()


@dataclass
class TrainSpec:
    """What `train` needs besides the model: data by iteration, how to compute the losses."""

    max_iters: int
    checkpoint_every: int
    checkpoints: Checkpointer
    log: MetricsLog | None  # None on ranks other than the main one
    batch_at: Callable[[int], Any]  # iteration -> this rank's batch
    losses: Callable[[torch.nn.Module, Any], Mapping[str, torch.Tensor]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None
    hooks: Sequence[Callable[[int], None]] = ()  # called before each iteration (tests inject here)
    all_finite: Callable[[torch.Tensor], bool] = lambda loss: math.isfinite(float(loss))


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    spec: TrainSpec,
) -> dict[str, float]:
    """Resume from the latest checkpoint, then train to `max_iters`; returns the last losses.

    Raises NonFiniteLoss naming the iteration and the losses when the loss is NaN or infinite
    (on any rank: `spec.all_finite` sees every rank's loss in a distributed run).
    """
    scaler = torch.amp.GradScaler(spec.device.type, enabled=False)  # bf16 needs no loss scaling
    start = _resume(model, optimizer, scheduler, scaler, spec)
    last: dict[str, float] = {}
    model.train()
    for iteration in range(start, spec.max_iters):
        for hook in spec.hooks:
            hook(iteration)
        batch = spec.batch_at(iteration)
        with torch.autocast(spec.device.type, torch.bfloat16, enabled=spec.bf16):
            losses = spec.losses(model, batch)
        loss = sum(losses.values(), torch.zeros((), device=spec.device))
        last = {name: float(value.detach()) for name, value in losses.items()}
        if not spec.all_finite(loss.detach()):
            raise NonFiniteLoss(f"non-finite loss at iteration {iteration}: {last}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if spec.log is not None:
            total = float(loss.detach())
            record = {"iteration": iteration, "time": time.time(), "lr": lr, "loss": total}
            spec.log.add({**record, **last})
            if iteration % LOG_FLUSH_EVERY == 0:
                spec.log.flush()
        done = iteration + 1
        if done % spec.checkpoint_every == 0 or done == spec.max_iters:
            _checkpoint(done, model, optimizer, scheduler, scaler, spec)
    return last


def _resume(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    spec: TrainSpec,
) -> int:
    latest = spec.checkpoints.latest()
    if latest is None:
        return 0
    state = spec.checkpoints.load(latest)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if spec.log is not None:
        spec.log.truncate(state["iteration"])
        spec.log.add({"event": "resumed", "iteration": state["iteration"], "from": latest})
        spec.log.flush()  # now: a run resumed at its last checkpoint trains no step to flush it
    return int(state["iteration"])


def _checkpoint(
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    spec: TrainSpec,
) -> None:
    if spec.is_main:
        if spec.log is not None:
            spec.log.flush()
        state = {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        }
        spec.checkpoints.save(iteration, state)
    spec.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


def trainable(parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in parameters if p.requires_grad]
