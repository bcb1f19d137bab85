"""Stage outputs as Parquet parts, one per shard of image ids, so an interrupted stage resumes.

A shard's part is written atomically and last (after its skip list), so a part that exists is
finished; a rerun redoes only the shards without one. Rows are keyed by `image_id`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from maskdistill.rows import row_groups
from maskdistill.rundir import RunDir


def split_name(split: str) -> str:
    """A split's name in the run directory; an image folder's root split ('') is `images`."""
    return split or "images"


def split_folder(stage: str, split: str) -> str:
    """Where a stage keeps a split's parts."""
    return f"{stage}/{split_name(split)}"


def shard_ids(image_ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """Consecutive shards of the sorted ids, so reruns cut the same shards."""
    ordered = sorted(image_ids)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def part_name(shard: int) -> str:
    return f"part-{shard:05d}"


def finished_shards(run: RunDir, folder: str) -> set[int]:
    """Indices of shards whose Parquet part exists under `folder`."""
    if not run.exists(folder):
        return set()
    names = run.list_names(folder)
    return {int(n[5:10]) for n in names if n.startswith("part-") and n.endswith(".parquet")}


def write_shard(
    run: RunDir,
    folder: str,
    shard: int,
    rows: Sequence[dict[str, object]],
    skipped: Sequence[dict[str, str]],
    schema: pa.Schema,
) -> None:
    """Write the shard's skip list, then its rows (both by image_id): the part that marks it
    done. A skip list holds at most a shard's images, so it stays JSON, readable as it is."""
    entries = sorted(skipped, key=lambda e: e["image_id"])
    run.write_json(entries, folder, f"{part_name(shard)}.skipped.json")
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: str(r["image_id"])), schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    run.write_bytes(sink.getvalue(), folder, f"{part_name(shard)}.parquet")


def part_uris(run: RunDir, folder: str) -> list[str]:
    """The finished parts of `folder`, in shard order, as URIs (or local paths)."""
    return [
        run.uri_of(folder, f"{part_name(i)}.parquet") for i in sorted(finished_shards(run, folder))
    ]


def read_part(
    run: RunDir, folder: str, name: str, columns: Sequence[str] | None = None
) -> pa.Table:
    """One part file `name` of a stage's `folder`, only `columns` if given."""
    data = io.BytesIO(run.read_bytes(folder, name))
    return pq.read_table(data, columns=None if columns is None else list(columns))


def iter_parts(
    run: RunDir, folder: str, columns: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """The finished parts of `folder` one at a time, in shard order: what `read_parts`
    concatenates, with one part in memory."""
    for i in sorted(finished_shards(run, folder)):
        yield read_part(run, folder, f"{part_name(i)}.parquet", columns)


def read_parts(
    run: RunDir,
    folder: str,
    schema: pa.Schema,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """All finished parts of `folder` as one table, in shard order (only `columns` if given)."""
    tables = list(iter_parts(run, folder, columns))
    if tables:
        return pa.concat_tables(tables)
    return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))


def count_rows(run: RunDir, folder: str) -> int:
    """Rows in the finished parts of `folder`, from the Parquet footers alone."""
    return sum(group.rows for group in row_groups(part_uris(run, folder)))


def iter_skipped(run: RunDir, folder: str) -> Iterator[dict[str, str]]:
    """The skip lists of the finished shards of `folder`, in shard order, one shard's file
    read at a time (a million-image split's skips are never one list)."""
    for i in sorted(finished_shards(run, folder)):
        yield from json.loads(run.read_bytes(folder, f"{part_name(i)}.skipped.json"))
