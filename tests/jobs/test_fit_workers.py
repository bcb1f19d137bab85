"""The driver sees rank 0's final report (Ray Train V2 drops metrics without a checkpoint)."""

from pathlib import Path
from typing import Any

import pytest
import ray.train

from jobs.training import fit_workers, report_to_driver
from maskdistill.engine import NonFiniteLoss

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _report(loop_config: dict[str, Any]) -> None:
    rank = ray.train.get_context().get_world_rank()
    report_to_driver({**loop_config["metrics"], "rank": rank}, rank=rank)


def _fit(metrics: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return fit_workers(
        _report,
        {"metrics": metrics},
        name="report",
        storage_path=str(tmp_path / "ray"),
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=0.5,
        max_failures=0,
    )


def test_the_driver_gets_rank_zeros_last_losses(tmp_path: Path) -> None:
    metrics = _fit({"iteration": 3, "loss": 0.25}, tmp_path)
    assert {k: metrics[k] for k in ("iteration", "loss", "rank")} == {
        "iteration": 3,
        "loss": 0.25,
        "rank": 0,
    }


def test_a_non_finite_loss_reaches_the_driver(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLoss, match="iteration 7"):
        _fit({"error": "non-finite loss at iteration 7: {'loss': nan}"}, tmp_path)
