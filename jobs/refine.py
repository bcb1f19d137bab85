"""Stage `refine` (supplementary S1, Table 2 "+CRF"): CRF self-training rounds.

    python -m jobs.refine --config configs/pascal.yaml --set self_training.rounds=1 \
        --set self_training.resources.predictor.concurrency=8

Per round r (`maskdistill.refine`): Ray Data decodes the train images, an actor pool holds the
current segmenter (`self_training.resources.predictor`, one per GPU) and sends its logits at
output stride, CPU tasks (`self_training.resources`: one core each, the CRF is single-threaded)
upsample them, run the dense CRF (`crf:`) and write the refined label maps as Parquet parts
`refine/round_r/labels/part-NNNNN.parquet`, shard by shard; then Ray Train retrains the
segmenter on them with its recipe (`jobs.segmenter_training`), checkpoints and weights under
`refine/round_r/`. An interrupted stage resumes in the round it reached: finished shards and
a round's model.pt are kept, training restarts from its latest checkpoint. The last round's
model is what the evaluation scores. Unreadable images are counted with reasons in the
manifest; metrics per round: `round_r changed` (share of pixels the CRF relabelled) and the
round's last `loss_seg`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from jobs.common import stage_main
from jobs.segmenter_training import train_on
from jobs.sharded import ShardedMap, objects, run_sharded, with_results
from jobs.training import stage_runner
from maskdistill.config import CRFConfig, ExperimentConfig
from maskdistill.engine import MetricsLog
from maskdistill.inference import Segmenter
from maskdistill.outputs import (
    MODEL_FILE,
    REFINED_SCHEMA,
    read_refined,
    refine_round,
    refined_folder,
)
from maskdistill.pseudolabels import encode_label_map
from maskdistill.refine import (
    coarse_logits,
    predicting_folder,
    refine_image,
    round_config,
)
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import REFINE

STAGE = REFINE


class Predictor:
    """GPU actor: the round's segmenter stays loaded; each batch gains its coarse logits."""

    def __init__(self, config: ExperimentConfig, folder: str) -> None:
        res = config.self_training.resources.predictor
        torch.set_num_threads(math.ceil(res.num_cpus))
        use_gpu = res.num_gpus > 0 and torch.cuda.is_available()
        device = "cuda" if use_gpu else "cpu"
        self.segmenter = Segmenter.load(config.run_dir, device=device, config=config, folder=folder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        readable = [i for i, reason in enumerate(batch["reason"]) if not reason]
        found = coarse_logits(self.segmenter, [batch["image"][i] for i in readable])
        logits: list[np.ndarray | None] = [None] * len(batch["image_id"])
        for i, row in zip(readable, found, strict=True):
            logits[i] = row
        return {**batch, "logits": objects(logits)}


def crf_task(batch: dict[str, np.ndarray], settings: CRFConfig) -> dict[str, Any]:
    """CPU task: each readable image's refined label map (PNG bytes) and changed share."""
    torch.set_num_threads(1)  # one core per task: the CRF is single-threaded
    results: list[dict[str, Any] | None] = []
    for image, logits, reason in zip(batch["image"], batch["logits"], batch["reason"], strict=True):
        if reason:
            results.append(None)
            continue
        labels, changed = refine_image(image, logits, settings)
        results.append(
            {
                "height": labels.shape[0],
                "width": labels.shape[1],
                "label_png": encode_label_map(labels),
                "changed": changed,
            }
        )
    return with_results(batch, results)


def _refined_row(image_id: str, out: dict[str, Any]) -> dict[str, object]:
    return {"image_id": image_id, **out["result"]}


def label_round(config: ExperimentConfig, run: RunDir, round_index: int) -> StageManifest:
    """Round `round_index`'s refined train labels, resuming at the shards it has; its counts."""
    counts = StageManifest(stage=STAGE, config_hash="")
    spec = ShardedMap(
        data=config.data,
        split=config.data.train_split,
        folder=refined_folder(round_index),
        shard_size=config.self_training.shard_size,
        actor=Predictor,
        to_row=_refined_row,
        resources=config.self_training.resources.predictor,
        schema=REFINED_SCHEMA,
        actor_kwargs={"config": config, "folder": predicting_folder(round_index)},
        desc=f"{STAGE}:round_{round_index}",
        then=crf_task,
        then_kwargs={"settings": config.crf},
        then_resources=config.self_training.resources,
    )
    run_sharded(run, spec, counts)
    return counts


def last_losses(run: RunDir, folder: str) -> dict[str, float]:
    """The losses of the last logged iteration of a round's training."""
    steps = [r for r in MetricsLog(run.uri_of(folder, "log.jsonl")).read() if "event" not in r]
    return {k: float(v) for k, v in (steps[-1] if steps else {}).items() if k.startswith("loss")}


def fit(config: ExperimentConfig, manifest: StageManifest, hooks: Sequence[Any] = ()) -> None:
    """Every round in turn; a round with its model.pt is done and only counted."""
    run = RunDir(config.run_dir)
    training = round_config(config)
    for r in range(config.self_training.rounds):
        counts = label_round(config, run, r)
        folder = refine_round(r)
        if not run.exists(folder, MODEL_FILE):
            print(f"{STAGE}: round {r}: training the segmenter on the refined labels")
            train_on(training, folder=folder, labels=refined_folder(r), hooks=hooks)
        changed = read_refined(run, r, ["changed"]).column("changed")
        manifest.metrics[f"round_{r} changed"] = float(pc.mean(changed).as_py() or 0.0)
        losses = last_losses(run, folder)
        manifest.metrics.update({f"round_{r} {k}": v for k, v in losses.items()} | losses)
        manifest.inputs, manifest.outputs, manifest.skipped = (
            counts.inputs,
            counts.outputs,
            counts.skipped,
        )


run_stage = stage_runner(STAGE, fit)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
