from pathlib import Path

import pytest
import yaml

from maskdistill.config import load_config
from maskdistill.rundir import RunDir, read_manifest, stage_run, stage_status


def test_atomic_write_leaves_no_partial_files(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    run.write_bytes(b"one", "stage", "part-0.bin")
    run.write_bytes(b"two", "stage", "part-0.bin")
    assert run.read_bytes("stage", "part-0.bin") == b"two"
    assert [p.name for p in (tmp_path / "run" / "stage").iterdir()] == ["part-0.bin"]


def test_file_uri_is_the_same_directory(tmp_path: Path) -> None:
    RunDir(str(tmp_path)).write_json({"a": 1}, "x.json")
    assert RunDir(f"file://{tmp_path}").read_json("x.json") == {"a": 1}


def test_resolved_config_and_provenance(tmp_path: Path) -> None:
    config = load_config(None, ["mining.top_k=0.3", f"run_dir={tmp_path}"])
    run = RunDir(config.run_dir)
    run.write_config(config)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["mining"]["top_k"] == 0.3
    assert load_config(tmp_path / "config.yaml") == config
    provenance = run.read_json("provenance.json")
    assert {"git_sha", "versions"} <= provenance.keys()
    assert "torch" in provenance["versions"]


def test_manifest_decides_complete_stale_missing(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    assert stage_status(run, "mine", "abc") == "missing"
    with stage_run(run, "mine", "abc") as manifest:
        manifest.inputs, manifest.outputs = 5, 3
        manifest.skip("img_1", "empty file")
        manifest.skip("img_2", "not a decodable image: cannot identify image file")
        manifest.skip("img_3", "empty file")
    assert stage_status(run, "mine", "abc") == "complete"
    assert stage_status(run, "mine", "def") == "stale"
    again = read_manifest(run, "mine")
    assert again is not None
    assert (again.inputs, again.outputs) == (5, 3)
    assert again.skip_counts == {"empty file": 2, "not a decodable image": 1}
    assert run.read_json("mine", "manifest.json")["skip_counts"]["empty file"] == 2
    assert again.seconds >= 0 and "python" in again.versions


def test_failed_stage_writes_no_manifest(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    with pytest.raises(RuntimeError), stage_run(run, "cluster", "abc") as manifest:
        manifest.inputs = 1
        raise RuntimeError("interrupted")
    assert stage_status(run, "cluster", "abc") == "missing"


def test_rerun_with_another_config_clears_old_output(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    with pytest.raises(RuntimeError), stage_run(run, "mine", "abc"):
        run.write_bytes(b"partial", "mine", "part-00000.parquet")
        raise RuntimeError("interrupted")
    with stage_run(run, "mine", "abc"):
        assert run.exists("mine", "part-00000.parquet")  # same config: resume from it
    with stage_run(run, "mine", "def"):
        assert not run.exists("mine", "part-00000.parquet")  # other config: start over
    assert run.list_names("mine") == ["attempt.json", "manifest.json"]
