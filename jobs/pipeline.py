"""The MaskDistill pipeline, stage by stage, resumable.

    python -m jobs.pipeline --config configs/demo.yaml          # laptop: Ray starts in-process
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/pascal.yaml

Stages: data (index and preview) -> pretrain (DINO on the train split, only when
backbone.weights is 'pretrain') -> mine (Sec 3.2 masks) -> cluster (K-means) -> detector
(Mask R-CNN, Ray Train) -> distill (Sec 3.3 confident pseudo labels) -> segmenter (DeepLab-v3,
Eq 4, Ray Train) -> evaluate (Table 1 on the val split).

A stage whose manifest matches the config is skipped; an interrupted one resumes from its
finished shards or latest checkpoint. `--from STAGE` reruns that stage and every later one,
`--only STAGE` runs one stage; the stages before them must be complete for this config. `--force`
reruns every selected stage. The run ends with a summary table (stage, rows, time, key metric).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from types import ModuleType

from jobs import cluster, distill, evaluate, mine, pretrain, train_detector, train_segmenter
from jobs.common import connect, start
from maskdistill.backbones import PRETRAINED
from maskdistill.config import ExperimentConfig
from maskdistill.data import index
from maskdistill.rundir import RunDir, read_manifest, stage_status

# Every stage module has `run_stage(config, *, force)` and `config_hash(config)`.
STAGES: dict[str, ModuleType] = {
    "data": index,
    pretrain.STAGE: pretrain,
    mine.STAGE: mine,
    cluster.STAGE: cluster,
    train_detector.STAGE: train_detector,
    distill.STAGE: distill,
    train_segmenter.STAGE: train_segmenter,
    evaluate.STAGE: evaluate,
}
KEY_METRICS = {
    pretrain.STAGE: "loss_dino",
    cluster.STAGE: "clusters",
    train_detector.STAGE: "loss_mask",
    train_segmenter.STAGE: "loss_seg",
    evaluate.STAGE: f"miou {evaluate.SEGMENTER}",
}


def needed(config: ExperimentConfig) -> list[str]:
    """Every stage of this config, in order: `pretrain` only when backbone.weights is 'pretrain'."""
    return [name for name in STAGES if name != pretrain.STAGE or pretrain.wanted(config)]


def selected(config: ExperimentConfig, args: argparse.Namespace) -> list[str]:
    """The stages this invocation runs, in order."""
    names = needed(config)
    chosen = args.only or args.start
    if chosen and chosen not in names:
        raise SystemExit(
            f"error: stage {chosen!r} is off for this config (it runs only with "
            f"backbone.weights: {PRETRAINED!r})"
        )
    if args.only:
        return [args.only]
    if args.start:
        return names[names.index(args.start) :]
    return names


def check_upstream(config: ExperimentConfig, first: str) -> None:
    """The stages before `first` must be complete for this config."""
    run = RunDir(config.run_dir)
    names = needed(config)
    for name in names[: names.index(first)]:
        status = stage_status(run, name, STAGES[name].config_hash(config))
        if status != "complete":
            raise SystemExit(
                f"error: stage {name!r} is {status} for this config; run it first "
                f"(or start with --from {name})"
            )


def summary(run: RunDir, ran: dict[str, bool]) -> str:
    """One row per stage: whether it ran, its counts, time and key metric."""
    lines = [
        f"{'stage':<10} {'run':<8} {'inputs':>8} {'outputs':>8} {'skipped':>8} {'seconds':>8}  "
        "key metric"
    ]
    for stage in STAGES:
        manifest = read_manifest(run, stage)
        if manifest is None:
            continue
        key = KEY_METRICS.get(stage)
        metric = f"{key} {manifest.metrics[key]:.4g}" if key in manifest.metrics else ""
        lines.append(
            f"{stage:<10} {'ran' if ran.get(stage) else 'reused':<8} {manifest.inputs:>8} "
            f"{manifest.outputs:>8} {len(manifest.skipped):>8} {manifest.seconds:>8.1f}  {metric}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--from", dest="start", choices=list(STAGES), help="rerun from this stage")
    choice.add_argument("--only", choices=list(STAGES), help="run this stage alone")


def run_pipeline(config: ExperimentConfig, args: argparse.Namespace) -> dict[str, bool]:
    """Run the selected stages in order; which of them ran (rather than being reused)."""
    stages = selected(config, args)
    check_upstream(config, stages[0])
    ran: dict[str, bool] = {}
    for number, name in enumerate(stages, start=1):
        print(f"== stage {number}/{len(stages)}: {name} ==", flush=True)
        begin = time.perf_counter()
        if name != "data":
            connect()
        force = args.force or (args.start is not None)
        ran[name] = STAGES[name].run_stage(config, force=force) is not None
        print(
            f"== {name}: {'done' if ran[name] else 'reused'} in "
            f"{time.perf_counter() - begin:.1f} s ==",
            flush=True,
        )
    return ran


def main(argv: Sequence[str] | None = None) -> int:
    config, args = start(__doc__, argv, extra=add_arguments)
    ran = run_pipeline(config, args)
    print(summary(RunDir(config.run_dir), ran))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
