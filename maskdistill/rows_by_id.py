"""A stage's Parquet rows looked up by image id, one shard of ids at a time (the evaluation at
any scale: it holds one shard's rows, never a split's).

`RowsById` keeps only each row group's place and the (min, max) of its `image_id` column from
the Parquet footers (memory per row group, not per row). `rows(shard)` reads just the row groups
whose id range meets the shard's, one at a time, and keeps the shard's rows. The stages write
their rows in shards of sorted ids (`maskdistill.shards`; `cluster/<split>.parquet` one row group
per mine part), so a shard of sorted ids meets one or two row groups; a group without id
statistics is always read (correct, only slower).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maskdistill import storage

ID = "image_id"


@dataclass(frozen=True)
class IdRange:
    """One row group of a Parquet file and the smallest and largest image id in it (None: the
    file has no statistics for it)."""

    uri: str
    group: int
    low: str | None
    high: str | None

    def meets(self, low: str, high: str) -> bool:
        if self.low is None or self.high is None:
            return True
        return self.low <= high and low <= self.high


class RowsById:
    """Rows of the Parquet files at `uris` by image id, only `columns` (image_id added); `reads`
    counts the row groups read by this object."""

    def __init__(self, uris: Iterable[str], columns: Sequence[str]) -> None:
        self.columns = [ID, *(c for c in columns if c != ID)]
        self.groups = [g for uri in uris for g in self._ranges(uri)]
        self.reads = 0

    def _ranges(self, uri: str) -> list[IdRange]:
        with storage.open_input(uri) as source:
            meta = pq.ParquetFile(source).metadata
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise ValueError(f"{uri}: no column {missing[0]!r} (columns: {names})")
        column = names.index(ID)
        ranges = []
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            known = stats is not None and stats.has_min_max
            low, high = (str(stats.min), str(stats.max)) if known else (None, None)
            ranges.append(IdRange(uri, g, low, high))
        return ranges

    def rows(self, image_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The rows of `image_ids` (a shard: sorted ids read fewest groups) as dicts by id;
        ids without a row are absent."""
        if not image_ids:
            return {}
        low, high = min(image_ids), max(image_ids)
        wanted = pa.array(list(image_ids), pa.string())
        found: dict[str, dict[str, Any]] = {}
        meeting = (g for g in self.groups if g.meets(low, high))
        for uri, groups in itertools.groupby(meeting, key=lambda g: g.uri):
            with storage.open_input(uri) as source:
                parquet = pq.ParquetFile(source)
                for group in groups:
                    table = parquet.read_row_group(group.group, columns=self.columns)
                    self.reads += 1
                    kept = table.filter(pc.is_in(table[ID], value_set=wanted))
                    found.update((row[ID], row) for row in kept.to_pylist())
        return found
