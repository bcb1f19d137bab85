"""Failure injection for the training stages' resume tests."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskdistill.config import ExperimentConfig
from maskdistill.engine import MetricsLog
from maskdistill.rundir import RunDir, StageManifest


class FailOnce:
    """Raises at `iteration` on the first attempt only (a marker file outlives the worker)."""

    def __init__(self, iteration: int, marker: str) -> None:
        self.iteration, self.marker = iteration, marker

    def __call__(self, iteration: int) -> None:
        path = Path(self.marker)
        if iteration == self.iteration and not path.exists():
            path.write_text("failed once")
            raise RuntimeError(f"injected failure at iteration {iteration}")


def fail_once_then_resume(
    run_stage: Callable[..., StageManifest | None],
    config: ExperimentConfig,
    stage: str,
    iteration: int,
    scratch: Path,
) -> tuple[StageManifest, list[dict[str, Any]], list[int]]:
    """Run a training stage that fails once at `iteration`: (its manifest, the logged steps,
    the iterations it resumed at)."""
    manifest = run_stage(config, hooks=[FailOnce(iteration, str(scratch / "failed"))])
    assert manifest is not None and (scratch / "failed").exists(), "the failure did happen"
    log = MetricsLog(RunDir(config.run_dir).uri_of(stage, "log.jsonl")).read()
    steps = [r for r in log if "event" not in r]
    return manifest, steps, [r["iteration"] for r in log if r.get("event") == "resumed"]
