"""`maskdistill` command line: validate configs, see where a run stands, run the stages.

Commands that need Ray (the stage drivers in `jobs/`, `serve`) import it only when called;
`config`, `status`, `predict`, `export`, `export-labels`, `clusters` and `report` never do.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from maskdistill.config import ConfigError, ExperimentConfig, add_config_args, load_config
from maskdistill.rundir import RunDir, check_run_dir

DRIVERS = {
    "data": "jobs.data",
    "pretrain": "jobs.pretrain",
    "mine": "jobs.mine",
    "cluster": "jobs.cluster",
    "train-detector": "jobs.train_detector",
    "distill": "jobs.distill",
    "train-segmenter": "jobs.train_segmenter",
    "refine": "jobs.refine",
    "pipeline": "jobs.pipeline",
    "repeat": "jobs.pipeline:repeat_main",
    "evaluate": "jobs.evaluate",
    "demo": "jobs.demo",
    "serve": "serve.app",
}
HELP = {
    "data": "index the train/val splits and draw previews",
    "pretrain": "DINO self-distillation of the ViT on the train split (Ray Train)",
    "mine": "Sec 3.2: mine one object mask per image (Ray Data)",
    "cluster": "Sec 3.2: K-means on the mined objects' features",
    "train-detector": "Sec 3.2: distill a Mask R-CNN on the clustered masks (Ray Train)",
    "distill": "Sec 3.3: confident detector masks -> pseudo-label maps (Ray Data)",
    "train-segmenter": "Sec 3.3 Eq 4: DeepLab-v3 on the pseudo labels (Ray Train)",
    "refine": "S1, Table 2 +CRF: CRF self-training rounds (self_training.rounds; Ray)",
    "evaluate": "Sec 4.1, A.2-A.4: Table 1 mIoU, mask AP, pictures on the val split",
    "pipeline": "every stage in order, skipping finished ones (--from, --only)",
    "repeat": "A.4: the stages after mining per --seeds, mean and std of every metric",
    "demo": "the pipeline on synthetic scenes, then one query to the HTTP service",
    "serve": "HTTP segmentation service for a trained run (Ray Serve)",
    "predict": "label PNGs for a folder / URI of images (no Ray)",
    "export": "release a trained run: safetensors, model card, --onnx, --torchscript (no Ray)",
    "export-labels": "pseudo labels (--stage mine|distill) as COCO JSON for CVAT etc. (no Ray)",
    "clusters": "a run's clusters and names; --k sweeps K, --init-names writes names.yaml (no Ray)",
    "report": "the run's Tables 1-3 beside the paper's values, into RUN_DIR/report.md (no Ray)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("config", help="print the resolved, validated config")
    add_config_args(show)
    status = commands.add_parser(
        "status",
        help="per stage: done / partial / stale / missing, its hash, what `pipeline` would do",
        description="Where a run stands against a config (by default the run's own "
        "config.yaml; --set changes keys of it). Reads the run directory only.",
    )
    status.add_argument("run_dir", help="run directory (local path or URI)")
    add_config_args(status)
    for name, help_text in HELP.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        from maskdistill.predict import main as predict

        return predict(argv[1:])
    if argv and argv[0] == "export":
        from maskdistill.export import main as export

        return export(argv[1:])
    if argv and argv[0] == "export-labels":
        from maskdistill.labels_export import main as export_labels

        return export_labels(argv[1:])
    if argv and argv[0] == "clusters":
        from maskdistill.clusters import main as clusters

        return clusters(argv[1:])
    if argv and argv[0] == "report":
        from maskdistill.report import main as report

        return report(argv[1:])
    if argv and argv[0] in DRIVERS:
        module, _, entry = DRIVERS[argv[0]].partition(":")  # "module[:function]", else main
        job = importlib.import_module(module)
        return int(getattr(job, entry or "main")(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            return show_status(args.run_dir, args.config, args.overrides)
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(config.to_yaml(), end="")
    return 0


def show_status(run_dir: str, path: str | None, overrides: Sequence[str]) -> int:
    """Print the run's stage table against the config; 1 when it is not a run directory."""
    from maskdistill.stages import run_status, status_table

    try:
        check_run_dir(run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    run = RunDir(run_dir)
    config = run_config(run, path, overrides)
    print(f"run {run.uri} against {path or 'its config.yaml'}")
    print(status_table(run_status(run, config)))
    return 0


def run_config(run: RunDir, path: str | None, overrides: Sequence[str]) -> ExperimentConfig:
    """`path` with `overrides`, else the run's own config.yaml with them; run_dir is the run."""
    config = run.read_config(overrides) if path is None else load_config(path, overrides)
    return config.model_copy(update={"run_dir": run.uri})
