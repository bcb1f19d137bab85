"""The stage contract: names and order, what decides each stage's result, and where a run stands.

A stage's hash covers the config keys that decide its result (never a section's `resources`:
workers, CPUs, GPUs, actors, loader threads, inference batch sizes), for the segmenter the
merges and background clusters of the run's names.yaml (`maskdistill.names`), and the hashes
of the stages whose output it reads, so a change anywhere upstream marks every later stage
stale and nothing earlier. Where each stage's output lives and how to read it:
`maskdistill.outputs`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from maskdistill import storage
from maskdistill.config import ExperimentConfig
from maskdistill.engine import CHECKPOINT
from maskdistill.names import NAMES_YAML, run_grouping
from maskdistill.rundir import Fingerprint, RunDir, StageState, read_record, stage_state

DATA, PRETRAIN, MINE, CLUSTER = "data", "pretrain", "mine", "cluster"
DETECTOR, DISTILL, SEGMENTER, EVALUATE = "detector", "distill", "segmenter", "evaluate"
REFINE = "refine"
PRETRAINED = "pretrain"  # backbone.weights: mine with this run's own DINO pretraining


@dataclass(frozen=True)
class Stage:
    """One stage: the config keys that decide its result and the stages whose output it reads."""

    name: str
    keys: tuple[str, ...]
    inputs: tuple[str, ...]
    does: str
    key_metric: str | None = None
    reads_names: bool = False  # names.yaml's merges and background decide its labels


PIPELINE = (
    Stage(DATA, ("data",), (), "index every split: sizes, unreadable files, previews"),
    Stage(
        PRETRAIN,
        ("data", "backbone.arch", "pretrain", "seed"),
        (),
        "DINO self-distillation of the ViT on the train split (backbone.weights: pretrain)",
        "loss_dino",
    ),
    Stage(
        MINE,
        (
            "data",
            "backbone",
            "mining",
            "clustering.feature",
            "clustering.view_size",
            "clustering.backbone",
            "clustering.crop",
            # the splits it mines besides train and val (`outputs.mined_splits`)
            "clustering.support_split",
            "detector.train_splits",
            "evaluation.mask_ap_split",
        ),
        (PRETRAIN,),
        "Sec 3.2: one object mask and CLS feature per image",
    ),
    Stage(CLUSTER, ("clustering",), (MINE,), "Sec 3.2: K-means pseudo classes", "clusters"),
    Stage(DETECTOR, ("detector", "seed"), (CLUSTER,), "Sec 3.2 Eq 3: Mask R-CNN", "loss_mask"),
    Stage(DISTILL, ("pseudo_labels",), (DETECTOR,), "Sec 3.3: confident masks (tau)"),
    Stage(
        SEGMENTER,
        ("segmenter", "seed"),
        (DISTILL, DETECTOR),
        "Sec 3.3 Eq 4: DeepLab-v3",
        "loss_seg",
        reads_names=True,
    ),
    Stage(
        REFINE,
        ("self_training", "crf", "segmenter", "seed"),
        (SEGMENTER, DISTILL),
        "S1, Table 2 +CRF: dense CRF over the train predictions, segmenter retrained, per round",
        "loss_seg",
    ),
    Stage(
        EVALUATE,
        ("evaluation", "crf", "seed"),  # the seed draws the linear probe's batches
        (CLUSTER, DISTILL, SEGMENTER, REFINE),  # refine only when it is on
        "Sec 4.1: Table 1, mask AP, pictures",
        "miou + DeepLab-v3",
    ),
)
STAGES = {stage.name: stage for stage in PIPELINE}
NAMES = tuple(STAGES)


def pretrain_wanted(config: ExperimentConfig) -> bool:
    """Whether the mining backbone is this run's own pretraining (stage `pretrain` runs)."""
    return config.backbone.weights == PRETRAINED


def evaluation_wanted(config: ExperimentConfig) -> bool:
    """Whether the run has a val split with ground truth to score (an image folder has none)."""
    return config.data.val_split is not None and config.data.kind != "folder"


def refine_wanted(config: ExperimentConfig) -> bool:
    """Whether CRF self-training runs (stage `refine`): self_training.rounds > 0."""
    return config.self_training.rounds > 0


OFF = {  # why a stage is not part of a config
    PRETRAIN: "it runs only with backbone.weights: pretrain",
    REFINE: "it runs only with self_training.rounds > 0",
    EVALUATE: "it needs data.val_split with ground truth; an image folder has none",
}


def needed(config: ExperimentConfig) -> list[str]:
    """The stages of this config in pipeline order: `pretrain` and `refine` only when they are
    wanted, `evaluate` only with ground truth to score."""
    wanted = {
        PRETRAIN: pretrain_wanted(config),
        REFINE: refine_wanted(config),
        EVALUATE: evaluation_wanted(config),
    }
    return [name for name in NAMES if wanted.get(name, True)]


