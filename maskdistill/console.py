"""What the drivers print: a line per event, one progress bar at a time, everything else to a log.

Ray-free. `setup(log_dir)` (every driver's `jobs.common.start`) keeps the console for the
project's own lines: Python `logging` (Ray's loggers, faiss's loader, torch's, warnings) goes to
`<log_dir>/driver.log` instead of the terminal, and so does whatever C code writes to the
process's stderr (Ray's core worker), while Python's `sys.stderr` (tracebacks) stays on the
terminal. `setup(..., verbose=True)` leaves all of that as it was (`--verbose`).

`Bar` is a stage's progress bar: tqdm (rate, ETA) on a terminal; in a file or pipe, a plain line
every `INTERVAL` seconds and a last one, so a log holds a few lines per long stage and none for a
short one. A bar of work that runs in a Ray worker reads what the worker writes with
`ProgressFile` (`follow`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from maskdistill import storage

LOG_FILE = "driver.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
INTERVAL = 60.0  # seconds between a bar's lines when the output is not a terminal
PROGRESS_FILE = "progress.json"


@dataclass
class _Setup:
    verbose: bool
    log_path: str | None = None
    handler: logging.Handler | None = None
    root_level: int = logging.WARNING
    saved_stderr_fd: int | None = None
    saved_stderr: TextIO | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)


_setup: _Setup | None = None


def log_dir_for(run_uri: str) -> str:
    """Where a run's driver log goes: `<run_dir>/logs` for a local run directory, else a folder
    of this machine's temp dir named after the run's URI (object stores cannot append)."""
    if storage.is_local(run_uri):
        return os.path.join(storage.resolve(run_uri)[1], "logs")
    name = f"{run_uri.rstrip('/').rsplit('/', 1)[-1]}-{zlib.crc32(run_uri.encode()):08x}"
    return os.path.join(tempfile.gettempdir(), "maskdistill-logs", name)


def setup(log_dir: str, *, verbose: bool = False) -> str | None:
    """Send everything but the project's own lines to `<log_dir>/driver.log` (returned); with
    `verbose`, change nothing but stdout's line buffering (None then). Called again (tests run
    several drivers in one process), it first undoes the previous call."""
    global _setup
    reset()
    _line_buffered(sys.stdout)
    _setup = _Setup(verbose=verbose)
    if verbose:
        return None
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, LOG_FILE)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    _setup.log_path, _setup.handler, _setup.root_level = path, handler, root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> the file
    quiet_loggers()
    _redirect_stderr_fd(path, _setup)
    return path


def reset() -> None:
    """Undo `setup`: the log handler removed, stderr and the library loggers as they were."""
    global _setup
    state, _setup = _setup, None
    if state is None or state.verbose:
        return
    for undo in reversed(state.undo):
        undo()
    root = logging.getLogger()
    if state.handler is not None:
        root.removeHandler(state.handler)
        state.handler.close()
    root.setLevel(state.root_level)
    logging.captureWarnings(False)
    if state.saved_stderr_fd is not None:
        sys.stderr.flush()
        os.dup2(state.saved_stderr_fd, 2)
        os.close(state.saved_stderr_fd)
        if state.saved_stderr is not None:
            sys.stderr = state.saved_stderr


def quiet() -> bool:
    """Whether `setup` sent the libraries' output to the log file (no --verbose)."""
    return _setup is not None and not _setup.verbose


def log_path() -> str | None:
    """The driver log `setup` writes, or None (verbose, or no setup)."""
    return None if _setup is None else _setup.log_path


def quiet_loggers() -> None:
    """Libraries' loggers that print to the console (Ray's, Ray Data's, torch's) propagate to the
    root logger's log file instead. Call again after importing a library that sets up its own
    handlers (Ray Data does so when imported)."""
    if not quiet():
        return
    assert _setup is not None
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        console = [h for h in logger.handlers if _to_console(h)]
        if not console:
            continue
        for handler in console:
            logger.removeHandler(handler)
        was = logger.propagate
        logger.propagate = True
        _setup.undo.append(_restorer(logger, console, was))


def _restorer(
    logger: logging.Logger, handlers: list[logging.Handler], propagate: bool
) -> Callable[[], None]:
    def undo() -> None:
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = propagate

    return undo


def _to_console(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    if type(handler).__name__ in ("_StderrHandler", "PlainRayHandler"):
        return True  # torch's and Ray's: they write to whatever sys.stderr is at the time
    return handler.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def _line_buffered(stream: TextIO) -> None:
    """Each printed line reaches a file or pipe at once, in order with stderr's."""
    if isinstance(stream, io.TextIOWrapper):
        with suppress(ValueError, io.UnsupportedOperation):
            stream.reconfigure(line_buffering=True)


def _redirect_stderr_fd(path: str, state: _Setup) -> None:
    """File descriptor 2 (what C code writes: Ray's core worker, child processes) to `path`;
    Python's sys.stderr keeps writing to the terminal through a copy of the old descriptor.
    Only when sys.stderr is the process's own (not a test's capture)."""
    stderr = sys.stderr
    if stderr is not sys.__stderr__ or stderr is None:
        return
    try:
        if stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return
    stderr.flush()
    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 2)
    os.close(log)
    state.saved_stderr_fd, state.saved_stderr = saved, stderr
    sys.stderr = open(  # noqa: SIM115  # lives as long as the process (or until reset)
        saved, "w", buffering=1, encoding=stderr.encoding, errors="backslashreplace", closefd=False
    )


