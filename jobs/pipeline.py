"""The MaskDistill pipeline, stage by stage, resumable.

    python -m jobs.pipeline --config configs/demo.yaml          # laptop: Ray starts in-process
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/pascal.yaml

Stages (`maskdistill.stages`): data (index and preview) -> pretrain (DINO on the train split,
only when backbone.weights is 'pretrain') -> mine (Sec 3.2 masks) -> cluster (K-means) ->
detector (Mask R-CNN, Ray Train) -> distill (Sec 3.3 confident pseudo labels) -> segmenter
(DeepLab-v3, Eq 4, Ray Train) -> refine (CRF self-training, S1, only when
self_training.rounds > 0) -> evaluate (Table 1 on the val split).

A stage whose manifest matches the config is reused; an interrupted one resumes from its
finished shards or latest checkpoint; one made with another config is moved aside under
`stale/` and rerun (`maskdistill status RUN_DIR` says which, and why, before anything runs).
Resource settings (`<section>.resources`) never make a stage stale. `--from STAGE` reruns that
stage and every later one, `--only STAGE` runs one stage; the stages before them must be
complete for this config. `--force` reruns every selected stage, deleting its output. The run
ends with a summary table (stage, rows, time, key metric) and Table 1. `repeat_main` is the
runner's second entry point, `maskdistill repeat` (A.4's runs over seeds, `REPEAT_DOC`).

The console shows a line as each stage starts and ends, its progress bar (on a terminal; in a
file, a line a minute), warnings that concern the run and the tables; Ray's own output goes to
`run_dir/logs/` (`--verbose` prints it here). A failing stage's line names it before the error.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from jobs import (
    cluster,
    data,
    distill,
    evaluate,
    mine,
    pretrain,
    refine,
    train_detector,
    train_segmenter,
)
from jobs.common import connect, start
from maskdistill import console
from maskdistill.config import ExperimentConfig, add_set_arg
from maskdistill.outputs import TABLE1_FILE, read_metrics
from maskdistill.repeats import (
    check_shared,
    copy_shared,
    parse_seeds,
    seed_config,
    seed_finished,
    write_summary,
)
from maskdistill.rundir import RunDir, check_run_dir, read_manifest, stage_state
from maskdistill.stages import DATA, EVALUATE, NAMES, OFF, STAGES, fingerprint, needed

# Every stage driver has `STAGE` and `run_stage(config, *, force)`.
_ORDER = (
    data,
    pretrain,
    mine,
    cluster,
    train_detector,
    distill,
    train_segmenter,
    refine,
    evaluate,
)
DRIVERS: dict[str, ModuleType] = {module.STAGE: module for module in _ORDER}
assert tuple(DRIVERS) == NAMES, "one driver per stage, in pipeline order"


def selected(config: ExperimentConfig, args: argparse.Namespace) -> list[str]:
    """The stages this invocation runs, in order."""
    names = needed(config)
    chosen = args.only or args.start
    if chosen and chosen not in names:
        raise SystemExit(f"error: stage {chosen!r} is off for this config ({OFF[chosen]})")
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
        state = stage_state(run, fingerprint(config, name))
        if state != "done":
            raise SystemExit(
                f"error: stage {name!r} is {state} for this config; run it first "
                f"(or start with --from {name}; `maskdistill status` says why)"
            )


def summary(run: RunDir, ran: dict[str, bool]) -> str:
    """One row per stage: whether it ran, its counts, time and key metric."""
    lines = [
        f"{'stage':<10} {'run':<8} {'inputs':>8} {'outputs':>8} {'skipped':>8} {'seconds':>8}  "
        "key metric"
    ]
    for name in NAMES:
        manifest = read_manifest(run, name)
        if manifest is None:
            continue
        key = STAGES[name].key_metric
        metric = f"{key} {manifest.metrics[key]:.4g}" if key in manifest.metrics else ""
        lines.append(
            f"{name:<10} {'ran' if ran.get(name) else 'reused':<8} {manifest.inputs:>8} "
            f"{manifest.outputs:>8} {len(manifest.skipped):>8} {manifest.seconds:>8.1f}  {metric}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--from", dest="start", choices=NAMES, help="rerun from this stage")
    choice.add_argument("--only", choices=NAMES, help="run this stage alone")


def run_pipeline(config: ExperimentConfig, args: argparse.Namespace) -> dict[str, bool]:
    """Run the selected stages in order; which of them ran (rather than being reused)."""
    stages = selected(config, args)
    check_upstream(config, stages[0])
    ran: dict[str, bool] = {}
    for number, name in enumerate(stages, start=1):
        print(f"== stage {number}/{len(stages)}: {name} ==", flush=True)
        begin = time.perf_counter()
        try:
            if name != DATA:
                connect()
            force = args.force or (args.start is not None)
            ran[name] = DRIVERS[name].run_stage(config, force=force) is not None
        except BaseException as err:
            log = console.log_path()
            print(
                f"== {name}: failed after {time.perf_counter() - begin:.1f} s: {_cause(err)}"
                f"{f' (Ray and library output: {log})' if log else ''} ==",
                flush=True,
            )
            raise
        print(
            f"== {name}: {'done' if ran[name] else 'reused'} in "
            f"{time.perf_counter() - begin:.1f} s ==",
            flush=True,
        )
    return ran


def _cause(err: BaseException) -> str:
    """The exception's type and the start of its message's first line (the traceback, which
    follows, has the rest)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # Ray colours actor names
    first = text.splitlines()[0] if text else ""
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def table1(run: RunDir) -> str:
    """The run's Table 1 as the evaluate stage wrote it ("" before it ran)."""
    return run.read_bytes(*TABLE1_FILE).decode() if run.exists(*TABLE1_FILE) else ""


