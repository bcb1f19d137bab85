"""The stages after mining once per seed (A.4: "the average over 5 different runs"), then the mean
and std of every metric.

    maskdistill repeat runs/pascal --seeds 1,2,3,4,5 [--set detector.resources.num_workers=8]

Each seed is a run directory of its own, `RUN_DIR/repeats/seed_N/` (`maskdistill.repeats`): the
run's config with `seed` and `clustering.seed` set to N, the run's data and mine stages copied in
(never mined again), then every later stage of the pipeline (cluster, detector, distill,
segmenter, ..., evaluate). A finished seed is reused; an interrupted one resumes like any
pipeline. `--set` changes keys of the run's config for every seed (resources, say; a key that
changes mining is refused). Last, `RUN_DIR/repeats/summary.json` and `summary.md`: the mean and
sample standard deviation (ddof=1) of every scalar of the seeds' `evaluate/metrics.json`, printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from jobs import pipeline
from maskdistill import console
from maskdistill.config import ExperimentConfig, add_set_arg
from maskdistill.outputs import read_metrics
from maskdistill.repeats import (
    check_shared,
    copy_shared,
    parse_seeds,
    seed_config,
    seed_finished,
    write_summary,
)
from maskdistill.rundir import RunDir, check_run_dir
from maskdistill.stages import EVALUATE, needed


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
    ran = pipeline.run_pipeline(child_config, options)
    print(pipeline.summary(child, ran), flush=True)
    return read_metrics(child)


def prepare(run_dir: str, seeds: list[int], overrides: Sequence[str]) -> ExperimentConfig:
    """The run's config with `overrides`, once every seed can share its finished mining."""
    check_run_dir(run_dir)
    run = RunDir(run_dir)
    config = run.read_config(overrides).model_copy(update={"run_dir": run.uri})
    if EVALUATE not in needed(config):
        raise ValueError(f"{run.uri}: no evaluate stage (no val split with ground truth) to repeat")
    for seed in seeds:
        check_shared(run, config, seed_config(config, seed))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskdistill repeat",
        description=__doc__,
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
        config = prepare(args.run_dir, seeds, args.overrides)
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


if __name__ == "__main__":
    raise SystemExit(main())
