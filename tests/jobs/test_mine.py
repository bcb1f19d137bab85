import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import mine, sharded
from maskdistill.masks import decode_rle, mask_to_box
from maskdistill.outputs import read_mined
from maskdistill.rundir import RunDir, read_manifest, read_skipped_list, stage_state
from maskdistill.stages import fingerprint
from tests.jobs.conftest import image_folder, tiny_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()[:300]


def _one_pixel_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_row_per_readable_image_and_skips_counted(tmp_path: Path) -> None:
    bad = {
        "empty.jpg": b"",
        "junk.png": b"definitely not a png",
        "cut.jpg": _truncated_jpeg(),
        "dot.png": _one_pixel_png(),
    }
    root = image_folder(tmp_path / "images", good=7, bad=bad)
    config = tiny_config(
        tmp_path / "run",
        "data.kind=folder",
        f"data.root={root}",
        "data.train_split=''",
        "data.val_split=null",
        "clustering.num_clusters=2",
        "mining.shard_size=4",
    )
    manifest = mine.run_stage(config)
    assert manifest is not None
    assert (manifest.inputs, manifest.outputs) == (11, 7)
    assert {s["image_id"] for s in manifest.skipped.sample} == set(bad)
    assert manifest.skip_counts["empty file"] == 1
    # shards 0 and 1 hold the bad images (cut, dot, empty | junk): one list in id order
    listed = read_skipped_list(RunDir(str(tmp_path / "run")), "mine")
    assert [s["image_id"] for s in listed] == sorted(bad)
    assert sorted(p.name for p in (tmp_path / "run" / "mine" / "images").glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    rows = read_mined(RunDir(str(tmp_path / "run")), "").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(
        f"{'sub/' if i % 2 else ''}good_{i}.png" for i in range(7)
    )
    for row in rows:
        mask = decode_rle({"size": [row["height"], row["width"]], "counts": row["mask_rle"]})
        index = int(row["image_id"].split("_")[1][0])
        assert mask.shape == (40 + 4 * index, 56)
        assert tuple(row["bbox"]) == mask_to_box(mask)
        x0, y0, _, _ = row["seed_box"]
        assert mask[y0, x0], "the seed patch lies in its mask"
        assert len(row["feature"]) == 64 and np.isfinite(row["feature"]).all()
        assert 0 < row["score"] <= 1


def test_a_rerun_after_a_crash_with_more_actors_mines_only_unfinished_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path, "data.val_split=null", "mining.resources.num_cpus=1")
    written: list[int] = []
    real_write = sharded.write_shard

    def crash_after_first(run, folder, shard, rows, skipped, schema):  # type: ignore[no-untyped-def]
        if written:
            raise RuntimeError("driver killed")
        written.append(shard)
        real_write(run, folder, shard, rows, skipped, schema)

    monkeypatch.setattr(sharded, "write_shard", crash_after_first)
    with pytest.raises(RuntimeError, match="driver killed"):
        mine.run_stage(config)
    run = RunDir(str(tmp_path))
    assert read_manifest(run, "mine") is None
    finished = tmp_path / "mine" / "train" / f"part-{written[0]:05d}.parquet"
    before = (finished.stat().st_mtime_ns, finished.read_bytes())

    monkeypatch.setattr(sharded, "write_shard", real_write)
    more = tiny_config(  # resources are not science: the same run, on more and smaller actors
        tmp_path,
        "data.val_split=null",
        "mining.resources.concurrency=2",
        "mining.resources.num_cpus=0.5",
        "mining.resources.batch_size=2",
    )
    assert stage_state(run, fingerprint(more, "mine")) == "partial"
    manifest = mine.run_stage(more)
    assert manifest is not None
    assert manifest.metrics == {"train_shards": 3, "train_shards_reused": 1}
    assert (finished.stat().st_mtime_ns, finished.read_bytes()) == before
    ids = read_mined(run, "train").column("image_id").to_pylist()
    assert sorted(ids) == [f"train_{i:06d}" for i in range(12)]

    assert mine.run_stage(config) is None, "a complete stage is skipped, whatever its resources"


def test_preview_draws_a_tile_per_image(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "data.val_split=null")
    mine.run_stage(config)
    path = mine.write_preview(config, RunDir(str(tmp_path)), "train", 4)
    preview = np.asarray(Image.open(path))
    assert preview.ndim == 3 and preview.shape[1] > 4 * 100
    assert (preview == (255, 255, 0)).all(-1).any(), "the seed patches are outlined"
