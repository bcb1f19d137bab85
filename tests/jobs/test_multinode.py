"""The mining job on a simulated two-node cluster gives the rows of a one-node run.

`ray.cluster_utils.Cluster` starts two raylets on this machine: the head (1 CPU, where the driver
and the decode tasks run) and a second node (2 CPUs and a `second_node` resource). With
`mining.num_cpus=2` the Miner actor fits only on the second node, so images and masks cross
nodes; the state API then shows where the actor lived.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from jobs import mine
from maskdistill.backbones import build_backbone, save_backbone
from maskdistill.config import ExperimentConfig
from maskdistill.rundir import RunDir
from maskdistill.shards import read_parts
from tests.jobs.conftest import tiny_config

pytestmark = pytest.mark.slow

# One Miner of 2 CPUs: it fits the second node only; the head keeps its CPU for decoding. A
# one-node run needs 3 CPUs for the same reason (2 for the Miner, the rest for decode tasks).
MINER_ON_SECOND_NODE = ("mining.num_cpus=2", "mining.concurrency=1")


@contextmanager
def _two_nodes() -> Iterator[None]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True},  # the state API needs it
    )
    try:
        cluster.add_node(num_cpus=2, resources={"second_node": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield
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
    tables = {split: read_parts(run, mine.split_folder(split)) for split in mine.splits(config)}
    return {split: {row["image_id"]: row for row in t.to_pylist()} for split, t in tables.items()}


def _second_node_id() -> str:
    (node,) = [n for n in ray.nodes() if "second_node" in n["Resources"]]
    return node["NodeID"]


def test_two_node_mining_equals_a_one_node_run(tmp_path: Path) -> None:
    torch.manual_seed(0)  # one set of random weights for both runs ("random" reseeds nothing)
    weights = str(tmp_path / "vit.safetensors")
    save_backbone(build_backbone("test_vit"), weights)
    overrides = (*MINER_ON_SECOND_NODE, f"backbone.weights={weights}")

    with _two_nodes():
        spread = _mine(tiny_config(tmp_path / "two", *overrides))
        miners = [a for a in list_actors(detail=True) if "Miner" in a.class_name]
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
