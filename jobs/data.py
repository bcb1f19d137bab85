"""Stage `data`: read every image of each split once, record sizes and skips, draw a preview.

    python -m jobs.data --config configs/pascal.yaml [--preview 8]

No Ray: one pass on the driver. Writes `run_dir/data/<split>.parquet` (one row per readable
image, `maskdistill.outputs.INDEX_SCHEMA`), `data/preview_<split>.png` and the manifest, which
counts every unreadable file with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from jobs.common import execute_stage, start
from maskdistill.config import ExperimentConfig
from maskdistill.console import Bar
from maskdistill.data import build_dataset
from maskdistill.data.base import Dataset, Sample, UnreadableImage
from maskdistill.outputs import INDEX_SCHEMA, index_path, write_table
from maskdistill.rundir import RunDir, StageManifest
from maskdistill.stages import DATA
from maskdistill.visualize import colorize, image_grid, png_bytes

STAGE = DATA


def index_split(
    dataset: Dataset, split: str, run: RunDir, manifest: StageManifest, *, preview: int = 8
) -> pa.Table:
    """Write `data/<split>.parquet` (one row per readable image) and `data/preview_<split>.png`."""
    rows: list[dict[str, object]] = []
    shown: list[Sample] = []
    image_ids = dataset.image_ids()
    progress = Bar(f"data:{split}", len(image_ids), "img")
    for image_id in image_ids:
        progress.update()
        try:
            sample = dataset.load(image_id)
        except UnreadableImage as err:
            manifest.skip(err.image_id, err.reason)
            continue
        masks = sample.instance_masks
        rows.append(
            {
                "image_id": sample.image_id,
                "height": sample.height,
                "width": sample.width,
                "num_instances": None if masks is None else len(masks),
            }
        )
        if len(shown) < preview:
            shown.append(sample)
    progress.close()
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    write_table(run, table, *index_path(split))
    if shown:
        run.write_bytes(png_bytes(preview_grid(shown)), STAGE, f"preview_{split}.png")
    manifest.inputs += len(image_ids)
    manifest.outputs += table.num_rows
    return table


def preview_grid(samples: list[Sample], per_row: int = 4) -> np.ndarray:
    """Each image followed by its ground-truth classes (when there are any), `per_row` a row."""
    tiles = [[s.image] + ([] if s.semantic is None else [colorize(s.semantic)]) for s in samples]
    rows = [sum(tiles[i : i + per_row], []) for i in range(0, len(tiles), per_row)]
    return image_grid(rows)


def run_stage(
    config: ExperimentConfig, *, preview: int = 8, force: bool = False
) -> StageManifest | None:
    """Stage `data`: index every split; None when already complete for this config."""
    data = config.data
    splits = dict.fromkeys(s for s in (data.train_split, data.val_split) if s is not None)

    def index_all(manifest: StageManifest) -> None:
        for split in splits:
            index_split(build_dataset(data, split), split, run, manifest, preview=preview)

    run = RunDir(config.run_dir)
    return execute_stage(config, STAGE, index_all, force=force)


def main(argv: Sequence[str] | None = None) -> int:
    config, args = start(__doc__, argv, preview=8)
    run_stage(config, preview=args.preview, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
