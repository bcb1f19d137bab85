"""Batches by iteration, prepared in worker processes (torch `DataLoader`), for the training stages.

A training stage's data is a pure function `batches(iteration)` (engine.batch_indices draws the
sample indices from (seed, iteration), the augmentations from (seed, index, iteration)), so the
loader only decides where it runs: `BatchLoader` hands iterations start, start + 1, ... to
`workers` persistent processes (each `prefetch` batches ahead) and returns them in order. Worker
processes decode and augment in parallel without sharing the GIL, which threads cannot; the
batches are the same as calling `batches(iteration)` in the training process, so a resumed run
(a loader started at the checkpoint's iteration) sees the same samples.

A worker that raises passes its error on (`SampleBatches` names the image); a worker that dies
(a segfault in a decoder, the OOM killer) ends training with `LoaderWorkerDied`, naming the
iterations and images in preparation at that moment instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from maskdistill.data.base import Dataset as ImageSet
from maskdistill.data.base import Sample, SkipLog, UnreadableImage, iter_samples
from maskdistill.engine import BatchPlan

IDLE = -1  # a worker's slot when it prepares no batch


class Samples(Protocol):
    """What `SampleBatches` draws from: a training set with per-item augmentation variants."""

    def __len__(self) -> int: ...
    def load(self, index: int, *, variant: int = 0) -> Any: ...
    def image_id(self, index: int) -> str: ...


class Batches(Protocol):
    """A training stage's data: this rank's batch of each iteration, and its images' ids."""

    def __call__(self, iteration: int) -> Any: ...
    def image_ids(self, iteration: int) -> list[str]: ...


class SampleError(RuntimeError):
    """Loading one training sample failed; the message names the image and the iteration."""


class LoaderWorkerDied(RuntimeError):
    """A loader process exited without a Python error (signal, OOM kill)."""


@dataclass(frozen=True)
class SampleBatches:
    """iteration -> `collate` of this rank's samples of that iteration (`plan`), each loaded with
    variant = iteration. Picklable when `samples` and `collate` are (module-level functions)."""

    samples: Samples
    plan: BatchPlan
    collate: Callable[[list[Any]], Any]

    def __call__(self, iteration: int) -> Any:
        items = []
        for index in self.plan.indices(iteration):
            try:
                items.append(self.samples.load(index, variant=iteration))
            except Exception as err:
                image_id = self.samples.image_id(index)
                raise SampleError(
                    f"image {image_id!r} (iteration {iteration}): {type(err).__name__}: {err}"
                ) from err
        return self.collate(items)

    def image_ids(self, iteration: int) -> list[str]:
        return [self.samples.image_id(i) for i in self.plan.indices(iteration)]


class _From(Sampler[int]):
    """Iterations `start`, `start + 1`, ... up to `stop`; `start` moves when training jumps."""

    def __init__(self, stop: int) -> None:
        self.start, self.stop = 0, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _Iterations(Dataset[Any]):
    """Item i is `batches(i)`; each worker marks (pid, iteration) in its slot of `busy` while it
    prepares one, so a dead worker's batch can be named."""

    def __init__(self, batches: Callable[[int], Any], busy: Any) -> None:
        self.batches, self.busy = batches, busy

    def __getitem__(self, iteration: int) -> Any:
        info = get_worker_info()
        if info is None:
            return self.batches(iteration)
        slot = 2 * info.id
        self.busy[slot], self.busy[slot + 1] = os.getpid(), iteration
        batch = self.batches(iteration)
        self.busy[slot + 1] = IDLE
        return batch


def _exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _keep(batch: Any) -> Any:
    return batch  # one item is one whole batch: no collation


