"""Stage `distill` (Sec 3.3): the trained Mask R-CNN labels every image; confident masks only.

    python -m jobs.distill --config configs/pascal.yaml --set pseudo_labels.resources.concurrency=8

Ray Data runs the detector in an actor pool (`pseudo_labels.resources`, bf16 on GPU) over
the train and val images. Each image keeps its candidates with score > `pseudo_labels.tau`, or
its single most confident one when none passes (Sec 4.1), merged into a semantic map where the
most confident mask wins. Parts `run_dir/distill/<split>/part-NNNNN.parquet` hold, per image, the
label map as a PNG, the kept count, and every candidate (RLE, box, score, class) for mask AP.
Last, the train split's kept masks are drawn into `distill/gallery/` (`maskdistill.gallery`),
the cluster gallery again after the detector: per class its highest- and lowest-scoring kept
masks as `cluster_NNN.png`, a contact sheet, `index.html` and `gallery.json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from jobs.common import execute_stage, stage_main
from jobs.sharded import ShardedMap, run_sharded, with_results
from maskdistill.config import ExperimentConfig
from maskdistill.detector import predict
from maskdistill.gallery import write_distill_gallery
from maskdistill.inference import load_detector
from maskdistill.masks import encode_rle
from maskdistill.outputs import PSEUDO_SCHEMA, distilled_splits, pseudo_folder
from maskdistill.pseudolabels import encode_label_map, pseudo_label
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import DISTILL

STAGE = DISTILL


class Distiller:
    """GPU actor: the detector stays loaded; each batch gives candidates and pseudo labels."""

    def __init__(self, config: ExperimentConfig) -> None:
        res = config.pseudo_labels.resources
        torch.set_num_threads(math.ceil(res.num_cpus))
        use_gpu = res.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.bf16 = use_gpu and config.detector.precision == "bf16"
        self.model = load_detector(config.run_dir, device=self.device, config=config)
        self.labels = config.pseudo_labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        readable = [i for i, reason in enumerate(batch["reason"]) if not reason]
        images = [
            torch.from_numpy(np.ascontiguousarray(batch["image"][i].transpose(2, 0, 1)))
            .to(self.device)
            .float()
            .div_(255)
            for i in readable
        ]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            candidates = predict(self.model, images) if images else []
        results: list[dict[str, Any] | None] = [None] * len(batch["image_id"])
        for i, found in zip(readable, candidates, strict=True):
            label = pseudo_label(
                found.masks,
                found.scores,
                found.classes,
                tau=self.labels.tau,
                keep_best_when_none=self.labels.keep_best_when_none,
            )
            results[i] = {
                "height": label.label_map.shape[0],
                "width": label.label_map.shape[1],
                "label_png": encode_label_map(label.label_map),
                "kept": label.kept,
                "best_score": label.best_score,
                "candidate_rle": [encode_rle(m)["counts"] for m in found.masks],
                "candidate_bbox": found.boxes.tolist(),
                "candidate_score": found.scores.tolist(),
                "candidate_class": found.classes.tolist(),
            }
        return with_results(batch, results)


def _pseudo_row(image_id: str, out: dict[str, Any]) -> dict[str, object]:
    return {"image_id": image_id, **out["result"]}


def distill_split(
    config: ExperimentConfig, run: RunDir, split: str, manifest: StageManifest
) -> None:
    spec = ShardedMap(
        data=config.data,
        split=split,
        folder=pseudo_folder(split),
        shard_size=config.pseudo_labels.shard_size,
        actor=Distiller,
        to_row=_pseudo_row,
        resources=config.pseudo_labels.resources,
        schema=PSEUDO_SCHEMA,
        actor_kwargs={"config": config},
        desc=STAGE,
    )
    run_sharded(run, spec, manifest)


def run_stage(config: ExperimentConfig, *, force: bool = False) -> StageManifest | None:
    """Pseudo labels for the train and val images; None when already complete."""

    def distill_all(manifest: StageManifest) -> None:
        for split in distilled_splits(config):
            distill_split(config, run, split, manifest)
        write_distill_gallery(config, run)

    run = RunDir(config.run_dir)
    return execute_stage(config, STAGE, distill_all, force=force)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, argv, run_stage)


if __name__ == "__main__":
    raise SystemExit(main())
