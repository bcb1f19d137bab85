"""The run directory (local path or URI) and the stage manifests that make stages resumable."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
import yaml

from maskdistill import storage
from maskdistill.config import ExperimentConfig, apply_override, validate_config
from maskdistill.skips import SKIPPED_FILE, StageSkips, read_skipped_file

MANIFEST = "manifest.json"
ATTEMPT = "attempt.json"  # the fingerprint a stage's files under way belong to
STALE = "stale"  # stale stage output is moved under here, not deleted
TRACKED_PACKAGES = ("maskdistill", "torch", "torchvision", "timm", "numpy", "pyarrow", "ray")
StageState = Literal["done", "partial", "stale", "missing"]
CONFIG_FILE = "config.yaml"


def check_run_dir(uri: str) -> None:
    """FileNotFoundError naming `uri` unless it holds a run's config.yaml; creates nothing."""
    if not storage.is_file(f"{uri.rstrip('/')}/{CONFIG_FILE}"):
        raise FileNotFoundError(f"{uri}: not a run directory (no {CONFIG_FILE})")


class RunDir:
    """Files under one run directory, through pyarrow filesystems (local, s3://, gs://, ...)."""

    def __init__(self, uri: str) -> None:
        self.fs, self.root = storage.resolve(uri)
        self.uri = storage.absolute(uri)  # valid in any worker's cwd
        self.fs.create_dir(self.root, recursive=True)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list_names(self, *parts: str) -> list[str]:
        """Names of the files directly under the folder `parts`, sorted."""
        return storage.list_files(self.uri_of(*parts))

    def uri_of(self, *parts: str) -> str:
        """`parts` under the run directory as a URI (or local path) for `storage`."""
        return "/".join([self.uri.rstrip("/"), *parts])

    def read_bytes(self, *parts: str) -> bytes:
        return storage.read_bytes(self.uri_of(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write atomically (see `storage.write_bytes`); returns the written path."""
        storage.write_bytes(self.uri_of(*parts), data)
        return self.path(*parts)

    def remove(self, *parts: str) -> None:
        """Delete the folder `parts` and everything under it, if it exists."""
        if self.exists(*parts):
            self.fs.delete_dir(self.path(*parts))

    def move_aside(self, stage: str, tag: str) -> str:
        """Move the folder `stage` to `stale/<stage>-<tag>[-n]` (kept, not deleted); the new
        folder's path under the run directory."""
        name, n = f"{stage}-{tag}", 1
        while self.exists(STALE, name):
            n += 1
            name = f"{stage}-{tag}-{n}"
        storage.move_tree(self.uri_of(stage), self.uri_of(STALE, name))
        return f"{STALE}/{name}"

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def read_config(self, overrides: Sequence[str] = ()) -> ExperimentConfig:
        """The resolved config this run was started with (`config.yaml`), with `a.b=c`
        `overrides` applied, validated."""
        if not self.exists("config.yaml"):
            raise FileNotFoundError(f"{self.uri_of('config.yaml')}: not a run directory")
        raw = yaml.safe_load(self.read_bytes("config.yaml")) or {}
        for item in overrides:
            apply_override(raw, item)
        return validate_config(raw, source=self.uri_of("config.yaml"))

    def write_config(self, config: ExperimentConfig) -> str:
        """The resolved config and the code version it ran with, for reproducing the run."""
        self.write_json({"git_sha": git_sha(), "versions": package_versions()}, "provenance.json")
        return self.write_bytes(config.to_yaml().encode(), "config.yaml")


@dataclass(frozen=True)
class Fingerprint:
    """What decides a stage's result: its own config values (dotted key -> value, resources
    left out), the hashes of the stages it reads, and the hash of both (`maskdistill.stages`)."""

    stage: str
    config_hash: str
    science: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"config_hash": self.config_hash, "science": self.science, "upstream": self.upstream}


@dataclass
class StageManifest:
    """What a finished stage did: enough to decide whether it must run again."""

    stage: str
    config_hash: str
    science: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)
    moved_aside: str | None = None  # where the stale output of another config was put
    inputs: int = 0
    outputs: int = 0
    skipped: StageSkips = field(default_factory=StageSkips)  # counts and a sample; the list: a file
    metrics: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    seconds: float = 0.0
    git_sha: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def skip(self, image_id: str, reason: str) -> None:
        self.skipped.add(image_id, reason)

    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped inputs per reason, with file-specific details cut off after the first colon."""
        return self.skipped.counts


def write_manifest(run: RunDir, manifest: StageManifest) -> str:
    """`<stage>/skipped.parquet` (every skipped input, when there are any), then the manifest
    that marks the stage done, with the skips' counts and sample."""
    manifest.skipped.write(run.uri_of(manifest.stage, SKIPPED_FILE))
    body = {f.name: getattr(manifest, f.name) for f in fields(manifest)}
    return run.write_json(body | {"skipped": manifest.skipped.summary()}, manifest.stage, MANIFEST)


