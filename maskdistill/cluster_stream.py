"""Sec 3.2 at any size: K-means fitted on a sample of the mined features, every mask labelled in
one streaming pass, never all rows in memory.

`fit_sample` reads the support split's `feature` column one mine part at a time and keeps the
rows of a seeded uniform sample (`clustering.fit_samples`; positions drawn from the Parquet
footers' counts); with no cap, or a cap above the split's size, it is every feature in shard
order, so the fit is the paper's. `label_split` assigns each mined part's masks to their nearest
centroid and appends the part as one row group to `cluster/<split>.parquet`, written atomically;
it returns the rows per cluster. Memory: the sample plus one part.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from maskdistill import storage
from maskdistill.clustering import KMeansResult, assign, sample_positions, take_positions
from maskdistill.outputs import (
    LABELED_SCHEMA,
    features_of,
    iter_mined,
    labeled_path,
    mined_folder,
    mined_parts,
)
from maskdistill.rundir import RunDir
from maskdistill.shards import read_part

# features never repeat: a dictionary tried anew in every row group only grows the file (+40%)
DICTIONARY = [name for name in LABELED_SCHEMA.names if name != "feature"]


def fit_sample(
    run: RunDir, split: str, *, fit_samples: int | None, seed: int
) -> tuple[np.ndarray, int]:
    """float32 [min(fit_samples, N), D] features of a uniform sample of the split's N mined
    masks (all N, in shard order, when `fit_samples` is None or >= N), and N."""
    parts = mined_parts(run, split)
    total = sum(rows for _, rows in parts)
    positions = sample_positions(total, fit_samples, seed=seed)

    def loader(name: str) -> np.ndarray:
        return features_of(read_part(run, mined_folder(split), name, ["feature"]))

    blocks = [(rows, partial(loader, name)) for name, rows in parts]
    return take_positions(blocks, positions), total


def label_split(run: RunDir, split: str, result: KMeansResult) -> np.ndarray:
    """Write `cluster/<split>.parquet` (LABELED_SCHEMA): each mine part's rows plus the nearest
    centroid (`assign`), one row group per non-empty part, in shard order. Rows per cluster."""
    sizes = np.zeros(len(result.centroids), dtype=np.int64)
    with (
        storage.atomic_output(run.uri_of(*labeled_path(split))) as sink,
        pq.ParquetWriter(sink, LABELED_SCHEMA, use_dictionary=DICTIONARY) as writer,
    ):
        for table in iter_mined(run, split):
            if not table.num_rows:
                continue
            labels = assign(features_of(table), result)
            cluster = pa.array(labels, type=pa.int32())
            labeled = table.append_column("cluster", cluster).cast(LABELED_SCHEMA)
            writer.write_table(labeled, row_group_size=labeled.num_rows)
            sizes += np.bincount(labels, minlength=len(sizes))
    return sizes
