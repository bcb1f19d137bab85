"""The mining job on simulated multi-node clusters: a one-node run's rows, and a lost node.

`ray.cluster_utils.Cluster` starts raylets on this machine: the head (1 CPU, where the driver and
the decode tasks run) and worker nodes of 2 CPUs. With `mining.resources.num_cpus=2` the Miner
actor fits only on a worker node, so images and masks cross nodes; the state API shows where it
lives, and removing its node plays a spot instance that vanishes mid-stage.
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from ray.util.state.common import ActorState

from jobs import mine, sharded
from maskdistill.backbones import build_backbone, save_backbone
from maskdistill.config import ExperimentConfig
from maskdistill.data import build_dataset
from maskdistill.outputs import mined_folder, mined_splits, read_mined
from maskdistill.rundir import RunDir, read_manifest
from maskdistill.shards import finished_shards
from tests.jobs.conftest import tiny_config

pytestmark = pytest.mark.slow

# One Miner of 2 CPUs: it fits a 2-CPU worker node only; the head keeps its CPU for decoding. A
# one-node run needs 3 CPUs for the same reason (2 for the Miner, the rest for decode tasks).
MINER_ON_SECOND_NODE = ("mining.resources.num_cpus=2", "mining.resources.concurrency=1")
# The head declares a vanished node dead after 3 failed health checks 1 s apart (Ray: 5, 3 s).
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}
STAGE_TIMEOUT_S = 240  # about 45 s on an idle 2-core machine; a hang fails here, not at 600 s
MINING_S = 0.5  # per image: the Miner still has batches to do when its node goes


class SlowMiner(mine.Miner):
    """A Miner that takes its time, so that its node can vanish while it works."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        time.sleep(MINING_S * len(batch["image_id"]))
        return super().__call__(batch)


class RepeatingMiner(mine.Miner):
    """A Miner whose every row comes back twice, as when a retried batch is delivered again."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = super().__call__(batch)
        return {key: np.concatenate([column, column]) for key, column in out.items()}


@contextmanager
def _cluster(
    *workers: dict[str, Any], system_config: dict[str, Any] | None = None
) -> Iterator[Cluster]:
    """A head of 1 CPU (with the dashboard: the state API needs it) and `workers`, joined."""
    # RAY_AUTH_MODE=token: Cluster, unlike ray.init, does not create the token on a new machine
    ensure_token_if_auth_enabled()
    head: dict[str, Any] = {"num_cpus": 1, "include_dashboard": True}
    if system_config:
        head["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for node in workers:
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextmanager
def _one_node() -> Iterator[None]:
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _mine(config: ExperimentConfig) -> dict[str, dict[str, dict]]:
    """Every split's mined rows by image_id."""
    assert mine.run_stage(config, preview=0) is not None
    run = RunDir(config.run_dir)
    tables = {split: read_mined(run, split) for split in mined_splits(config)}
    return {split: {row["image_id"]: row for row in t.to_pylist()} for split, t in tables.items()}


def _mined_once(config: ExperimentConfig) -> int:
    """Each image of every split is in exactly one mined row; the number of images."""
    run = RunDir(config.run_dir)
    total = 0
    for split in mined_splits(config):
        expected = sorted(build_dataset(config.data, split).image_ids())
        ids = read_mined(run, split, ["image_id"]).column("image_id").to_pylist()
        assert sorted(ids) == expected, f"{split}: every image mined exactly once"
        total += len(expected)
    return total


def _miners(address: str, *filters: tuple[str, str, str]) -> list[ActorState]:
    """The mining actors of the cluster at `address` (not of another one on this machine)."""
    actors = list_actors(address=address, filters=list(filters), detail=True)
    return [a for a in actors if "Miner" in a.class_name]


def _second_node_id() -> str:
    (node,) = [n for n in ray.nodes() if "second_node" in n["Resources"]]
    return node["NodeID"]


