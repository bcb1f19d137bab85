"""`maskdistill` command line: validate configs and run the stages, alone or as a pipeline.

Stages that need Ray (`mine`, `cluster`, `pipeline`) import it only when called.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from maskdistill.config import ConfigError, load_config

RAY_COMMANDS = {
    "pretrain": "jobs.pretrain",
    "mine": "jobs.mine",
    "cluster": "jobs.cluster",
    "train-detector": "jobs.train_detector",
    "distill": "jobs.distill",
    "train-segmenter": "jobs.train_segmenter",
    "pipeline": "jobs.pipeline",
    "evaluate": "jobs.evaluate",
    "demo": "jobs.demo",
    "serve": "serve.app",
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
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
    add_config_args(show)
    data = commands.add_parser("data", help="index the train/val splits and draw previews")
    add_config_args(data)
    data.add_argument("--preview", type=int, default=8, help="images in each preview picture")
    data.add_argument("--force", action="store_true", help="rerun even when already complete")
    for name, help_text in (
        ("pretrain", "DINO self-distillation of the ViT on the train split (Ray Train)"),
        ("mine", "Sec 3.2: mine one object mask per image (Ray Data)"),
        ("cluster", "Sec 3.2: K-means on the mined objects' features"),
        ("train-detector", "Sec 3.2: distill a Mask R-CNN on the clustered masks (Ray Train)"),
        ("distill", "Sec 3.3: confident detector masks -> pseudo-label maps (Ray Data)"),
        ("train-segmenter", "Sec 3.3 Eq 4: DeepLab-v3 on the pseudo labels (Ray Train)"),
        ("evaluate", "Sec 4.1, A.2-A.4: Table 1 mIoU, mask AP, pictures on the val split"),
        ("pipeline", "every stage in order, skipping finished ones (--from, --only)"),
        ("demo", "the pipeline on synthetic scenes, then one query to the HTTP service"),
        ("predict", "label PNGs for a folder / URI of images (no Ray)"),
        ("serve", "HTTP segmentation service for a trained run (Ray Serve)"),
    ):
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        from maskdistill.predict import main as predict

        return predict(argv[1:])
    if argv and argv[0] in RAY_COMMANDS:
        job = importlib.import_module(RAY_COMMANDS[argv[0]])
        return int(job.main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config.to_yaml(), end="")
        return 0
    from maskdistill.data.index import run_stage
    from maskdistill.rundir import RunDir

    RunDir(config.run_dir).write_config(config)
    run_stage(config, preview=args.preview, force=args.force)
    return 0
