from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from maskdistill.cli import main
from maskdistill.config import load_config
from maskdistill.rundir import RunDir, read_manifest, read_skipped_list

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def _tiny(run_dir: Path) -> list[str]:
    return [
        "--config",
        DEMO,
        "--set",
        f"run_dir={run_dir}",
        "--set",
        "data.synthetic.train_images=5",
        "--set",
        "data.synthetic.val_images=3",
        "--set",
        "data.synthetic.image_size=[48, 64]",
    ]


def test_data_stage_runs_then_skips_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", *_tiny(tmp_path)]) == 0
    train = pq.read_table(tmp_path / "data" / "train.parquet").to_pylist()
    assert [row["image_id"] for row in train] == [f"train_{i:06d}" for i in range(5)]
    assert {(row["height"], row["width"]) for row in train} == {(48, 64)}
    assert all(1 <= row["num_instances"] <= 4 for row in train)
    assert pq.read_table(tmp_path / "data" / "val.parquet").num_rows == 3
    preview = Image.open(tmp_path / "data" / "preview_train.png")
    assert preview.mode == "RGB" and preview.width > 0
    manifest = read_manifest(RunDir(str(tmp_path)), "data")
    assert manifest is not None and (manifest.inputs, manifest.outputs) == (8, 8)
    assert load_config(tmp_path / "config.yaml").data.synthetic.train_images == 5
    capsys.readouterr()
    assert main(["data", *_tiny(tmp_path)]) == 0
    assert "data: complete" in capsys.readouterr().out


def test_data_stage_counts_planted_bad_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / name)
    (images / "empty.jpg").write_bytes(b"")
    (images / "junk.png").write_bytes(b"not an image at all")
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "data.kind=folder",
        f"data.root={images}",
        "data.train_split=''",
        "data.val_split=null",
    ]
    assert main(["data", *[arg for o in overrides for arg in ("--set", o)]]) == 0
    manifest = read_manifest(RunDir(str(run_dir)), "data")
    assert manifest is not None
    assert (manifest.inputs, manifest.outputs) == (4, 2)
    assert {s["image_id"] for s in manifest.skipped.sample} == {"empty.jpg", "junk.png"}
    assert manifest.skip_counts["empty file"] == 1
    listed = read_skipped_list(RunDir(str(run_dir)), "data")
    assert [s["image_id"] for s in listed] == ["empty.jpg", "junk.png"]


def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["data", *_tiny(tmp_path), "--set", "mining.top_k=3"])
    assert stopped.value.code == 2
    assert "mining.top_k = 3" in capsys.readouterr().err
    assert main(["config", "--set", "mining.top_k=3"]) == 2
    assert not (tmp_path / "config.yaml").exists()