def test_two_node_mining_equals_a_one_node_run(tmp_path: Path) -> None:
    torch.manual_seed(0)  # one set of random weights for both runs ("random" reseeds nothing)
    weights = str(tmp_path / "vit.safetensors")
    save_backbone(build_backbone("test_vit"), weights)
    overrides = (*MINER_ON_SECOND_NODE, f"backbone.weights={weights}")

    with _cluster({"num_cpus": 2, "resources": {"second_node": 1}}) as cluster:
        spread = _mine(tiny_config(tmp_path / "two", *overrides))
        miners = _miners(cluster.address)
        assert miners, "the Miner actor pool is visible to the state API"
        assert {a.node_id for a in miners} == {_second_node_id()}
    with _one_node():
        plain = _mine(tiny_config(tmp_path / "one", *overrides))

    assert {split: len(rows) for split, rows in plain.items()} == {"train": 12, "val": 4}
    for split, rows in plain.items():
        assert set(spread[split]) == set(rows)
        for image_id, row in rows.items():
            other = spread[split][image_id]
            for key in ("height", "width", "mask_rle", "bbox", "seed_patch", "seed_box"):
                assert other[key] == row[key], (split, image_id, key)
            assert other["score"] == pytest.approx(row["score"], abs=1e-5)
            np.testing.assert_allclose(other["feature"], row["feature"], atol=1e-4)


def test_a_row_delivered_twice_is_mined_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried batch may deliver rows again: a shard waits for each of its distinct images."""
    monkeypatch.setattr(mine, "Miner", RepeatingMiner)
    config = tiny_config(tmp_path, "data.val_split=null", "mining.resources.batch_size=1")
    with _one_node():
        manifest = mine.run_stage(config, preview=0)
    assert manifest is not None
    assert _mined_once(config) == manifest.inputs == manifest.outputs == 12


def test_a_node_lost_mid_stage_leaves_every_image_mined_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spot node vanishes while its Miner works: the Miner and its batches move to the other
    worker node, and the stage completes with every image mined exactly once."""
    config = tiny_config(
        tmp_path, *MINER_ON_SECOND_NODE, "mining.shard_size=2", "mining.resources.batch_size=1"
    )
    run = RunDir(config.run_dir)
    train = mined_folder(config.data.train_split)
    train_shards = 6  # 12 images in shards of 2
    real_write = sharded.write_shard
    lost: dict[str, Any] = {}
    outcome: dict[str, Any] = {}

    with _cluster({"num_cpus": 2}, {"num_cpus": 2}, system_config=FAST_NODE_DEATH) as cluster:

        def lose_the_miners_node(*args: Any) -> None:
            """Once the first train part is written, SIGKILL the Miner's node (once)."""
            real_write(*args)
            if args[1] != train or lost:
                return
            lost["parts"] = len(finished_shards(run, train))
            (miner,) = _miners(cluster.address, ("state", "=", "ALIVE"))
            (node,) = [n for n in cluster.worker_nodes if n.node_id == miner.node_id]
            cluster.remove_node(node, allow_graceful=False)  # a vanished spot instance
            lost["node_id"] = node.node_id

        def stage() -> None:
            try:
                outcome["manifest"] = mine.run_stage(config, preview=0)
            except BaseException as err:  # re-raised in the test's thread
                outcome["error"] = err

        monkeypatch.setattr(sharded, "write_shard", lose_the_miners_node)
        monkeypatch.setattr(sharded, "DECODE_BATCH", 2)  # a block, so a Miner task, per shard
        monkeypatch.setattr(mine, "Miner", SlowMiner)
        worker = threading.Thread(target=stage, daemon=True)
        worker.start()
        worker.join(STAGE_TIMEOUT_S)
        assert not worker.is_alive(), (
            f"mine still running after {STAGE_TIMEOUT_S} s (node lost: {lost or 'not yet'}; "
            f"train parts: {sorted(finished_shards(run, train))})"
        )
        if "error" in outcome:
            raise outcome["error"]
        assert lost, "the Miner's node was removed during the stage"
        assert lost["parts"] < train_shards, f"the node was lost mid-stage: {lost}"
        (survivor,) = [n.node_id for n in cluster.worker_nodes]
        restarted = {a.node_id for a in _miners(cluster.address) if a.num_restarts}
        assert restarted == {survivor}, "the lost Miner was restarted on the other worker node"

    manifest = outcome["manifest"]
    assert manifest is not None
    total = _mined_once(config)
    assert total == 16
    assert (manifest.inputs, manifest.outputs, len(manifest.skipped)) == (total, total, 0)
    written = read_manifest(run, mine.STAGE)
    assert written is not None and written.outputs == total
