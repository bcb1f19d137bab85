"""Ray Data over the image ids of one split, written as resumable Parquet shards.

CPU tasks decode images by id; a pool of actors (GPU models) turns each batch into one output
row per image; the driver writes every shard as soon as all of its images are back, so a rerun
after a crash only processes the shards without a part. Unreadable images are counted per
reason in the stage manifest and listed in `<stage>/skipped.parquet`. Rows are joined by
`image_id`, never by position.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from maskdistill.config import ActorResources, CRFResources, DataConfig
from maskdistill.console import Bar
from maskdistill.data import UnreadableImage, dataset_of
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.shards import (
    count_rows,
    finished_shards,
    iter_skipped,
    shard_ids,
    split_name,
    write_shard,
)

DECODE_BATCH = 16
DECODE_CPUS = 0.5


def objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array, even when the values are equal-shaped arrays."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def with_results(batch: dict[str, np.ndarray], results: list[Any]) -> dict[str, Any]:
    """A map's output batch: the ids, shards and skip reasons it was given, and one result per
    row (None for a skipped one), which `ShardedMap.to_row` turns into the part's rows."""
    keys = ("image_id", "shard", "reason")
    return {**{key: batch[key] for key in keys}, "result": objects(results)}


def decode(batch: dict[str, np.ndarray], data: DataConfig, split: str) -> dict[str, Any]:
    """CPU task: image ids -> RGB images; an unreadable one gets an empty image and a reason."""
    dataset = dataset_of(data, split)
    images, reasons = [], []
    for image_id in batch["image_id"]:
        try:
            images.append(dataset.load(str(image_id)).image)
            reasons.append("")
        except UnreadableImage as err:
            images.append(np.zeros((0, 0, 3), dtype=np.uint8))
            reasons.append(err.reason)
    return {
        "image_id": batch["image_id"],
        "shard": batch["shard"],
        "image": objects(images),
        "reason": np.array(reasons),
    }


@dataclass
class ShardedMap:
    """One split through an actor pool (`resources`: actors, their CPUs and GPUs, batch size)
    into `folder`/part-NNNNN.parquet of `schema`.

    The actor is constructed with `actor_kwargs` and called on batches holding `image_id`,
    `shard`, `image` and `reason` (empty for readable images); it returns the same keys minus
    `image`, plus its own columns, which `to_row(image_id, output_row)` turns into a row.
    With `then` (a function, `then_kwargs` its keyword arguments) the actor's batches go on
    to CPU tasks (`then_resources`: CPUs per task, tasks at once, images per task) whose
    output `to_row` reads instead: GPU models and CPU post-processing each at their own pace.
    """

    data: DataConfig
    split: str
    folder: str
    shard_size: int
    actor: type
    to_row: Callable[[str, dict[str, Any]], dict[str, object]]
    resources: ActorResources
    schema: pa.Schema
    actor_kwargs: dict[str, Any] = field(default_factory=dict)
    desc: str = "map"
    then: Callable[..., dict[str, Any]] | None = None
    then_kwargs: dict[str, Any] = field(default_factory=dict)
    then_resources: CRFResources | None = None


def run_sharded(run: RunDir, spec: ShardedMap, manifest: StageManifest) -> None:
    """Process every unfinished shard of the split, then account for all of them."""
    shards = shard_ids(dataset_of(spec.data, spec.split).image_ids(), spec.shard_size)
    done = finished_shards(run, spec.folder)
    pending = {i: ids for i, ids in enumerate(shards) if i not in done}
    if pending:
        _process(run, spec, pending)
    manifest.inputs += sum(len(ids) for ids in shards)
    manifest.outputs += count_rows(run, spec.folder)
    for entry in iter_skipped(run, spec.folder):  # spilled to skipped.parquet, shard by shard
        manifest.skip(entry["image_id"], entry["reason"])
    name = split_name(spec.split)
    manifest.metrics[f"{name}_shards"] = len(shards)
    manifest.metrics[f"{name}_shards_reused"] = len(done)


def shard_images(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard's row -> a row per image (the driver holds a row per shard, not per image)."""
    return [{"image_id": str(image_id), "shard": row["shard"]} for image_id in row["image_ids"]]


def _process(run: RunDir, spec: ShardedMap, pending: dict[int, list[str]]) -> None:
    items = [{"shard": i, "image_ids": ids} for i, ids in pending.items()]
    outputs = (
        ray.data.from_items(items)
        # fused with the decoding (same CPUs), so it waits for no CPU of its own
        .flat_map(shard_images, num_cpus=DECODE_CPUS)
        .map_batches(
            decode,  # type: ignore[arg-type]  # Ray's stub wants a one-argument function
            fn_kwargs={"data": spec.data, "split": spec.split},
            batch_size=DECODE_BATCH,
            num_cpus=DECODE_CPUS,
        )
        # Node loss: defaults redo it (actors max_restarts=max_task_retries=-1, tasks max_retries=3)
        .map_batches(
            spec.actor,
            fn_constructor_kwargs=spec.actor_kwargs,
            batch_size=spec.resources.batch_size,
            compute=ActorPoolStrategy(size=spec.resources.concurrency),
            num_cpus=spec.resources.num_cpus,
            num_gpus=spec.resources.num_gpus,
        )
    )
    if spec.then is not None:
        cpu = spec.then_resources or CRFResources()
        outputs = outputs.map_batches(
            spec.then,
            fn_kwargs=spec.then_kwargs,
            batch_size=cpu.batch_size,
            num_cpus=cpu.num_cpus,
            concurrency=cpu.concurrency,
        )
    # A batch redone after its actor or node died may deliver an image again: rows are kept
    # per shard by image_id, and a shard is written once each of its distinct images is back.
    missing = {shard: len(ids) for shard, ids in pending.items()}  # images not back yet
    rows: dict[int, dict[str, dict[str, object]]] = defaultdict(dict)
    skipped: dict[int, dict[str, dict[str, str]]] = defaultdict(dict)
    with Bar(f"{spec.desc}:{spec.split}", sum(missing.values()), "img") as progress:
        for out in outputs.iter_rows():
            shard, image_id = int(out["shard"]), str(out["image_id"])
            if shard not in missing or image_id in rows[shard] or image_id in skipped[shard]:
                continue  # a retried batch's duplicate; its shard may be written already
            missing[shard] -= 1
            if out["reason"]:
                skipped[shard][image_id] = {"image_id": image_id, "reason": str(out["reason"])}
            else:
                rows[shard][image_id] = spec.to_row(image_id, out)
            progress.update()
            if not missing[shard]:
                del missing[shard]
                done = list(rows.pop(shard, {}).values())
                unreadable = list(skipped.pop(shard, {}).values())
                write_shard(run, spec.folder, shard, done, unreadable, spec.schema)
    if missing:
        lost = sum(missing.values())
        raise RuntimeError(
            f"{spec.desc}:{spec.split}: {lost} images of shards {sorted(missing)} never came back"
        )
