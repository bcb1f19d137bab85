"""Stage `evaluate` (Sec 4.1, A.2-A.4; Tables 1-3, S2) as one Ray task: every stage's output
against ground truth on the labelled val split.

    python -m jobs.evaluate --config configs/pascal.yaml [--set evaluation.crf=true]

The work is `maskdistill.evaluate.evaluate` (its docstring lists the rows and files). It runs
as one Ray task holding `evaluation.resources.num_gpus` GPUs, so a driver on a CPU head node
sends it to a GPU worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray

from jobs.common import execute_stage, stage_main
from maskdistill.config import ExperimentConfig
from maskdistill.evaluate import evaluate
from maskdistill.rundir import StageManifest
from maskdistill.stages import EVALUATE

STAGE = EVALUATE


def _body(config: ExperimentConfig, manifest: StageManifest) -> None:
    res = config.evaluation.resources
    task = ray.remote(num_gpus=res.num_gpus, num_cpus=res.num_cpus)(evaluate)
    metrics, skipped, scored = ray.get(task.remote(config))
    for image_id, reason in skipped:
        manifest.skip(image_id, reason)
    manifest.inputs, manifest.outputs = scored + len(skipped), scored
    manifest.metrics.update({f"miou {k}": v["miou"] for k, v in metrics.items() if "miou" in v})


def run_stage(config: ExperimentConfig, *, force: bool = False) -> StageManifest | None:
    """Evaluate the run; None when already complete for this config."""
    return execute_stage(config, STAGE, lambda m: _body(config, m), force=force)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
