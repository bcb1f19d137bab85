"""Mask quality of a finished run against ground truth (A.4, Table 3 a/b: class-agnostic).

    python benchmarks/mask_quality.py runs/demo [--split train]

Rows: the mined masks (one per image, ranked by their CLS-attention share), every detector
candidate (ranked by detector score), and the confident candidates only (score > tau, or the
best one per image: what the pseudo labels are made of). Needs a data set with instance masks.
"""

from __future__ import annotations

import argparse

import numpy as np

from maskdistill.data import build_dataset
from maskdistill.evaluate import candidate_instances, mined_instances
from maskdistill.evaluation import InstanceSet, mask_ap
from maskdistill.outputs import read_mined, read_pseudo
from maskdistill.pseudolabels import confident_masks
from maskdistill.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    config = run.read_config()
    dataset = build_dataset(config.data, args.split)
    truth, mined, candidates, confident = [], [], [], []
    for row in read_mined(run, args.split).to_pylist():
        sample = dataset.load(row["image_id"])
        assert sample.instance_masks is not None and sample.instance_classes is not None
        ones = np.ones(len(sample.instance_masks))
        truth.append(
            InstanceSet.from_masks(
                row["image_id"], sample.instance_masks, sample.instance_classes, ones
            )
        )
        size = (row["height"], row["width"])
        mined.append(mined_instances({**row, "cluster": 0}, row["image_id"], size))
    for row in read_pseudo(run, args.split).to_pylist():
        every = candidate_instances(row, row["image_id"], (row["height"], row["width"]))
        candidates.append(every)
        keep = confident_masks(every.scores, tau=config.pseudo_labels.tau)
        rles = [every.rles[i] for i in keep]
        confident.append(
            InstanceSet(every.image_id, every.size, rles, every.classes[keep], every.scores[keep])
        )
    print(f"{args.split}: {len(truth)} images, {sum(len(t.rles) for t in truth)} objects")
    print(f"{'masks':<22} {'count':>6} {'AP':>6} {'AP50':>6} {'AP75':>6}")
    rows = (("mined", mined), ("detector, all", candidates), ("detector, confident", confident))
    for name, sets in rows:
        ap = {k: 100 * v for k, v in mask_ap(truth, sets, class_agnostic=True).items()}
        count = sum(len(s.rles) for s in sets)
        print(f"{name:<22} {count:>6} {ap['AP']:>6.1f} {ap['AP50']:>6.1f} {ap['AP75']:>6.1f}")


if __name__ == "__main__":
    main()
