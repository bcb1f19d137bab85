"""`--verbose` reaches the console's setup. The demo's console itself (under 60 lines, Ray's
output in the run's log) is checked in tests/jobs/test_pipeline.py, on the run it then reuses."""

from pathlib import Path

import pytest

from jobs import common
from maskdistill import console
from tests.jobs.conftest import DEMO


def test_verbose_reaches_the_console_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(console, "setup", lambda log_dir, *, verbose: seen.append(verbose))
    for flags in ([], ["--verbose"]):
        common.start(None, ["--config", str(DEMO), "--set", f"run_dir={tmp_path}", *flags])
    assert seen == [False, True]