def read_manifest(run: RunDir, stage: str) -> StageManifest | None:
    """A finished stage's manifest (also one written before skipped.parquet, whose `skipped`
    was the whole list), or None."""
    if not run.exists(stage, MANIFEST):
        return None
    body = run.read_json(stage, MANIFEST)
    body.pop("skip_counts", None)  # kept beside the whole list before skipped.parquet
    return StageManifest(**body | {"skipped": StageSkips.from_record(body.get("skipped", []))})


def read_skipped_list(run: RunDir, stage: str) -> list[dict[str, str]]:
    """Every input a finished stage skipped, {image_id, reason} in the order it skipped them:
    from `<stage>/skipped.parquet` (or an older manifest's own list)."""
    if not run.exists(stage, MANIFEST):
        raise FileNotFoundError(f"{run.uri_of(stage, MANIFEST)}: stage {stage!r} has not finished")
    record = run.read_json(stage, MANIFEST).get("skipped", [])
    if isinstance(record, list):
        return list(record)
    return read_skipped_file(run.uri_of(stage, SKIPPED_FILE)) if record["total"] else []


def _records(run: RunDir, stage: str) -> dict[str, dict[str, Any]]:
    """The stage's manifest and attempt file, those that exist, each read once."""
    return {
        name: run.read_json(stage, name) for name in (MANIFEST, ATTEMPT) if run.exists(stage, name)
    }


def read_record(run: RunDir, stage: str) -> dict[str, Any] | None:
    """The fingerprint a stage's output was made with: its manifest, else its attempt file."""
    records = _records(run, stage)
    return records.get(MANIFEST, records.get(ATTEMPT))


def stage_state(run: RunDir, fp: Fingerprint) -> StageState:
    """'done' (finished with this fingerprint), 'partial' (interrupted with it, resumable),
    'stale' (output of another config) or 'missing'."""
    return _state(_records(run, fp.stage), fp)


def _state(records: dict[str, dict[str, Any]], fp: Fingerprint) -> StageState:
    if records.get(MANIFEST, {}).get("config_hash") == fp.config_hash:
        return "done"
    if records.get(ATTEMPT, {}).get("config_hash") == fp.config_hash:
        return "partial"
    return "stale" if records else "missing"


@contextmanager
def stage_run(run: RunDir, fp: Fingerprint) -> Iterator[StageManifest]:
    """Time a stage; its manifest is written only when the body finishes without error.

    Output of another config is moved aside first (`stale/`, noted in the manifest); output of
    an interrupted attempt with this fingerprint stays, for the stage to resume from.
    """
    moved = None
    records = _records(run, fp.stage)
    if _state(records, fp) == "stale":
        made_with = records.get(MANIFEST, records.get(ATTEMPT, {}))["config_hash"]
        moved = run.move_aside(fp.stage, str(made_with))
        print(f"{fp.stage}: output of another config moved to {run.path(moved)}")
    run.write_json(fp.record(), fp.stage, ATTEMPT)
    manifest = StageManifest(
        stage=fp.stage,
        config_hash=fp.config_hash,
        science=fp.science,
        upstream=fp.upstream,
        moved_aside=moved,
        started_at=time.time(),
    )
    begin = time.perf_counter()
    yield manifest
    manifest.seconds = round(time.perf_counter() - begin, 3)
    manifest.git_sha = git_sha()
    manifest.versions = package_versions()
    write_manifest(run, manifest)


def execute(
    run: RunDir,
    fp: Fingerprint,
    body: Callable[[StageManifest], None],
    *,
    force: bool = False,
) -> StageManifest | None:
    """Run `body` as stage `fp.stage` unless it is done for this fingerprint (None then); print
    a summary. `force` deletes the stage's earlier output first (stale output included)."""
    stage = fp.stage
    if force:
        run.remove(stage)
    elif stage_state(run, fp) == "done":
        print(f"{stage}: complete for config {fp.config_hash}, skipped")
        return None
    with stage_run(run, fp) as manifest:
        body(manifest)
    skips = f", {len(manifest.skipped)} skipped {manifest.skip_counts}" if manifest.skipped else ""
    print(
        f"{stage}: {manifest.outputs} outputs from {manifest.inputs} inputs{skips} "
        f"in {manifest.seconds:.1f} s -> {run.path(stage)}"
    )
    return manifest


def git_sha() -> str | None:
    """The commit of the running code, or None outside a git checkout (e.g. a Ray working dir)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
