"""Stage `evaluate` (Sec 4.1, A.2-A.4; Tables 1-3, S2) as one Ray task: every stage's output
against ground truth on the labelled val split.

    python -m jobs.evaluate --config configs/pascal.yaml [--set evaluation.crf=true]

The work is `maskdistill.evaluate.evaluate_stream` (the module's docstring lists the rows and
files). It runs as one Ray generator task holding `evaluation.resources.num_gpus` GPUs, so a
driver on a CPU head node sends it to a GPU worker; it sends each shard's skipped images back
as it goes, then the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import ray

from jobs.common import connect, execute_stage, start
from maskdistill.config import ExperimentConfig
from maskdistill.console import PROGRESS_FILE, follow
from maskdistill.evaluate import Evaluated, evaluate_stream
from maskdistill.outputs import TABLE1_FILE
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import EVALUATE

STAGE = EVALUATE


def _body(config: ExperimentConfig, manifest: StageManifest) -> None:
    res = config.evaluation.resources
    # a generator task: each shard's skips reach the manifest as they come, then the result
    task = ray.remote(num_gpus=res.num_gpus, num_cpus=res.num_cpus)(evaluate_stream)
    skipped, result = 0, None
    with follow(RunDir(config.run_dir).uri_of(STAGE, PROGRESS_FILE)):  # the task's bar
        stream = cast(ray.ObjectRefGenerator, task.remote(config))  # Ray's stub: an ObjectRef
        for ref in stream:
            item = ray.get(ref)
            if isinstance(item, Evaluated):
                result = item
                continue
            for image_id, reason in item:
                manifest.skip(image_id, reason)
            skipped += len(item)
    if result is None:
        raise RuntimeError(f"stage {STAGE}: the evaluation task ended without its metrics")
    manifest.inputs, manifest.outputs = result.scored + skipped, result.scored
    metrics = result.metrics
    manifest.metrics.update({f"miou {k}": v["miou"] for k, v in metrics.items() if "miou" in v})


def run_stage(config: ExperimentConfig, *, force: bool = False) -> StageManifest | None:
    """Evaluate the run; None when already complete for this config."""
    return execute_stage(config, STAGE, lambda m: _body(config, m), force=force)


def main(argv: Sequence[str] | None = None) -> int:
    """The stage, then its Table 1 (the other tables and pictures are files of the stage)."""
    config, args = start(__doc__, argv)
    connect()
    run_stage(config, force=args.force)
    run = RunDir(config.run_dir)
    print(run.read_bytes(*TABLE1_FILE).decode(), end="")
    print(f"per class, mask AP, pictures: {run.path(STAGE)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
