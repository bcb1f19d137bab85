"""Does distilling a Mask R-CNN improve on the masks it is trained on? (Sec 3.2, Table 3)

    python benchmarks/detector_oracle.py runs/oracle [--set detector.max_iters=300 ...]

Runs the mine stage with `mining.source: ground_truth`, an oracle with the same shape of output
as mining: one mask per image (its largest ground-truth object, `maskdistill.oracle`) whose
one-hot class feature K-means turns back into its true class. The cluster, detector and distill
stages then run as in the pipeline (demo config plus overrides), and
`benchmarks/mask_quality.py` compares the training masks with the detector's candidates against
all ground-truth objects. With one mask per image of 2.5 objects on average, the training masks
cap recall; a detector that generalises finds the other objects too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from jobs import cluster, distill, mine, train_detector
from jobs.common import connect
from maskdistill.config import load_config
from maskdistill.rundir import RunDir

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    run_dir = f"run_dir={Path(args.run_dir).resolve()}"
    config = load_config(DEMO, [run_dir, "mining.source=ground_truth", *args.overrides])
    RunDir(config.run_dir).write_config(config)
    connect()
    for stage in (mine, cluster, train_detector, distill):
        stage.run_stage(config)
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("mask_quality.py")), config.run_dir],
        check=True,
    )


if __name__ == "__main__":
    main()
