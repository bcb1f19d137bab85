from pathlib import Path

import pytest
import yaml

from maskdistill.config import load_config
from maskdistill.rundir import (
    Fingerprint,
    RunDir,
    StageManifest,
    execute,
    read_manifest,
    read_record,
    read_skipped_list,
    stage_run,
    stage_state,
)


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


ABC = Fingerprint("mine", "abc", {"mining.top_k": 0.4}, {"pretrain": "p1"})
DEF = Fingerprint("mine", "def", {"mining.top_k": 0.3}, {"pretrain": "p1"})


def test_manifest_decides_done_partial_stale_missing(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    assert stage_state(run, ABC) == "missing"
    with stage_run(run, ABC) as manifest:
        assert stage_state(run, ABC) == "partial"  # under way: its attempt file is written
        manifest.inputs, manifest.outputs = 5, 3
        manifest.skip("img_1", "empty file")
        manifest.skip("img_2", "not a decodable image: cannot identify image file")
        manifest.skip("img_3", "empty file")
    assert stage_state(run, ABC) == "done"
    assert stage_state(run, DEF) == "stale"
    again = read_manifest(run, "mine")
    assert again is not None
    assert (again.inputs, again.outputs) == (5, 3)
    assert (again.science, again.upstream) == (ABC.science, ABC.upstream)
    assert again.skip_counts == {"empty file": 2, "not a decodable image": 1}
    assert run.read_json("mine", "manifest.json")["skipped"]["counts"]["empty file"] == 2
    assert [s["image_id"] for s in read_skipped_list(run, "mine")] == ["img_1", "img_2", "img_3"]
    assert again.seconds >= 0 and "python" in again.versions
    assert read_record(run, "mine") == run.read_json("mine", "manifest.json")


def test_failed_stage_writes_no_manifest_and_is_partial(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    with pytest.raises(RuntimeError), stage_run(run, ABC) as manifest:
        manifest.inputs = 1
        raise RuntimeError("interrupted")
    assert read_manifest(run, "mine") is None
    assert stage_state(run, ABC) == "partial"
    assert stage_state(run, DEF) == "stale"  # another config finds output it cannot use


def test_rerun_with_another_config_moves_the_old_output_aside(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    with pytest.raises(RuntimeError), stage_run(run, ABC):
        run.write_bytes(b"partial", "mine", "part-00000.parquet")
        raise RuntimeError("interrupted")
    with stage_run(run, ABC):
        assert run.exists("mine", "part-00000.parquet")  # same config: resume from it
    with stage_run(run, DEF) as manifest:
        assert not run.exists("mine", "part-00000.parquet")  # other config: start over
    assert run.list_names("mine") == ["attempt.json", "manifest.json"]
    assert manifest.moved_aside == "stale/mine-abc"
    assert run.read_bytes("stale", "mine-abc", "part-00000.parquet") == b"partial"  # kept
    assert run.read_json("stale", "mine-abc", "manifest.json")["config_hash"] == "abc"
    with stage_run(run, ABC) as back:  # and back: the second copy gets its own folder
        pass
    assert back.moved_aside == "stale/mine-def"
    with stage_run(run, DEF) as third:
        pass
    assert third.moved_aside == "stale/mine-abc-2"
    assert run.list_names("stale", "mine-abc-2") == ["attempt.json", "manifest.json"]


def test_execute_reuses_a_done_stage_and_force_deletes(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    calls: list[str] = []

    def body(manifest: StageManifest) -> None:
        calls.append(manifest.config_hash)
        run.write_bytes(b"x", "mine", "part-00000.parquet")

    assert execute(run, ABC, body) is not None
    assert execute(run, ABC, body) is None  # done: reused
    assert execute(run, ABC, body, force=True) is not None
    assert calls == ["abc", "abc"]
    assert execute(run, DEF, body, force=True) is not None  # force deletes, moves nothing
    assert not run.exists("stale")
