"""Stage `segmenter` (Sec 3.3 Eq 4, 4.1, A.3): DeepLab-v3 on the pseudo labels, with Ray Train.

    python -m jobs.train_segmenter --config configs/pascal.yaml \
        --set segmenter.resources.num_workers=2

The same contract as the detector stage: DDP workers draw their share of the global batch by
iteration, rank 0 checkpoints every `segmenter.checkpoint_every_epochs` epochs to
`run_dir/segmenter/checkpoints/` and logs losses and lr per iteration to `segmenter/log.jsonl`,
a failed worker group restarts from the latest checkpoint, a NaN loss stops the run. The loss is
Eq 4: cross-entropy over the hardest `segmenter.hard_pixel_fraction` of the valid pixels of
each batch. Schedule milestones are in epochs. The weights end in `segmenter/model.pt`.
The classes are the run's names.yaml groups (`maskdistill.names`): merged clusters train as
one class, background clusters as background; `cluster_labels` in model.pt records the map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jobs.common import stage_main
from jobs.segmenter_training import train_on, training_rows
from jobs.training import stage_runner
from maskdistill.config import ExperimentConfig
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import SEGMENTER

STAGE = SEGMENTER


def fit(config: ExperimentConfig, manifest: StageManifest, hooks: Sequence[Any] = ()) -> None:
    """Run the TorchTrainer; export the final weights to `segmenter/model.pt`."""
    losses, iterations = train_on(config, hooks=hooks)
    manifest.inputs = len(training_rows(config, RunDir(config.run_dir)))
    manifest.outputs = iterations
    manifest.metrics.update(losses)


run_stage = stage_runner(STAGE, fit)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
