"""What every Ray driver shares: the config flags and joining (or starting) a Ray cluster."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import ray

from maskdistill.config import ConfigError, ExperimentConfig, add_config_args, load_config
from maskdistill.rundir import RunDir, StageManifest, execute
from maskdistill.stages import fingerprint


def connect(**init_kwargs: object) -> None:
    """Join the cluster a `ray job submit` driver runs on (RAY_ADDRESS), else start Ray here.

    Authentication follows RAY_AUTH_MODE, which Ray reads when it is imported, so it is set by
    whoever starts the process (Makefile, tests, cluster setup): `token` everywhere in this
    project; an in-process cluster then keeps its token in ~/.ray/auth_token.
    """
    if not ray.is_initialized():
        ray.init(**init_kwargs)  # type: ignore[arg-type]


def start(
    description: str | None,
    argv: Sequence[str] | None,
    *,
    preview: int = 0,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[ExperimentConfig, argparse.Namespace]:
    """A driver's validated config (exit 2 naming the bad keys) and flags (`extra` adds its
    own); the resolved config is written into the run directory."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="rerun even when complete")
    if preview:  # the flag's default count
        parser.add_argument(
            "--preview", type=int, default=preview, help="images in the preview grid (0: none)"
        )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    run = RunDir(config.run_dir)
    config = config.model_copy(update={"run_dir": run.uri})  # workers may have another cwd
    run.write_config(config)
    return config, args


def stage_main(
    description: str | None,
    argv: Sequence[str] | None,
    run_stage: Callable[..., object],
    *,
    needs_ray: bool = True,
) -> int:
    """The command line of a one-stage driver: config flags, Ray when needed, the stage."""
    config, args = start(description, argv)
    if needs_ray:
        connect()
    run_stage(config, force=args.force)
    return 0


def execute_stage(
    config: ExperimentConfig,
    stage: str,
    body: Callable[[StageManifest], None],
    *,
    force: bool = False,
) -> StageManifest | None:
    """Run `body` as `stage` of the config's run unless it is done (None then): the stage's
    fingerprint comes from the contract (`maskdistill.stages`)."""
    return execute(RunDir(config.run_dir), fingerprint(config, stage), body, force=force)
