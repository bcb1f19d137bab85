"""What every Ray driver shares: the config flags, the console, joining (or starting) Ray.

The console holds the project's lines (stages, bars, warnings, tables, errors); Ray's own output
goes to the run's log (`maskdistill.console`): `<run_dir>/logs/driver.log` (the driver's
logging and stderr) and `<run_dir>/logs/ray` (a link to the Ray session's logs: workers,
Ray Data, Ray Train) when Ray runs on this machine. `--verbose` prints all of it as Ray does.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.data

from maskdistill import console
from maskdistill.config import ConfigError, ExperimentConfig, add_config_args, load_config
from maskdistill.rundir import RunDir, StageManifest, execute
from maskdistill.stages import fingerprint


def connect(**init_kwargs: object) -> None:
    """Join the cluster a `ray job submit` driver runs on (RAY_ADDRESS), else start Ray here.

    Authentication follows RAY_AUTH_MODE, which Ray reads when it is imported, so it is set by
    whoever starts the process (Makefile, tests, cluster setup): `token` everywhere in this
    project; an in-process cluster then keeps its token in ~/.ray/auth_token.

    Unless `--verbose`: workers' output is not sent to this console (it stays in the session's
    logs), Ray Data draws no bars of its own (in a file it logs its progress to the log), and
    Ray's loggers write to the driver log.
    """
    if console.quiet():
        init_kwargs.setdefault("log_to_driver", False)
        # On a terminal Ray Data would draw its own bars; elsewhere it logs them (to the file)
        ray.data.DataContext.get_current().enable_progress_bars = not sys.stdout.isatty()
        console.quiet_loggers()
    if not ray.is_initialized():
        ray.init(**init_kwargs)  # type: ignore[arg-type]
    if console.quiet():
        console.quiet_loggers()
        _published_errors_to_log()
        _link_session_logs()


# What Ray publishes that a user can act on: an unschedulable request, memory pressure
_SHOWN = re.compile(r"cannot be scheduled|infeasible|out of memory|OutOfMemory", re.IGNORECASE)


def _published_errors_to_log() -> None:
    """Ray's driver prints the errors the cluster publishes (a task retried, a worker killed, a
    request that cannot be scheduled) to stdout from a thread of its own, whatever log_to_driver
    says (`ray._private.worker.listen_error_messages` -> `print_to_stdstream`, Ray 2.60). Quiet,
    they go to the driver log; those about resources also to the console, as one warning line."""
    module = ray._private.worker
    original = getattr(module, "print_to_stdstream", None)
    if original is None or getattr(original, "maskdistill", False):
        return
    log = logging.getLogger("ray.published")

    def to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        if not console.quiet():
            original(data, ignore_prefix)
            return
        for line in data.get("lines", []):
            log.warning("(%s) %s", data.get("pid", ""), line)
            if _SHOWN.search(line):
                print(f"warning: Ray: {line.strip().splitlines()[0][:300]}", flush=True)

    to_log.maskdistill = True  # type: ignore[attr-defined]
    module.print_to_stdstream = to_log


def _link_session_logs() -> None:
    """`<log dir>/ray` -> this machine's Ray session logs (best effort: a private Ray API)."""
    path = console.log_path()
    node = getattr(ray._private.worker, "_global_node", None)
    logs = getattr(node, "get_logs_dir_path", lambda: None)()
    if path is None or not isinstance(logs, str) or not os.path.isdir(logs):
        return
    link = os.path.join(os.path.dirname(path), "ray")
    try:
        if os.path.islink(link):
            if os.readlink(link) == logs:
                return
            os.remove(link)
        os.symlink(logs, link)
    except OSError:
        pass
    logging.getLogger(__name__).info("Ray session logs: %s", logs)


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
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print Ray's and the libraries' output here too (else: <run_dir>/logs/driver.log)",
    )
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
    log = console.setup(console.log_dir_for(run.uri), verbose=args.verbose)
    if log is not None:
        print(f"log: {log} (Ray's and the libraries' output; --verbose prints it here)")
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
