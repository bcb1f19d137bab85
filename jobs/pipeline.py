"""The MaskDistill pipeline, stage by stage; a stage whose manifest matches the config is skipped.

    python -m jobs.pipeline --config configs/demo.yaml          # laptop: Ray starts in-process
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/pascal.yaml

Stages so far: data (index and preview) -> mine (Sec 3.2 masks) -> cluster (K-means) ->
detector (Mask R-CNN, Ray Train) -> distill (Sec 3.3 confident pseudo labels) ->
segmenter (DeepLab-v3, Eq 4, Ray Train).
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs import cluster, distill, mine, train_detector, train_segmenter
from jobs.common import connect, start
from maskdistill.data import index
from maskdistill.rundir import RunDir, read_manifest

STAGES = (
    "data",
    mine.STAGE,
    cluster.STAGE,
    train_detector.STAGE,
    distill.STAGE,
    train_segmenter.STAGE,
)


def summary(run: RunDir, ran: dict[str, bool]) -> str:
    """One line per stage: whether it ran, its counts, time and key metrics."""
    lines = [f"{'stage':<10} {'run':<8} {'inputs':>8} {'outputs':>8} {'skipped':>8} {'seconds':>8}"]
    for stage in STAGES:
        manifest = read_manifest(run, stage)
        if manifest is None:
            continue
        lines.append(
            f"{stage:<10} {'ran' if ran.get(stage) else 'reused':<8} {manifest.inputs:>8} "
            f"{manifest.outputs:>8} {len(manifest.skipped):>8} {manifest.seconds:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config, args = start(__doc__, argv)
    ran = {"data": index.run_stage(config, force=args.force) is not None}
    connect()
    ran[mine.STAGE] = mine.run_stage(config, force=args.force) is not None
    ran[cluster.STAGE] = cluster.run_stage(config, force=args.force) is not None
    ran[train_detector.STAGE] = train_detector.run_stage(config, force=args.force) is not None
    ran[distill.STAGE] = distill.run_stage(config, force=args.force) is not None
    ran[train_segmenter.STAGE] = train_segmenter.run_stage(config, force=args.force) is not None
    print(summary(RunDir(config.run_dir), ran))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
