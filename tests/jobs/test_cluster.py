from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import cluster, mine
from maskdistill.clustering import assign, fit_kmeans
from maskdistill.config import ExperimentConfig
from maskdistill.outputs import features_of, read_mined
from maskdistill.rundir import RunDir, read_manifest
from maskdistill.stages import fingerprint
from tests.jobs.conftest import image_folder, tiny_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    config = tiny_config(tmp_path_factory.mktemp("run"), "clustering.num_clusters=3")
    mine.run_stage(config)
    return config


def test_every_mined_mask_gets_a_cluster(mined: ExperimentConfig) -> None:
    manifest = cluster.run_stage(mined, force=True)
    assert manifest is not None and manifest.metrics["clusters"] == 3
    run = RunDir(mined.run_dir)
    for split, count in (("train", 12), ("val", 4)):
        table = pq.read_table(Path(mined.run_dir) / "cluster" / f"{split}.parquet")
        assert table.num_rows == count
        assert (
            table.column("image_id").to_pylist()
            == read_mined(run, split).column("image_id").to_pylist()
        )
        assert set(table.column("cluster").to_pylist()) <= {0, 1, 2}
    sizes = [manifest.metrics[f"size_{k}"] for k in range(3)]
    assert sum(sizes) == 12 and min(sizes) == manifest.metrics["smallest"]


def test_clusters_follow_the_kmeans_of_the_features(mined: ExperimentConfig) -> None:
    cluster.run_stage(mined, force=True)
    run = RunDir(mined.run_dir)
    train = features_of(read_mined(run, "train"))
    val = features_of(read_mined(run, "val"))
    expected = fit_kmeans(train, 3, n_init=2, seed=0)
    written = pq.read_table(Path(mined.run_dir) / "cluster" / "train.parquet")
    np.testing.assert_array_equal(written.column("cluster").to_numpy(), expected.labels)
    written_val = pq.read_table(Path(mined.run_dir) / "cluster" / "val.parquet")
    np.testing.assert_array_equal(written_val.column("cluster").to_numpy(), assign(val, expected))
    with np.load(Path(mined.run_dir) / "cluster" / "kmeans.npz") as saved:
        np.testing.assert_array_equal(saved["centroids"], expected.centroids)


def test_same_seed_same_labels_and_a_skip_when_complete(mined: ExperimentConfig) -> None:
    cluster.run_stage(mined, force=True)
    first = pq.read_table(Path(mined.run_dir) / "cluster" / "train.parquet")
    assert cluster.run_stage(mined) is None
    cluster.run_stage(mined, force=True)
    again = pq.read_table(Path(mined.run_dir) / "cluster" / "train.parquet")
    assert again.column("cluster").to_pylist() == first.column("cluster").to_pylist()


def test_a_folder_without_classes_needs_num_clusters(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images", good=1, bad={})
    config = tiny_config(tmp_path, "data.kind=folder", f"data.root={root}", "data.train_split=''")
    with pytest.raises(ValueError, match="clustering.num_clusters must be set"):
        cluster.cluster_count(config)


def test_config_change_upstream_reruns_clustering(mined: ExperimentConfig) -> None:
    cluster.run_stage(mined, force=True)
    changed = mined.model_copy(
        update={"clustering": mined.clustering.model_copy(update={"seed": 5})}
    )
    assert fingerprint(changed, "cluster") != fingerprint(mined, "cluster")
    assert cluster.run_stage(changed) is not None
    manifest = read_manifest(RunDir(mined.run_dir), "cluster")
    assert (
        manifest is not None and manifest.config_hash == fingerprint(changed, "cluster").config_hash
    )
