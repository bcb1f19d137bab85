"""Training machinery shared by the training stages: schedule, checkpoints, log, curves, loop.

Ray-free: a Ray Train worker (or a plain process) builds the model and calls `train`. A run
is resumable from its checkpoint folder at the same iteration, learning rate and data order:
batches are drawn by iteration, checkpoints hold the model, optimizer, scheduler, grad scaler
and every RNG state. Every `log_every` iterations the losses, lr and images/s go to the report
callback (every rank), and the main rank flushes its JSON-lines log and TensorBoard curves.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from maskdistill import storage
from maskdistill.config import LRSchedule

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

CHECKPOINT = re.compile(r"^iter_(\d{8})\.pt$")
WARMUP_FACTOR = 0.001  # detectron2's linear warm-up starts at 1/1000 of the base lr
PART = re.compile(r"^(\d{8})-\d{19}\.jsonl$")  # <first iteration>-<time in ns>.jsonl
KEEP_CHECKPOINTS = 2
LOG_EVERY = 20


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
    iteration: int,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_samples: int,
    seed: int,
    window: int = 0,
) -> list[int]:
    """This rank's sample indices for `iteration`: a pure function, so a resumed run sees the
    same batches. Each epoch is a permutation of the data split evenly across ranks; with a
    `window` smaller than the data, a windowed one (`epoch_order`)."""
    per_step = batch_size * world_size
    steps_per_epoch = max(1, num_samples // per_step)
    epoch, step = divmod(iteration, steps_per_epoch)
    start = step * per_step + rank * batch_size
    return [
        epoch_order(
            (start + i) % num_samples,
            num_samples=num_samples,
            seed=seed,
            epoch=epoch,
            window=window,
        )
        for i in range(batch_size)
    ]


def epoch_order(k: int, *, num_samples: int, seed: int, epoch: int, window: int) -> int:
    """The sample at place `k` of an epoch. Without a window (0, or >= num_samples) the epoch is
    one permutation of the samples. With one, the samples are cut into windows of `window`
    consecutive indices, visited in a random order, each permuted: every sample once per epoch,
    and the memory (and a row-group reader's cache) is one window's, whatever the data's size."""
    if window <= 0 or window >= num_samples:
        return int(_permutation((seed, epoch), num_samples)[k])
    count = -(-num_samples // window)
    visit = _permutation((seed, epoch), count)
    sizes = np.full(count, window, dtype=np.int64)
    sizes[visit == count - 1] = num_samples - (count - 1) * window  # the last window is short
    ends = np.cumsum(sizes)
    slot = int(np.searchsorted(ends, k, side="right"))
    chosen = int(visit[slot])
    within = k - int(ends[slot] - sizes[slot])
    return chosen * window + int(_permutation((seed, epoch, chosen), int(sizes[slot]))[within])


@functools.lru_cache(maxsize=4)
def _permutation(key: tuple[int, ...], size: int) -> np.ndarray:
    return np.random.default_rng(key).permutation(size)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples one rank draws at each iteration (`batch_indices` with fixed arguments)."""

    rank: int
    world_size: int
    batch_size: int  # per rank
    num_samples: int
    seed: int
    window: int = 0  # `epoch_order`'s shuffle window; 0: the whole data

    def indices(self, iteration: int) -> list[int]:
        return batch_indices(
            iteration,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            num_samples=self.num_samples,
            seed=self.seed,
            window=self.window,
        )


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
    """JSON lines, one per iteration (each with its `iteration`), written by the main rank.

    A local log is one file, appended to at each flush (users tail it). Object stores cannot
    append, so there each flush is a new object `<uri>.parts/<first iteration>-<ns>.jsonl`,
    written once. `parts` overrides the choice the URI scheme makes.
    """

    def __init__(self, uri: str, *, parts: bool | None = None) -> None:
        self.uri = uri
        self.parts = not storage.is_local(uri) if parts is None else parts
        self.folder = f"{uri}.parts"
        self.pending: list[str] = []

    def read(self) -> list[dict[str, Any]]:
        """The file's records, then the parts', in iteration order."""
        return [r for uri in [self.uri, *(u for _, u in self._parts())] for r in _records(uri)]

    def truncate(self, iteration: int) -> None:
        """Forget entries at or after `iteration` (written after the checkpoint resumed from):
        later parts are deleted unread, only the part (or file) straddling it is rewritten."""
        parts = self._parts()
        for first, uri in parts:
            if first >= iteration:
                storage.delete_file(uri)
        earlier = [self.uri, *(uri for first, uri in parts if first < iteration)]
        records = _records(earlier[-1])
        kept = [r for r in records if r.get("iteration", -1) < iteration]
        if len(kept) < len(records):
            storage.write_bytes(earlier[-1], _lines(json.dumps(r) for r in kept))

    def add(self, record: Mapping[str, Any]) -> None:
        self.pending.append(json.dumps(record))

    def flush(self) -> None:
        """Append the pending records to the file, or write them as a new part."""
        if not self.pending:
            return
        data = _lines(self.pending)
        if self.parts:
            first = json.loads(self.pending[0])["iteration"]
            storage.write_bytes(f"{self.folder}/{first:08d}-{time.time_ns():019d}.jsonl", data)
        else:
            storage.append_bytes(self.uri, data)
        self.pending.clear()

    def _parts(self) -> list[tuple[int, str]]:
        """(first iteration, URI) of each part, in order."""
        found = (PART.match(name) for name in storage.list_files(self.folder))
        return [(int(m.group(1)), f"{self.folder}/{m.group(0)}") for m in found if m]


def _records(uri: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def _lines(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


class CurveWriter:
    """TensorBoard scalars under `folder`, written by the main rank (nothing, after one warning,
    without the `tensorboard` package).

    A local folder gets one event file per run attempt, flushed in place. SummaryWriter writes
    only local files, so for a URI each flush closes a fresh event file in a temporary folder
    and uploads it as its own object (TensorBoard reads every event file of a folder).
    """

    def __init__(self, folder: str, *, parts: bool | None = None) -> None:
        self.folder = folder
        self.parts = not storage.is_local(folder) if parts is None else parts
        self.writer: SummaryWriter | None = None
        self.purge_step: int | None = None
        self.summary_writer = _summary_writer_class()

    def resume(self, iteration: int) -> None:
        """Hide the points at or after `iteration` left by an earlier attempt: the next event
        file starts with a SessionLog.START at that step, which TensorBoard purges from."""
        self.purge_step = iteration

    def add(self, iteration: int, scalars: Mapping[str, float]) -> None:
        writer = self._open()
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, iteration)

    def flush(self) -> None:
        """Local: flush the event file. URI: close it and upload it as a new object."""
        writer = self.writer
        if writer is None:
            return
        if not self.parts:
            writer.flush()
            return
        self.writer = None
        writer.close()
        self._upload(writer.get_logdir())

    def close(self) -> None:
        """Flush, then stop the writer's thread."""
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _open(self) -> SummaryWriter | None:
        if self.writer is None and self.summary_writer is not None:
            folder = tempfile.mkdtemp(prefix="curves-") if self.parts else self.folder
            local = storage.resolve(folder)[1]
            self.writer = self.summary_writer(local, purge_step=self.purge_step)
            self.purge_step = None
        return self.writer

    def _upload(self, local: str) -> None:
        """Write the closed event file(s) of `local` once each, named by time so that they sort
        in the order they were written (TensorBoard reads a folder's files in name order)."""
        for name in sorted(os.listdir(local)):
            data = Path(local, name).read_bytes()
            storage.write_bytes(f"{self.folder}/events.out.tfevents.{time.time_ns():019d}", data)
        shutil.rmtree(local)


def _summary_writer_class() -> type[SummaryWriter] | None:
    """torch's SummaryWriter, or None (with a warning) when `tensorboard` is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: no TensorBoard curves: pip install 'maskdistill[track]' to write them")
        return None
    return SummaryWriter


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
    log_every: int = LOG_EVERY  # iterations between reports, log flushes and curve points
    images_per_iter: int = 0  # global images per iteration (per-rank batch x world size)
    # called with the loss terms, loss, lr, images_per_s and iteration after iterations
    # log_every - 1, 2 * log_every - 1, ...: on every rank, at the same iterations
    report: Callable[[dict[str, float]], None] | None = None
    curves: CurveWriter | None = None  # None on ranks other than the main one


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
    trainee = Trainee(model, optimizer, scheduler, scaler)
    start = _resume(trainee, spec)
    throughput = Throughput(start, spec.images_per_iter)
    last: dict[str, float] = {}
    model.train()
    try:
        for iteration in range(start, spec.max_iters):
            last, metrics = _step(iteration, trainee, spec)
            if spec.log is not None:
                spec.log.add({"iteration": iteration, "time": time.time(), **metrics})
            if (iteration + 1) % spec.log_every == 0:
                _report(iteration, {**metrics, "images_per_s": throughput(iteration + 1)}, spec)
            done = iteration + 1
            if done % spec.checkpoint_every == 0 or done == spec.max_iters:
                _checkpoint(done, trainee, spec)
    finally:
        if spec.curves is not None:
            spec.curves.close()
    return last


@dataclass
class Trainee:
    """What a checkpoint holds besides the iteration and RNG state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _step(
    iteration: int, trainee: Trainee, spec: TrainSpec
) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step: (the loss terms, the metrics logged: lr, loss and the terms)."""
    model, optimizer, scaler = trainee.model, trainee.optimizer, trainee.scaler
    for hook in spec.hooks:
        hook(iteration)
    batch = spec.batch_at(iteration)
    with torch.autocast(spec.device.type, torch.bfloat16, enabled=spec.bf16):
        losses = spec.losses(model, batch)
    loss = sum(losses.values(), torch.zeros((), device=spec.device))
    terms = {name: float(value.detach()) for name, value in losses.items()}
    if not spec.all_finite(loss.detach()):
        raise NonFiniteLoss(f"non-finite loss at iteration {iteration}: {terms}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]
    trainee.scheduler.step()
    return terms, {"lr": lr, "loss": float(loss.detach()), **terms}


class Throughput:
    """Global images per second between calls (the first call counts from the start)."""

    def __init__(self, iteration: int, images_per_iter: int) -> None:
        self.iteration, self.images_per_iter = iteration, images_per_iter
        self.time = time.perf_counter()

    def __call__(self, iteration: int) -> float:
        """Images per second over the iterations since the last call, up to `iteration`."""
        now = time.perf_counter()
        images = (iteration - self.iteration) * self.images_per_iter
        rate = images / max(now - self.time, 1e-9)
        self.iteration, self.time = iteration, now
        return rate


def _report(iteration: int, scalars: dict[str, float], spec: TrainSpec) -> None:
    """Add the curve points and flush them with the log (main rank), then call `spec.report`
    (every rank)."""
    if spec.curves is not None:
        spec.curves.add(iteration, scalars)
    _flush(spec)
    if spec.report is not None:
        spec.report({**scalars, "iteration": iteration})


def _flush(spec: TrainSpec) -> None:
    if spec.log is not None:
        spec.log.flush()
    if spec.curves is not None:
        spec.curves.flush()


def _resume(trainee: Trainee, spec: TrainSpec) -> int:
    latest = spec.checkpoints.latest()
    if latest is None:
        return 0
    state = spec.checkpoints.load(latest)
    trainee.load_state_dict(state)
    set_rng_state(state["rng"])
    if spec.log is not None:
        spec.log.truncate(state["iteration"])
        spec.log.add({"event": "resumed", "iteration": state["iteration"], "from": latest})
        spec.log.flush()  # now: a run resumed at its last checkpoint trains no step to flush it
    if spec.curves is not None:
        spec.curves.resume(state["iteration"])
    return int(state["iteration"])


def _checkpoint(iteration: int, trainee: Trainee, spec: TrainSpec) -> None:
    if spec.is_main:
        _flush(spec)
        spec.checkpoints.save(iteration, trainee.state_dict())
    spec.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


def trainable(parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in parameters if p.requires_grad]
