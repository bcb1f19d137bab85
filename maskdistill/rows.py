"""A stage's Parquet rows by position, read one row group at a time (training at any scale).

The training stages draw samples by index (`engine.batch_indices`). `ShardedRows` serves those
indices from Parquet files without holding them: its index is each row group's file and row count,
read from the footers (memory per row group, not per row), and a row is read with its row group,
a few of which stay cached in the reading process (`cache_rows`). `batch_indices` visits an
epoch in shuffle windows of consecutive rows, so a loader process reads a window's row groups
about once while it draws from it. Rows are dicts of the asked `columns`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maskdistill import storage


class Rows(Protocol):
    """What a training set takes its rows from: a list, or `ShardedRows`."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Any: ...


@dataclass(frozen=True)
class RowGroup:
    """One row group of a Parquet file: where it is and how many rows it has."""

    uri: str
    group: int
    rows: int


def row_groups(uris: Iterable[str]) -> list[RowGroup]:
    """The row groups of the Parquet files at `uris`, in order, from their footers alone."""
    groups = []
    for uri in uris:
        with storage.open_input(uri) as source:
            meta = pq.ParquetFile(source).metadata
        groups += [RowGroup(uri, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return groups


def windowed(
    groups: Sequence[RowGroup], columns: Sequence[str], *, window: int, drop: Sequence[int] = ()
) -> ShardedRows:
    """`ShardedRows` caching the row groups of one shuffle window (`engine.epoch_order`): a
    window's consecutive rows lie in row groups of at most window + 2 x the largest group rows
    (all rows without a window)."""
    total = sum(g.rows for g in groups)
    largest = max((g.rows for g in groups), default=0)
    cache = total if window <= 0 else min(total, window + 2 * largest)
    return ShardedRows(groups, columns, cache_rows=cache, drop=drop)


class ShardedRows:
    """Rows of `groups` addressed by position; `drop`: sorted positions left out (an image
    already in an earlier split). Picklable without its cache (loader processes build theirs).
    `reads` counts the row groups read by this process; `cache_rows` bounds the rows cached."""

    def __init__(
        self,
        groups: Sequence[RowGroup],
        columns: Sequence[str],
        *,
        cache_rows: int,
        drop: Sequence[int] = (),
    ) -> None:
        self.groups = tuple(groups)
        self.columns = tuple(columns)
        self.cache_rows = cache_rows
        self.starts = np.cumsum([0, *(g.rows for g in self.groups)], dtype=np.int64)
        self.drop = np.asarray(sorted(drop), dtype=np.int64)
        # the k-th kept row is at k + (number of dropped positions before it): with the dropped
        # positions shifted down by their rank, that count is a search (drop [2, 5]: k=2 -> 3)
        self._kept_shift = self.drop - np.arange(len(self.drop), dtype=np.int64)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._footers: dict[str, pq.FileMetaData] = {}  # a file's footer parsed once
        self.reads = 0

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_cache": OrderedDict(), "_footers": {}, "reads": 0}

    def __len__(self) -> int:
        return int(self.starts[-1]) - len(self.drop)

    def position(self, index: int) -> int:
        """The row's position among all rows of the files (dropped ones included)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return index + int(np.searchsorted(self._kept_shift, index, side="right"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self.position(index)
        group = int(np.searchsorted(self.starts, position, side="right")) - 1
        table = self._group(group)
        return table.slice(position - int(self.starts[group]), 1).to_pylist()[0]

    def image_id(self, index: int) -> str:
        return str(self[index]["image_id"])

    def cached_groups(self) -> list[int]:
        return list(self._cache)

    def _group(self, group: int) -> pa.Table:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        spec = self.groups[group]
        with storage.open_input(spec.uri) as source:
            parquet = pq.ParquetFile(source, metadata=self._footers.get(spec.uri))
            self._footers[spec.uri] = parquet.metadata
            table = parquet.read_row_group(spec.group, columns=list(self.columns))
        self.reads += 1
        self._cache[group] = table
        while len(self._cache) > 1 and sum(t.num_rows for t in self._cache.values()) > max(
            self.cache_rows, table.num_rows
        ):
            self._cache.popitem(last=False)
        return table


def first_rows(uris: Iterable[str], count: int) -> list[dict[str, Any]]:
    """The first `count` rows of the Parquet files at `uris`, opening no more files and row
    groups than they take (a preview of a split of any size)."""
    rows: list[dict[str, Any]] = []
    for uri in uris:
        if len(rows) >= count:
            break
        with storage.open_input(uri) as source:
            parquet = pq.ParquetFile(source)
            for group in range(parquet.num_row_groups):
                if len(rows) >= count:
                    return rows
                rows += parquet.read_row_group(group).slice(0, count - len(rows)).to_pylist()
    return rows


def repeated_ids(earlier: Sequence[Sequence[RowGroup]], later: Sequence[RowGroup]) -> list[int]:
    """Positions in `later`'s rows whose image_id is in one of the `earlier` files' (an image in
    two training splits is trained on once). Holds the earlier ids while it looks: one string
    column, not the rows."""
    seen = [_ids(groups) for groups in earlier]
    if not seen:
        return []
    known = pa.chunked_array([c for ids in seen for c in ids.chunks], type=pa.string())
    value_set = known.combine_chunks()
    found: list[int] = []
    offset = 0
    for spec in later:
        ids = _ids([spec])
        hits = pc.is_in(ids, value_set=value_set).to_numpy(zero_copy_only=False)
        found += [offset + int(i) for i in np.flatnonzero(hits)]
        offset += spec.rows
    return found


def _ids(groups: Sequence[RowGroup]) -> pa.ChunkedArray:
    chunks = []
    for spec in groups:
        with storage.open_input(spec.uri) as source:
            table = pq.ParquetFile(source).read_row_group(spec.group, columns=["image_id"])
        chunks += table.column("image_id").chunks
    return pa.chunked_array(chunks, type=pa.string())