REPEAT_DOC = """The stages after mining once per seed (A.4: "the average over 5 different
runs"), then the mean and std of every metric.

    maskdistill repeat runs/pascal --seeds 1,2,3,4,5 [--set detector.resources.num_workers=8]

Each seed is a run directory of its own, `RUN_DIR/repeats/seed_N/` (`maskdistill.repeats`): the
run's config with `seed` and `clustering.seed` set to N, the run's data and mine stages copied in
(never mined again), then every later stage of the pipeline (cluster, detector, distill,
segmenter, ..., evaluate). A finished seed is reused; an interrupted one resumes like any
pipeline. `--set` changes keys of the run's config for every seed (resources, say; a key that
changes mining is refused). Last, `RUN_DIR/repeats/summary.json` and `summary.md`: the mean and
sample standard deviation (ddof=1) of every scalar of the seeds' `evaluate/metrics.json`, printed.
"""


def run_seed(run: RunDir, config: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Seed `seed`'s stages after mining (reused when finished); its metrics."""
    child_config = seed_config(config, seed)
    child = RunDir(child_config.run_dir)
    if seed_finished(child_config):
        print(f"== seed {seed}: finished, reused ({child.path()}) ==", flush=True)
        return read_metrics(child)
    child.write_config(child_config)
    copied = copy_shared(run, child, child_config)
    print(f"== seed {seed}: {child.path()}, copied from the run: {copied or 'nothing'} ==")
    options = argparse.Namespace(start=None, only=None, force=False)
    ran = run_pipeline(child_config, options)
    print(summary(child, ran), flush=True)
    return read_metrics(child)


def prepare_repeat(run_dir: str, seeds: list[int], overrides: Sequence[str]) -> ExperimentConfig:
    """The run's config with `overrides`, once every seed can share its finished mining."""
    check_run_dir(run_dir)
    run = RunDir(run_dir)
    config = run.read_config(overrides).model_copy(update={"run_dir": run.uri})
    if EVALUATE not in needed(config):
        raise ValueError(f"{run.uri}: no evaluate stage (no val split with ground truth) to repeat")
    for seed in seeds:
        check_shared(run, config, seed_config(config, seed))
    return config


def repeat_main(argv: Sequence[str] | None = None) -> int:
    """`maskdistill repeat`, this runner's second entry point (`REPEAT_DOC`)."""
    parser = argparse.ArgumentParser(
        prog="maskdistill repeat",
        description=REPEAT_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory whose stages through mining are done")
    parser.add_argument(
        "--seeds", default="1,2,3,4,5", help="comma-separated seeds (default: the paper's 5 runs)"
    )
    add_set_arg(parser, "a key of the run's config for every seed")
    parser.add_argument(
        "--verbose", action="store_true", help="print Ray's and the libraries' output here too"
    )
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        config = prepare_repeat(args.run_dir, seeds, args.overrides)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    run = RunDir(config.run_dir)
    log = console.setup(console.log_dir_for(run.uri), verbose=args.verbose)
    if log is not None:
        print(f"log: {log} (Ray's and the libraries' output; --verbose prints it here)")
    per_seed = {seed: run_seed(run, config, seed) for seed in seeds}
    table = write_summary(run, per_seed)
    print(f"\n{len(seeds)} seeds, mean and sample std (ddof=1) -> {run.path('repeats')}")
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config, args = start(__doc__, argv, extra=add_arguments)
    ran = run_pipeline(config, args)
    run = RunDir(config.run_dir)
    print(summary(run, ran))
    if table := table1(run):
        print()
        print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
