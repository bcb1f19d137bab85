"""The console helpers: bars that do not flood a file, libraries' output in the log file."""

import logging
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from maskdistill import console


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bar_in_a_file_prints_a_line_a_minute_with_rate_and_eta(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    with console.Bar("mine:train", 600, "img", tty=False, clock=clock) as bar:
        for _ in range(600):  # one image a second: 10 minutes
            clock.now += 1.0
            bar.update()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 + 1, lines  # one a minute, and the last
    assert lines[0] == "mine:train: 60/600 img (10%), 01:00, 1 img/s, ETA 09:00"
    assert lines[-1] == "mine:train: 600/600 img in 10:00, 1 img/s"


def test_a_short_bar_in_a_file_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    with console.Bar("data:val", 64, "img", tty=False, clock=clock) as bar:
        for _ in range(64):
            clock.now += 0.5
            bar.update()
    assert capsys.readouterr().out == ""


def test_a_bar_on_a_terminal_is_tqdm(tmp_path: Path) -> None:
    with (
        (tmp_path / "tty").open("w") as out,
        console.Bar("evaluate:val", 4, "img", tty=True, out=out) as bar,
    ):
        bar.update_to(4)
    shown = (tmp_path / "tty").read_bytes().decode()
    assert "\r" in shown and "4/4" in shown and "img/s" in shown  # redrawn in place


def test_follow_shows_what_a_worker_writes_as_bars(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(tmp_path / "evaluate" / console.PROGRESS_FILE)
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / console.PROGRESS_FILE).write_text('{"desc": "old", "done": 1}')
    done = threading.Event()

    def worker() -> None:
        progress = console.ProgressFile(uri, every=0.0)
        progress.start("evaluate:probe", 2, "epoch")
        for epoch in (1, 2):
            progress.update(epoch)
            done.wait(0.3)  # the follower polls every 0.01 s
        progress.start("evaluate:val", 8, "img")
        progress.update(8, force=True)

    with console.follow(uri, poll=0.01, interval=0.0):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    out = capsys.readouterr().out
    assert "old" not in out, "an earlier attempt's file is deleted first"
    assert "evaluate:probe: 2/2 epoch in" in out
    assert out.splitlines()[-1].startswith("evaluate:val: 8/8 img in")


@pytest.fixture
def quiet_log(tmp_path: Path) -> object:
    path = console.setup(str(tmp_path / "logs"))
    yield path
    console.reset()


def test_setup_sends_library_loggers_and_warnings_to_the_file(
    quiet_log: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert console.quiet() and console.log_path() == quiet_log
    ray_like = logging.getLogger("ray.console_test")
    try:
        ray_like.addHandler(logging.StreamHandler(sys.stderr))
        ray_like.propagate = False
        console.quiet_loggers()
        ray_like.warning("Started a local Ray instance (test)")
        logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support. (test)")
        warnings.warn("a library's deprecation (test)", DeprecationWarning, stacklevel=1)
        print("== stage 1/1: data ==")
    finally:
        ray_like.handlers.clear()
    printed = capsys.readouterr()
    assert printed.out == "== stage 1/1: data ==\n" and printed.err == ""
    log = Path(quiet_log).read_text()
    assert "Started a local Ray instance (test)" in log
    assert "Loading faiss with AVX2 support. (test)" in log
    assert "a library's deprecation (test)" in log


def test_verbose_changes_nothing(tmp_path: Path) -> None:
    root_handlers = list(logging.getLogger().handlers)
    try:
        assert console.setup(str(tmp_path / "logs"), verbose=True) is None
        assert not console.quiet() and console.log_path() is None
        assert logging.getLogger().handlers == root_handlers
        assert not (tmp_path / "logs").exists()
    finally:
        console.reset()


def test_what_c_code_writes_to_stderr_goes_to_the_file_and_python_s_stderr_stays(
    tmp_path: Path,
) -> None:
    script = (
        "import os, sys\n"
        "from maskdistill import console\n"
        f"console.setup({str(tmp_path)!r})\n"
        "os.write(2, b'core_worker.cc: from C\\n')\n"
        "print('error: from Python', file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "error: from Python\n"
    assert "core_worker.cc: from C" in (tmp_path / console.LOG_FILE).read_text()
