import json
import tracemalloc
from pathlib import Path

import pytest

from maskdistill.rundir import (
    Fingerprint,
    RunDir,
    read_manifest,
    read_skipped_list,
    stage_run,
    stage_state,
)
from maskdistill.shards import iter_skipped, write_shard
from maskdistill.skips import (
    MAX_REASONS,
    OTHER,
    SAMPLE_PER_REASON,
    SKIPPED_FILE,
    SKIPPED_SCHEMA,
    SPILL_ROWS,
    StageSkips,
)

MINE = Fingerprint("mine", "abc")
KINDS = ("empty file", "not a decodable image", "not a decodable image", "cannot read file")


def _reason(i: int) -> str:
    """Image i's reason: i % 4 picks the kind, so of 4n images n are empty, 2n undecodable, n
    unreadable; the detail after the colon differs per image, as real reasons' do."""
    kind = KINDS[i % 4]
    return kind if kind == "empty file" else f"{kind}: detail of image {i}"


def _skip_stage(run: RunDir, n: int) -> list[dict[str, str]]:
    entries = [{"image_id": f"img_{i:06d}", "reason": _reason(i)} for i in range(n)]
    with stage_run(run, MINE) as manifest:
        for entry in entries:
            manifest.skip(entry["image_id"], entry["reason"])
    return entries


def test_manifest_of_100k_skips_stays_small_and_the_parquet_keeps_every_id(
    tmp_path: Path,
) -> None:
    run = RunDir(str(tmp_path / "big"))
    entries = _skip_stage(run, 100_000)
    size = (tmp_path / "big" / "mine" / "manifest.json").stat().st_size
    assert size < 4_000, f"manifest.json is {size} bytes"
    small = RunDir(str(tmp_path / "small"))
    _skip_stage(small, 1_000)
    # 100x the skips, the same record but for the digits: total 1000 -> 100000 and counts
    # 250 -> 25000, 500 -> 50000, 250 -> 25000 gain 2 each, 8 bytes in all
    big, few = (json.dumps(r.read_json("mine", "manifest.json")["skipped"]) for r in (run, small))
    assert len(big) - len(few) == 8
    manifest = read_manifest(run, "mine")
    assert manifest is not None and stage_state(run, MINE) == "done"
    assert len(manifest.skipped) == 100_000
    # of 100_000 = 4 x 25_000: i % 4 == 0 empty, 1 and 2 undecodable, 3 unreadable
    assert manifest.skip_counts == {
        "empty file": 25_000,
        "not a decodable image": 50_000,
        "cannot read file": 25_000,
    }
    assert len(manifest.skipped.sample) == 3 * SAMPLE_PER_REASON
    # the first 5 of each kind: images 0, 4, ..., 16 empty; 1, 2, 5, 6, 9 undecodable; ...
    assert [s["image_id"] for s in manifest.skipped.sample if s["reason"] == "empty file"] == [
        f"img_{i:06d}" for i in (0, 4, 8, 12, 16)
    ]
    undecodable = [s for s in manifest.skipped.sample if s["reason"].startswith("not a")]
    assert [s["image_id"] for s in undecodable] == [f"img_{i:06d}" for i in (1, 2, 5, 6, 9)]
    assert read_skipped_list(run, "mine") == entries  # every id and reason, in order


def test_skips_in_memory_are_bounded_by_the_spill_not_the_count() -> None:
    """Python memory while logging 50k skips: a list of them would hold 50k dicts of two
    strings (> 15 MB); the log holds at most SPILL_ROWS (4096) of them (< 2 MB), the rest
    is in the temporary Parquet file."""
    warm = StageSkips()  # the first spill loads the Parquet writer's modules: not traced
    for i in range(SPILL_ROWS):
        warm.add(f"img_{i}", "empty file")
    log = StageSkips()
    tracemalloc.start()
    for i in range(50_000):
        log.add(f"img_{i:06d}", _reason(i))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4_000_000, f"{peak} bytes"
    assert log.total == 50_000


def test_reasons_past_the_limit_are_counted_together() -> None:
    log = StageSkips()
    for i in range(MAX_REASONS + 3):
        log.add(f"img_{i}", f"reason {i}: detail")
    assert len(log.counts) == MAX_REASONS + 1
    assert log.counts[OTHER] == 3 and log.counts["reason 0"] == 1
    assert sum(log.counts.values()) == log.total == MAX_REASONS + 3


def test_a_stage_without_skips_writes_no_file(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    with stage_run(run, MINE):
        pass
    assert not run.exists("mine", SKIPPED_FILE)
    assert read_skipped_list(run, "mine") == []
    assert run.read_json("mine", "manifest.json")["skipped"] == {
        "total": 0,
        "counts": {},
        "sample": [],
        "file": None,
    }


def test_skipped_list_of_an_unfinished_stage_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="stage 'mine' has not finished"):
        read_skipped_list(RunDir(str(tmp_path)), "mine")


def test_a_manifest_with_the_whole_list_still_reads(tmp_path: Path) -> None:
    """Manifests written before skipped.parquet kept every entry and `skip_counts`."""
    run = RunDir(str(tmp_path))
    old = [{"image_id": f"img_{i}", "reason": "empty file"} for i in range(8)]
    old.append({"image_id": "img_8", "reason": "cannot read file: gone"})
    body = {"stage": "mine", "config_hash": "abc", "skipped": old, "skip_counts": {}}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.json").write_text(json.dumps(body))
    manifest = read_manifest(run, "mine")
    assert manifest is not None and stage_state(run, MINE) == "done"
    assert manifest.skip_counts == {"empty file": 8, "cannot read file": 1}
    assert len(manifest.skipped) == 9
    assert len(manifest.skipped.sample) == SAMPLE_PER_REASON + 1  # 5 of 8 empty, the unread one
    assert read_skipped_list(run, "mine") == old


def test_shard_skip_lists_are_read_one_shard_at_a_time_in_shard_order(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    unread = {0: ["b", "a"], 1: [], 2: ["f"]}  # arrival order within a shard: not sorted
    for shard, ids in unread.items():
        skipped = [{"image_id": i, "reason": "empty file"} for i in ids]
        write_shard(run, "mine/images", shard, [], skipped, SKIPPED_SCHEMA)
    entries = iter_skipped(run, "mine/images")
    assert next(entries)["image_id"] == "a"  # by id within the shard
    (tmp_path / "mine" / "images" / "part-00002.skipped.json").write_text(
        json.dumps([{"image_id": "g", "reason": "read after the first shard"}])
    )
    assert [e["image_id"] for e in entries] == ["b", "g"]  # shard 2's file opened only now
    with stage_run(run, MINE) as manifest:  # what run_sharded does with them
        for entry in iter_skipped(run, "mine/images"):
            manifest.skip(entry["image_id"], entry["reason"])
    assert [e["image_id"] for e in read_skipped_list(run, "mine")] == ["a", "b", "g"]


def test_a_record_read_back_equals_the_one_written() -> None:
    log = StageSkips()
    log.add("a", "unreadable image: truncated")
    assert StageSkips.from_record(log.summary()) == log
    other = StageSkips()
    other.add("b", "unreadable image: truncated")
    assert other != log, "the sample names another image"
