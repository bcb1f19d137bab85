"""Does distilling a Mask R-CNN improve on the masks it is trained on? (Sec 3.2, Table 3)

    python benchmarks/detector_oracle.py runs/oracle [--set detector.max_iters=300 ...]

Replaces mining and clustering by an oracle with the same shape of output: one mask per image
(its largest ground-truth object) with its true class as the cluster. The detector stage and the
distill stage then run as in the pipeline (demo config plus overrides), and
`benchmarks/mask_quality.py` compares the training masks with the detector's candidates against
all ground-truth objects. With one mask per image of 2.5 objects on average, the training masks
cap recall; a detector that generalises finds the other objects too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs import distill, train_detector
from jobs.common import connect
from maskdistill.config import load_config
from maskdistill.data import build_dataset
from maskdistill.masks import encode_rle, mask_to_box
from maskdistill.outputs import (
    LABELED_SCHEMA,
    MASK_SCHEMA,
    labeled_path,
    mined_folder,
    write_table,
)
from maskdistill.rundir import RunDir, StageManifest, write_manifest
from maskdistill.shards import write_shard

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def oracle_rows(config, split: str) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    dataset = build_dataset(config.data, split)
    rows = []
    for image_id in dataset.image_ids():
        sample = dataset.load(image_id)
        areas = sample.instance_masks.sum((1, 2))
        largest = int(np.argmax(areas))
        mask = sample.instance_masks[largest]
        box = mask_to_box(mask)
        rows.append(
            {
                "image_id": image_id,
                "height": sample.height,
                "width": sample.width,
                "mask_rle": encode_rle(mask)["counts"],
                "bbox": list(box),
                "score": 1.0,
                "seed_patch": [0, 0],
                "seed_box": list(box),
                "feature": [],
                "cluster": int(sample.instance_classes[largest]) - 1,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(DEMO, [f"run_dir={Path(args.run_dir).resolve()}", *args.overrides])
    run = RunDir(config.run_dir)
    run.write_config(config)
    for split in (config.data.train_split, config.data.val_split):
        rows = oracle_rows(config, split)
        masks = [{k: r[k] for k in MASK_SCHEMA.names} for r in rows]
        write_shard(run, mined_folder(split), 0, masks, [], MASK_SCHEMA)
        write_table(run, pa.Table.from_pylist(rows, schema=LABELED_SCHEMA), *labeled_path(split))
    classes = config.data.synthetic.num_classes
    write_manifest(run, StageManifest("cluster", "oracle", metrics={"clusters": classes}))
    connect()
    train_detector.run_stage(config)
    distill.run_stage(config)
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("mask_quality.py")), config.run_dir],
        check=True,
    )


if __name__ == "__main__":
    main()
