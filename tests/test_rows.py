import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskdistill.engine import epoch_order
from maskdistill.rows import ShardedRows, first_rows, repeated_ids, row_groups, windowed


def write_rows(path: Path, ids: list[str], *, group: int) -> str:
    """A Parquet file of rows (image_id, payload) in row groups of `group` rows."""
    table = pa.table({"image_id": ids, "payload": [f"mask of {i}".encode() for i in ids]})
    pq.write_table(table, path, row_group_size=group)
    return str(path)


def ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(count)]


def test_rows_by_position_across_files_and_row_groups(tmp_path: Path) -> None:
    first = write_rows(tmp_path / "a.parquet", ids("a", 7), group=3)  # groups of 3, 3, 1
    second = write_rows(tmp_path / "b.parquet", ids("b", 4), group=4)
    groups = row_groups([first, second])
    assert [(g.uri, g.group, g.rows) for g in groups] == [
        (first, 0, 3),
        (first, 1, 3),
        (first, 2, 1),
        (second, 0, 4),
    ]
    rows = ShardedRows(groups, ["image_id", "payload"], cache_rows=3)
    assert len(rows) == 11
    assert [rows[i]["image_id"] for i in range(11)] == ids("a", 7) + ids("b", 4)
    assert rows[8] == {"image_id": "b000001", "payload": b"mask of b000001"}
    assert rows.image_id(6) == "a000006"
    with pytest.raises(IndexError, match="row 11 of 11"):
        rows[11]


def test_the_index_holds_row_groups_not_rows(tmp_path: Path) -> None:
    """The index a training worker receives is as large for 40 rows as for 40,000."""
    small = write_rows(tmp_path / "small.parquet", ids("x", 40), group=10)
    large = write_rows(tmp_path / "large.parquet", ids("x", 40_000), group=10_000)
    sizes = [
        len(pickle.dumps(windowed(row_groups([uri]), ["image_id"], window=16)))
        for uri in (small, large)
    ]
    # the same up to how the row counts are written (10 vs 10,000: a few bytes); the ids
    # alone of the 40,000 rows would be 280 KB
    assert abs(sizes[1] - sizes[0]) < 32, sizes


def test_an_epoch_reads_each_row_group_once_and_caches_one_window(tmp_path: Path) -> None:
    """Windows of 20 rows over row groups of 10: the reader reads each group once an epoch
    and never holds more than the window's groups plus two (40 rows)."""
    uri = write_rows(tmp_path / "rows.parquet", ids("r", 100), group=10)
    rows = windowed(row_groups([uri]), ["image_id"], window=20)
    assert rows.cache_rows == 20 + 2 * 10
    most = 0
    seen = []
    for k in range(100):
        index = epoch_order(k, num_samples=100, seed=1, epoch=0, window=20)
        seen.append(rows[index]["image_id"])
        most = max(most, len(rows.cached_groups()))
    assert sorted(seen) == ids("r", 100)
    assert rows.reads == 10, "every row group once"
    assert most <= 4
    clone = pickle.loads(pickle.dumps(rows))
    assert (clone.reads, clone.cached_groups()) == (0, []), "a loader process starts empty"


def test_a_full_shuffle_over_a_small_cache_rereads_row_groups(tmp_path: Path) -> None:
    """Why the windows: the same epoch fully shuffled, through the same cache, reads a row
    group for most samples."""
    uri = write_rows(tmp_path / "rows.parquet", ids("r", 100), group=10)
    rows = ShardedRows(row_groups([uri]), ["image_id"], cache_rows=40)
    for k in range(100):
        rows[epoch_order(k, num_samples=100, seed=1, epoch=0, window=0)]
    assert rows.reads > 30


def test_an_image_in_two_splits_is_kept_once_from_the_first(tmp_path: Path) -> None:
    first = row_groups([write_rows(tmp_path / "a.parquet", ["i1", "i3", "i5"], group=2)])
    second = row_groups([write_rows(tmp_path / "b.parquet", ["i2", "i3", "i4", "i5"], group=2)])
    assert repeated_ids([first], second) == [1, 3]
    assert repeated_ids([], second) == []
    drop = [3 + p for p in repeated_ids([first], second)]  # positions after the first split
    rows = ShardedRows([*first, *second], ["image_id", "payload"], cache_rows=2, drop=drop)
    assert len(rows) == 5
    assert [rows[i]["image_id"] for i in range(5)] == ["i1", "i3", "i5", "i2", "i4"]
    assert rows.position(4) == 5


def test_a_preview_opens_only_the_parts_it_shows(tmp_path: Path) -> None:
    first = write_rows(tmp_path / "a.parquet", ids("a", 5), group=2)
    second = write_rows(tmp_path / "b.parquet", ids("b", 5), group=2)
    broken = tmp_path / "c.parquet"
    broken.write_bytes(b"not parquet")
    assert [r["image_id"] for r in first_rows([first, second, str(broken)], 7)] == [
        *ids("a", 5),
        *ids("b", 2),
    ]
    assert len(first_rows([first, str(broken)], 5)) == 5, "a file's end is enough"
    assert first_rows([first], 0) == []