def fingerprints(config: ExperimentConfig) -> dict[str, Fingerprint]:
    """Every needed stage's fingerprint, in pipeline order; each hash chains its inputs'."""
    done: dict[str, Fingerprint] = {}
    for name in needed(config):
        stage = STAGES[name]
        science = config.science(*stage.keys)
        if stage.reads_names and (grouping := run_grouping(config.run_dir)):
            science[NAMES_YAML] = grouping  # names alone leave the hash as it is
        upstream = {i: done[i].config_hash for i in stage.inputs if i in done}
        text = json.dumps({"science": science, "upstream": upstream}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        done[name] = Fingerprint(name, digest, science, upstream)
    return done


def fingerprint(config: ExperimentConfig, name: str) -> Fingerprint:
    """One stage's fingerprint; ValueError naming the stages when it is not needed or unknown."""
    prints = fingerprints(config)
    if name not in prints:
        off = f" ({OFF[name]})" if name in OFF else ""
        raise ValueError(f"stage {name!r} is not part of this config{off}; stages: {list(prints)}")
    return prints[name]


def stage_hashes(config: ExperimentConfig) -> dict[str, str]:
    """Stage name -> hash of what decides its result, in pipeline order."""
    return {name: fp.config_hash for name, fp in fingerprints(config).items()}


@dataclass(frozen=True)
class StageReport:
    """Where one stage of a run stands and what `pipeline` would do with it next."""

    stage: str
    state: StageState
    config_hash: str
    action: str
    reason: str


ACTIONS = {"done": "reuse", "partial": "resume", "stale": "rerun", "missing": "run"}


def run_status(run: RunDir, config: ExperimentConfig) -> list[StageReport]:
    """Each needed stage: done / partial / stale / missing, and why `pipeline` would act so."""
    reports = []
    for name, fp in fingerprints(config).items():
        state = stage_state(run, fp)
        reason = {
            "done": "finished with this config",
            "partial": f"interrupted; {progress(run, name)}",
            "stale": stale_reason(run, fp),
            "missing": "no output yet",
        }[state]
        reports.append(StageReport(name, state, fp.config_hash, ACTIONS[state], reason))
    return reports


def stale_reason(run: RunDir, fp: Fingerprint) -> str:
    """Which keys changed (old -> new) or which input stage did, against the stage's record."""
    record = read_record(run, fp.stage) or {}
    old_science: dict[str, Any] = record.get("science") or {}
    if not old_science:
        return f"made with config {record.get('config_hash')}; no record of its keys"
    changed = [
        f"{key}: {_short(old_science.get(key))} -> {_short(value)}"
        for key, value in fp.science.items()
        if old_science.get(key) != value
    ]
    changed += [f"{key}: removed" for key in old_science if key not in fp.science]
    old_inputs: dict[str, str] = record.get("upstream") or {}
    inputs = [
        s
        for s in sorted(set(fp.upstream) | set(old_inputs))
        if fp.upstream.get(s) != old_inputs.get(s)
    ]
    parts = changed + [f"input stage {s} changed" for s in inputs]
    return "; ".join(parts) or "made with another config"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def progress(run: RunDir, stage: str) -> str:
    """How far an interrupted stage got: finished Parquet parts, or its latest checkpoint
    (`refine`: in its latest round)."""
    names = [f.split("/") for f in storage.list_tree(run.uri_of(stage))]
    rounds = sorted(int(n[0][6:]) for n in names if re.fullmatch(r"round_\d+", n[0]))
    if stage == REFINE and rounds:
        last = [n[1:] for n in names if n[0] == f"round_{rounds[-1]}"]
        if ["model.pt"] in last:
            return f"rounds 0-{rounds[-1]} finished, the next one starts"
        return f"in round {rounds[-1]}: {_progress_of(last)}"
    return _progress_of(names)


def _progress_of(names: list[list[str]]) -> str:
    parts = sum(1 for n in names if n[-1].startswith("part-") and n[-1].endswith(".parquet"))
    iterations = [
        int(found.group(1))
        for n in names
        if n[0] == "checkpoints" and (found := CHECKPOINT.match(n[-1]))
    ]
    if iterations:
        return f"resumes from the checkpoint at iteration {max(iterations)}"
    if parts:
        return f"{parts} finished parts are kept"
    return "nothing finished to keep yet"


def status_table(reports: list[StageReport]) -> str:
    """One row per stage: state, hash, next action and why."""
    lines = [f"{'stage':<10} {'state':<8} {'hash':<16}  next    why"]
    for r in reports:
        lines.append(f"{r.stage:<10} {r.state:<8} {r.config_hash:<16}  {r.action:<6}  {r.reason}")
    return "\n".join(lines)