def _clock(seconds: float) -> str:
    return str(tqdm.format_interval(seconds))


class Bar:
    """One progress bar. On a terminal (stderr is one): tqdm with rate and ETA. Elsewhere: no
    carriage returns; a line `desc: done/total unit (p%), rate, ETA` every `interval` seconds,
    and, when it printed one, a last line with the total time when it closes."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        *,
        interval: float = INTERVAL,
        tty: bool | None = None,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self.interval, self.clock = interval, clock
        self.out = out
        self.start = self.last = clock()
        self.lines = 0
        tty = sys.stderr.isatty() if tty is None else tty
        self.tqdm: Any = None
        if tty:
            self.tqdm = tqdm(total=total, desc=desc, unit=unit, file=out or sys.stderr)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.update_to(self.done + n)

    def update_to(self, done: int, total: int | None = None) -> None:
        """Set how many units are done (and the total, when it became known)."""
        if total is not None and total != self.total:
            self.total = total
            if self.tqdm is not None:
                self.tqdm.total = total
        if self.tqdm is not None:
            self.tqdm.update(done - self.done)  # redraws at most every tqdm.mininterval
            self.done = done
            return
        self.done = done
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._print(self._progress_line(now))

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None
        elif self.lines:
            self._print(self._final_line(self.clock()))
            self.lines = 0

    def _rate(self, now: float) -> float:
        return self.done / max(now - self.start, 1e-9)

    def _of(self) -> str:
        return f"{self.done}/{self.total}" if self.total else str(self.done)

    def _progress_line(self, now: float) -> str:
        rate = self._rate(now)
        line = f"{self.desc}: {self._of()} {self.unit}"
        if self.total:
            line += f" ({100 * self.done / self.total:.0f}%)"
        line += f", {_clock(now - self.start)}, {rate:.3g} {self.unit}/s"
        if self.total and rate > 0:
            line += f", ETA {_clock((self.total - self.done) / rate)}"
        return line

    def _final_line(self, now: float) -> str:
        return (
            f"{self.desc}: {self._of()} {self.unit} in {_clock(now - self.start)}, "
            f"{self._rate(now):.3g} {self.unit}/s"
        )

    def _print(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)
        self.lines += 1


class ProgressFile:
    """Progress of work running elsewhere (a Ray worker), for the driver's bar: one small JSON
    file `{"desc", "done", "total", "unit"}` rewritten at most every `every` seconds."""

    def __init__(self, uri: str, *, every: float | None = None) -> None:
        self.uri = uri
        self.every = (2.0 if storage.is_local(uri) else 10.0) if every is None else every
        self.state: dict[str, Any] = {}
        self.written = float("-inf")

    def start(self, desc: str, total: int, unit: str = "it", done: int = 0) -> None:
        self.state = {"desc": desc, "done": done, "total": total, "unit": unit}
        self._write()

    def update(self, done: int, *, force: bool = False) -> None:
        self.state["done"] = done
        if force or time.monotonic() - self.written >= self.every:
            self._write()

    def _write(self) -> None:
        self.written = time.monotonic()
        storage.write_bytes(self.uri, json.dumps(self.state).encode())


def read_progress(uri: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None
    return found


@contextmanager
def follow(uri: str, *, poll: float = 2.0, interval: float = INTERVAL) -> Iterator[None]:
    """While the block runs, show what a `ProgressFile` at `uri` says as bars (a new bar each
    time its `desc` changes). An earlier attempt's file is deleted first."""
    with suppress(OSError):  # FileNotFoundError included
        storage.delete_file(uri)
    stop = threading.Event()
    bars: dict[str, Bar] = {}

    def show() -> None:
        found = read_progress(uri)
        if not found or "desc" not in found:
            return
        desc = str(found["desc"])
        if desc not in bars:
            for old in bars.values():
                old.close()
            bars.clear()
            bars[desc] = Bar(
                desc, found.get("total"), str(found.get("unit", "it")), interval=interval
            )
        bars[desc].update_to(int(found.get("done", 0)), found.get("total"))

    def watch() -> None:
        while not stop.wait(poll):
            try:
                show()
            except Exception:  # a storage hiccup: the next poll tries again
                logging.getLogger(__name__).exception("reading %s", uri)

    thread = threading.Thread(target=watch, name="maskdistill-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show()
        for bar in bars.values():
            bar.close()