class BatchLoader:
    """`loader(iteration)` is `batches(iteration)`, prepared ahead in `workers` processes.

    Calls are expected in order; a call out of order (a resume, a jump) restarts the stream at
    that iteration. workers=0 prepares each batch in the calling process when it is asked for.
    `pin_memory` pins the batches' tensors (for non-blocking copies to a GPU). `describe`
    (iteration -> image ids, e.g. `SampleBatches.image_ids`) names a dead worker's images.
    """

    def __init__(
        self,
        batches: Callable[[int], Any],
        *,
        workers: int,
        stop: int,
        prefetch: int = 2,
        pin_memory: bool = False,
        describe: Callable[[int], Sequence[str]] | None = None,
    ) -> None:
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers={workers}, prefetch={prefetch}: expected >= 0 and >= 1")
        self.describe = describe
        self.busy = multiprocessing.Array("q", [IDLE] * (2 * workers), lock=False)
        self.sampler = _From(stop)
        self.loader: DataLoader[Any] = DataLoader(
            _Iterations(batches, self.busy),
            batch_size=None,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=_keep,
            pin_memory=pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
        )
        self.stream: Iterator[Any] | None = None
        self.next = -1

    def __call__(self, iteration: int) -> Any:
        if self.stream is None or iteration != self.next:
            self.sampler.start = iteration
            self.stream = iter(self.loader)
        try:
            batch = next(self.stream)
        except SampleError:
            raise
        except (RuntimeError, ConnectionError, EOFError) as err:  # torch's, or a cut-off pipe
            dead = self._dead_workers()
            if not dead:
                raise
            self._stop_stream()  # else the other workers' exits raise again from signal handlers
            raise LoaderWorkerDied(self._obituary(dead, iteration)) from err
        self.next = iteration + 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (they also stop with the training process)."""
        self._stop_stream()
        self.loader = None  # type: ignore[assignment]

    def _stop_stream(self) -> None:
        stream, self.stream = self.stream, None
        shutdown = getattr(stream, "_shutdown_workers", None)  # a traceback may keep it alive
        if shutdown is not None:
            shutdown()

    def _dead_workers(self) -> dict[int, int]:
        """pid -> exit code of the loader processes that have exited; waits up to a second for a
        killed one to be reaped."""
        workers = getattr(self.stream, "_workers", [])
        deadline = time.monotonic() + 1.0
        while True:
            try:
                dead = {w.pid: w.exitcode for w in workers if w.exitcode is not None}
                if dead or time.monotonic() > deadline:
                    return dead
                time.sleep(0.05)
            except RuntimeError:  # torch's SIGCHLD handler, raising for the same death again
                continue

    def _obituary(self, dead: dict[int, int], awaited: int) -> str:
        how = ", ".join(f"{pid} ({_exit(code)})" for pid, code in dead.items())
        lines = [f"loader process {how} exited without a Python error (a crash, the OOM killer)"]
        for slot in range(0, len(self.busy), 2):
            pid, iteration = self.busy[slot], self.busy[slot + 1]
            if pid in dead and iteration != IDLE:
                lines.append(f"it was preparing iteration {iteration}{self._images(iteration)}")
        if len(lines) == 1:
            lines.append(f"training was waiting for iteration {awaited}{self._images(awaited)}")
        return "; ".join(lines)

    def _images(self, iteration: int) -> str:
        if self.describe is None:
            return ""
        return f", images {', '.join(self.describe(iteration))}"


@dataclass(frozen=True)
class _Skipped:
    image_id: str
    reason: str


class _Decoded(Dataset[Sample | _Skipped]):
    """Item i is image_ids[i] decoded, or why it cannot be (the manifest's skip reason)."""

    def __init__(self, dataset: ImageSet, image_ids: Sequence[str]) -> None:
        self.dataset, self.image_ids = dataset, image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample | _Skipped:
        try:
            return self.dataset.load(self.image_ids[index])
        except UnreadableImage as err:
            return _Skipped(err.image_id, err.reason)


def decoded(
    dataset: ImageSet, image_ids: Sequence[str], skips: SkipLog, *, workers: int
) -> Iterator[Sample]:
    """The readable samples of `image_ids` in their order, decoded ahead in `workers` processes
    (0: here, one at a time); the unreadable ones go to `skips`."""
    if workers == 0:
        yield from iter_samples(dataset, image_ids, skips)
        return
    stream = DataLoader(
        _Decoded(dataset, image_ids), batch_size=None, num_workers=workers, collate_fn=_keep
    )
    for item in stream:
        if isinstance(item, _Skipped):
            skips.add(item.image_id, item.reason)
        else:
            yield item
