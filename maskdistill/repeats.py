"""Repeated runs of the stages after mining (A.4: "the average over 5 different runs").

Seed N of a run lives in `RUN_DIR/repeats/seed_N/`, a run directory of its own whose config is
the run's with `seed` and `clustering.seed` set to N. The stages up to mining (data, mine) are
the run's own, copied in once, so every seed clusters the same mined masks; the later stages
(cluster, detector, distill, segmenter, ..., evaluate) run per seed. The summary holds the mean
and the sample standard deviation (ddof=1) of every scalar in the seeds' `evaluate/metrics.json`.
Ray-free: `jobs/pipeline.py` (`repeat_main`) runs the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from maskdistill import storage
from maskdistill.config import ExperimentConfig, validate_config
from maskdistill.rundir import MANIFEST, RunDir, stage_state
from maskdistill.stages import CLUSTER, fingerprint, needed

REPEATS = "repeats"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
SEPARATOR = " / "  # between the levels of a flattened metric name (row names hold dots)


def parse_seeds(text: str) -> list[int]:
    """`1,2,3` -> [1, 2, 3]; ValueError naming the bad entry (not a non-negative integer, or
    given twice)."""
    seeds: list[int] = []
    for item in text.split(","):
        entry = item.strip()
        if not entry.isdigit():
            raise ValueError(f"--seeds {text!r}: {entry!r} is not a non-negative integer")
        if int(entry) in seeds:
            raise ValueError(f"--seeds {text!r}: seed {entry} is given twice")
        seeds.append(int(entry))
    return seeds


def seed_dir(run_uri: str, seed: int) -> str:
    """Where seed `seed` of the run at `run_uri` lives."""
    return f"{run_uri.rstrip('/')}/{REPEATS}/seed_{seed}"


def seed_config(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The run's config for seed `seed`: its own run directory, `seed` (detector, segmenter,
    probe) and `clustering.seed` (K-means) set to it; everything else as the run's."""
    raw = config.model_dump(mode="json")
    raw["run_dir"] = seed_dir(config.run_dir, seed)
    raw["seed"] = seed
    raw["clustering"]["seed"] = seed
    return validate_config(raw, source=f"{config.run_dir} seed {seed}")


def shared_stages(config: ExperimentConfig) -> list[str]:
    """The stages before clustering (data, [pretrain], mine): every seed reuses the run's."""
    names = needed(config)
    return names[: names.index(CLUSTER)]


def check_shared(run: RunDir, config: ExperimentConfig, child: ExperimentConfig) -> list[str]:
    """The shared stages, once each is done in the run and the seed's config would make the
    same (same fingerprint); ValueError naming the stage otherwise."""
    stages = shared_stages(config)
    for stage in stages:
        own = fingerprint(config, stage)
        if stage_state(run, own) != "done":
            raise ValueError(
                f"{run.uri}: stage {stage!r} is not complete for the run's config; run the "
                "pipeline through mining first (`maskdistill status` says why)"
            )
        if fingerprint(child, stage).config_hash != own.config_hash:
            raise ValueError(
                f"stage {stage!r} depends on `seed` (backbone.weights: pretrain seeds DINO), so "
                "seeds cannot share the run's mined masks; repeat a run whose backbone comes "
                "from a file or the hub"
            )
    return stages


def copy_shared(run: RunDir, child: RunDir, child_config: ExperimentConfig) -> list[str]:
    """Copy each shared stage the seed lacks from the run (its manifest last, so an interrupted
    copy is never taken for a finished stage); the stages copied."""
    copied = []
    for stage in shared_stages(child_config):
        if stage_state(child, fingerprint(child_config, stage)) != "done":
            child.remove(stage)
            storage.copy_tree(run.uri_of(stage), child.uri_of(stage), last=MANIFEST)
            copied.append(stage)
    return copied


def seed_finished(config: ExperimentConfig) -> bool:
    """Whether every stage of a seed's config is done (the seed is reused as it is)."""
    run = RunDir(config.run_dir)
    return all(stage_state(run, fingerprint(config, s)) == "done" for s in needed(config))


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in a metrics.json tree, by its path joined with " / "; lists (per-class
    IoU, the label mapping), strings and booleans are left out."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{SEPARATOR}{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(scalar_metrics(value, key))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def summarize(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; null with one value) of every scalar metric over the seeds
    that have it, with each seed's value (keyed by the seed as text, as in JSON), in the first
    seed's metric order."""
    flat = {seed: scalar_metrics(metrics) for seed, metrics in per_seed.items()}
    names = list(dict.fromkeys(name for values in flat.values() for name in values))
    summary: dict[str, Any] = {}
    for name in names:
        values = {str(seed): v[name] for seed, v in flat.items() if name in v}
        mean = math.fsum(values.values()) / len(values)
        squares = math.fsum((v - mean) ** 2 for v in values.values())
        std = math.sqrt(squares / (len(values) - 1)) if len(values) > 1 else None
        summary[name] = {"mean": mean, "std": std, "n": len(values), "values": values}
    return {"seeds": list(per_seed), "std": "sample standard deviation, ddof=1", "metrics": summary}


def summary_table(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: one row per metric, mean ± std, then each seed's value."""
    seeds = summary["seeds"]
    head = ["metric", "mean", "std (ddof=1)", *[f"seed {s}" for s in seeds]]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, row in summary["metrics"].items():
        std = "" if row["std"] is None else f"{row['std']:.4f}"
        values = row["values"]
        cells = [f"{values[str(s)]:.4f}" if str(s) in values else "" for s in seeds]
        lines.append("| " + " | ".join([name, f"{row['mean']:.4f}", std, *cells]) + " |")
    return "\n".join(lines)


def write_summary(run: RunDir, per_seed: Mapping[int, Mapping[str, Any]]) -> str:
    """`repeats/summary.json` and `summary.md`; returns the table."""
    summary = summarize(per_seed)
    table = summary_table(summary)
    run.write_json(summary, REPEATS, SUMMARY_JSON)
    run.write_bytes((table + "\n").encode(), REPEATS, SUMMARY_MD)
    return table
