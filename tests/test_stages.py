"""The stage contract: hashes, resources outside them, staleness down the chain, `status`."""

from pathlib import Path

import pytest

from maskdistill.cli import main
from maskdistill.config import ExperimentConfig, load_config
from maskdistill.rundir import RunDir, stage_run
from maskdistill.stages import (
    NAMES,
    fingerprint,
    fingerprints,
    needed,
    run_status,
    stage_hashes,
)

# Every resource setting of every stage, changed from its default.
RESOURCES = (
    "pretrain.resources.num_workers=2",
    "pretrain.resources.cpus_per_worker=3",
    "pretrain.resources.use_gpu=false",
    "pretrain.resources.max_failures=0",
    "pretrain.resources.loader_workers=7",
    "pretrain.resources.log_every=3",
    "mining.resources.concurrency=8",
    "mining.resources.batch_size=5",
    "mining.resources.num_gpus=0.5",
    "mining.resources.num_cpus=4",
    "detector.resources.num_workers=8",
    "detector.resources.loader_workers=1",
    "pseudo_labels.resources.concurrency=3",
    "pseudo_labels.resources.batch_size=2",
    "segmenter.resources.num_workers=4",
    "segmenter.resources.cpus_per_worker=8",
    "evaluation.resources.num_gpus=0",
    "evaluation.resources.batch_size=1",
)


def test_stage_hashes_are_in_pipeline_order_and_pretrain_only_when_wanted() -> None:
    plain = stage_hashes(load_config())
    assert list(plain) == [n for n in NAMES if n not in ("pretrain", "refine")]
    own = stage_hashes(load_config(None, ["backbone.weights=pretrain", "self_training.rounds=1"]))
    assert list(own) == list(NAMES)
    assert len(set(own.values())) == len(own), "every stage its own hash"
    assert needed(load_config()) == list(plain)
    with pytest.raises(ValueError, match="'pretrain' is not part of this config"):
        fingerprint(load_config(), "pretrain")


def test_evaluate_only_with_ground_truth_to_score() -> None:
    folder = load_config(None, ["data.kind=folder", "data.root=/photos"])
    assert needed(folder)[-2:] == ["distill", "segmenter"]
    assert "evaluate" not in needed(load_config(None, ["data.val_split=null"]))
    with pytest.raises(ValueError, match="'evaluate' is not part .*an image folder has none"):
        fingerprint(folder, "evaluate")


def test_no_resource_setting_changes_any_hash() -> None:
    base = load_config(None, ["backbone.weights=pretrain"])
    moved = load_config(None, ["backbone.weights=pretrain", *RESOURCES])
    assert moved != base
    assert stage_hashes(moved) == stage_hashes(base)


@pytest.mark.parametrize(
    ("override", "first"),
    [
        ("data.synthetic.train_images=64", "data"),
        ("mining.top_k=0.3", "mine"),
        ("mining.shard_size=10", "mine"),
        ("clustering.feature=masked", "mine"),
        ("detector.train_splits=[train, extra]", "mine"),  # another split to mine
        ("evaluation.mask_ap_split=extra", "mine"),
        ("clustering.support_split=extra", "mine"),
        ("clustering.n_init=3", "cluster"),
        ("detector.batch_size=8", "detector"),
        ("seed=1", "detector"),
        ("pseudo_labels.tau=0.5", "distill"),
        ("segmenter.epochs=2", "segmenter"),
        ("evaluation.crf=true", "evaluate"),
        ("evaluation.mined_score=one", "evaluate"),
    ],
)
def test_a_science_change_reaches_its_stage_and_every_later_one_only(
    override: str, first: str
) -> None:
    base, changed = stage_hashes(load_config()), stage_hashes(load_config(None, [override]))
    differ = [name for name in base if base[name] != changed[name]]
    names = list(base)
    if first == "data":  # data feeds mine directly (the images), not through the data stage
        assert differ == names
    else:
        assert differ == names[names.index(first) :]


def _complete(run: RunDir, config: ExperimentConfig, *names: str) -> None:
    for name in names:
        with stage_run(run, fingerprint(config, name)) as manifest:
            manifest.outputs = 1


def test_status_reports_done_partial_stale_missing_and_why(tmp_path: Path) -> None:
    config = load_config(None, [f"run_dir={tmp_path}"])
    run = RunDir(str(tmp_path))
    _complete(run, config, "data", "mine", "cluster")
    with pytest.raises(RuntimeError), stage_run(run, fingerprint(config, "detector")):
        run.write_bytes(b"", "detector", "checkpoints", "iter_00000050.pt")
        raise RuntimeError("preempted")
    states = {r.stage: (r.state, r.action) for r in run_status(run, config)}
    assert states == {
        "data": ("done", "reuse"),
        "mine": ("done", "reuse"),
        "cluster": ("done", "reuse"),
        "detector": ("partial", "resume"),
        "distill": ("missing", "run"),
        "segmenter": ("missing", "run"),
        "evaluate": ("missing", "run"),
    }
    (detector,) = [r for r in run_status(run, config) if r.stage == "detector"]
    assert detector.reason == "interrupted; resumes from the checkpoint at iteration 50"

    changed = load_config(None, [f"run_dir={tmp_path}", "mining.top_k=0.3", *RESOURCES])
    reports = {r.stage: r for r in run_status(run, changed)}
    assert [reports[n].state for n in ("data", "mine", "cluster", "detector")] == [
        "done",
        "stale",
        "stale",
        "stale",
    ]
    assert reports["mine"].reason == "mining.top_k: 0.4 -> 0.3"
    assert reports["cluster"].reason == "input stage mine changed"
    assert reports["mine"].config_hash == stage_hashes(changed)["mine"]


def test_status_command_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(None, [f"run_dir={tmp_path}"])
    run = RunDir(str(tmp_path))
    run.write_config(config)
    _complete(run, config, "data", "mine")
    assert main(["status", str(tmp_path), "--set", "clustering.seed=4"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["data"][1:4] == ["done", stage_hashes(config)["data"], "reuse"]
    assert rows["mine"][1] == "done" and rows["cluster"][1:2] == ["missing"]
    assert main(["status", str(tmp_path / "nowhere")]) == 1
    assert not (tmp_path / "nowhere").exists()
    assert "not a run directory" in capsys.readouterr().err


def test_every_stage_fingerprint_records_its_own_keys_and_inputs() -> None:
    prints = fingerprints(load_config(None, ["backbone.weights=pretrain"]))
    assert prints["mine"].upstream == {"pretrain": prints["pretrain"].config_hash}
    assert set(prints["evaluate"].upstream) == {"cluster", "distill", "segmenter"}
    assert "mining.top_k" in prints["mine"].science
    assert not any("resources" in key for fp in prints.values() for key in fp.science)
