"""`maskdistill` command line: validate configs and run the stages that exist."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from maskdistill.config import ConfigError, ExperimentConfig, load_config
from maskdistill.data import build_dataset
from maskdistill.data.index import index_split
from maskdistill.rundir import RunDir, StageManifest, stage_run, stage_status


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set mining.top_k=0.3 (repeatable; value parsed as YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("config", help="print the resolved, validated config")
    _config_args(show)
    data = commands.add_parser("data", help="index the train/val splits and draw previews")
    _config_args(data)
    data.add_argument("--preview", type=int, default=8, help="images in each preview picture")
    data.add_argument("--force", action="store_true", help="rerun even when already complete")
    pipeline = commands.add_parser("pipeline", help="run every stage, skipping finished ones")
    _config_args(pipeline)
    pipeline.add_argument("--force", action="store_true", help="rerun every stage")
    return parser


def run_data_stage(
    config: ExperimentConfig, *, preview: int = 8, force: bool = False
) -> StageManifest | None:
    """Index every split of the data set; None when already complete for this config."""
    run = RunDir(config.run_dir)
    config_hash = config.section_hash("data")
    if not force and stage_status(run, "data", config_hash) == "complete":
        print(f"data: complete for config {config_hash}, skipped")
        return None
    splits = [s for s in (config.data.train_split, config.data.val_split) if s is not None]
    with stage_run(run, "data", config_hash) as manifest:
        for split in dict.fromkeys(splits):
            index_split(build_dataset(config.data, split), split, run, manifest, preview=preview)
    print(
        f"data: {manifest.outputs}/{manifest.inputs} images readable, "
        f"{len(manifest.skipped)} skipped {manifest.skip_counts or ''} -> {run.path('data')}"
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config.to_yaml(), end="")
        return 0
    RunDir(config.run_dir).write_config(config)
    run_data_stage(config, preview=getattr(args, "preview", 8), force=args.force)
    return 0
