import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs import cluster, mine
from maskdistill import clusters, gallery
from maskdistill.clustering import assign, fit_kmeans, sample_positions
from maskdistill.config import ExperimentConfig
from maskdistill.data import dataset_of
from maskdistill.outputs import features_of, mined_parts, read_kmeans, read_labeled, read_mined
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


def test_a_folder_without_classes_chooses_k_by_silhouette(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images", good=1, bad={})
    config = tiny_config(
        tmp_path,
        "data.kind=folder",
        f"data.root={root}",
        "data.train_split=''",
        "clustering.k_range=[2, 6]",
    )
    features = _blobs(4, per_cluster=15)
    count, scores, chosen = cluster.cluster_count(config, features)
    assert (count, chosen) == (4, 4)
    assert [s.k for s in scores] == [2, 3, 4, 5, 6]
    assert max(scores, key=lambda s: s.silhouette).k == 4


def test_auto_with_overclustering_multiplies_the_chosen_k(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        "clustering.num_clusters=auto",
        "clustering.k_range=[2, 5]",
        "clustering.overclustering=1.5",
    )
    count, _, chosen = cluster.cluster_count(config, _blobs(3, per_cluster=12))
    assert (chosen, count) == (3, 5)  # floor(3 * 1.5 + 0.5) = 5


def _blobs(k: int, *, per_cluster: int) -> np.ndarray:
    """`k` tight clusters around random unit directions in 16 dimensions."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(k, 16))
    return np.concatenate(
        [c / np.linalg.norm(c) + 0.03 * rng.normal(size=(per_cluster, 16)) for c in centres]
    ).astype(np.float32)


def test_the_stage_with_auto_writes_the_curve_and_its_choice(
    mined: ExperimentConfig, tmp_path: Path
) -> None:
    config = mined.model_copy(
        update={
            "clustering": mined.clustering.model_copy(
                update={"num_clusters": "auto", "k_range": (2, 5)}
            )
        }
    )
    manifest = cluster.run_stage(config, force=True)
    assert manifest is not None
    sweep = json.loads((Path(mined.run_dir) / "cluster" / "k_sweep.json").read_text())
    scores = {s["k"]: s["silhouette"] for s in sweep["scores"]}
    assert list(scores) == [2, 3, 4, 5]
    best = max(scores, key=lambda k: (scores[k], -k))
    assert sweep["chosen"] == manifest.metrics["k_auto"] == manifest.metrics["clusters"] == best
    assert Image.open(Path(mined.run_dir) / "cluster" / "k_sweep.png").size[1] > 200
    cluster.run_stage(mined, force=True)  # back to the module's K = 3


def test_clusters_sweeps_stored_features_and_writes_names(
    mined: ExperimentConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.run_stage(mined)
    run_dir = mined.run_dir
    RunDir(run_dir).write_config(mined)  # as the drivers' `start` does
    assert clusters.main([run_dir, "--k", "2-4"]) == 0
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and "clustering.num_clusters=" in printed
    sweep = json.loads((Path(run_dir) / "sweep" / "k_sweep.json").read_text())
    assert [s["k"] for s in sweep["scores"]] == [2, 3, 4]
    assert clusters.main([run_dir, "--init-names"]) == 0
    names = yaml.safe_load((Path(run_dir) / "names.yaml").read_text())
    assert names == {"clusters": {0: "cluster 0", 1: "cluster 1", 2: "cluster 2"}}
    assert clusters.main([run_dir, "--init-names"]) == 2
    assert "exists" in capsys.readouterr().err
    (Path(run_dir) / "names.yaml").write_text('clusters:\n  0: "dog"\n  1: 0\n  2: "dog"\n')
    assert clusters.main([run_dir]) == 0
    table = capsys.readouterr().out
    assert "dog (with 1)" in table and "2 classes + background" in table
    assert "2 classes are named 'dog'" in table
    (Path(run_dir) / "names.yaml").unlink()
    shutil.rmtree(Path(run_dir) / "cluster" / "gallery")
    assert clusters.main([run_dir, "--gallery"]) == 0
    assert (Path(run_dir) / "cluster" / "gallery" / "index.html").exists()


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


def test_the_gallery_shows_each_clusters_masks_nearest_the_centroid_first(
    mined: ExperimentConfig,
) -> None:
    cluster.run_stage(mined, force=True)
    run = RunDir(mined.run_dir)
    folder = Path(mined.run_dir) / "cluster" / "gallery"
    written = json.loads((folder / "gallery.json").read_text())
    table = read_labeled(run, "train")
    rows = {r["image_id"]: r for r in table.to_pylist()}
    labels = table.column("cluster").to_numpy()
    assert [c["size"] for c in written["clusters"]] == np.bincount(labels, minlength=3).tolist()
    kmeans = read_kmeans(run)
    points = kmeans.transform.apply(features_of(table))
    distances = gallery.centroid_distances(points, kmeans.centroids, labels)
    distance = dict(zip(rows, distances, strict=True))
    dataset = dataset_of(mined.data, "train")
    for entry in written["clusters"]:
        k, tiles = entry["cluster"], entry["typical"]
        members = sorted(i for i, row in rows.items() if row["cluster"] == k)
        assert sorted(t["image_id"] for t in tiles) == members, "12 masks: each fits its grid"
        assert entry["least_typical"] == []
        shown = [t["distance"] for t in tiles]
        assert shown == sorted(shown) == pytest.approx([distance[t["image_id"]] for t in tiles])
        if not tiles:
            assert entry["picture"] is None
            continue
        picture = np.asarray(Image.open(folder / entry["picture"]).convert("RGB"))
        height = gallery.TITLE_HEIGHT + gallery.section_height(len(tiles))
        assert picture.shape == (height, gallery.picture_width(), 3)
        for slot, tile in enumerate(tiles):
            row = rows[tile["image_id"]]
            mask = gallery.MaskRef(row["image_id"], row["height"], row["width"], row["mask_rle"])
            image = dataset.load(row["image_id"]).image
            expected = gallery.gallery_tile(image, mask.mask(), gallery.cluster_colour(k))
            step = gallery.TILE + gallery.GAP
            y = gallery.TITLE_HEIGHT + gallery.CAPTION_HEIGHT + gallery.GAP + slot // 6 * step
            x = gallery.GAP + slot % 6 * step
            np.testing.assert_array_equal(
                picture[y : y + gallery.TILE, x : x + gallery.TILE], expected
            )
    index = (folder / "index.html").read_text()
    pictures = sorted(p.name for p in folder.glob("cluster_*.png"))
    assert pictures and all(f'href="{name}"' in index for name in pictures)
    assert (folder / "sheet.png").is_file()


def test_a_sample_fit_labels_every_mask_one_row_group_per_mine_part(
    mined: ExperimentConfig,
) -> None:
    sampled = mined.model_copy(
        update={"clustering": mined.clustering.model_copy(update={"fit_samples": 8})}
    )
    assert fingerprint(sampled, "cluster") != fingerprint(mined, "cluster")
    manifest = cluster.run_stage(sampled, force=True)
    assert manifest is not None
    assert (manifest.metrics["fit_objects"], manifest.metrics["support_objects"]) == (8, 12)
    run = RunDir(mined.run_dir)
    kmeans = read_kmeans(run)
    train = features_of(read_mined(run, "train"))
    expected = fit_kmeans(train[sample_positions(12, 8, seed=0)], 3, n_init=2, seed=0)
    np.testing.assert_array_equal(kmeans.centroids, expected.centroids)
    assert manifest.metrics["inertia"] == pytest.approx(expected.inertia)  # the sample's
    for split in ("train", "val"):
        parts = [rows for _, rows in mined_parts(run, split) if rows]
        metadata = pq.read_metadata(Path(mined.run_dir) / "cluster" / f"{split}.parquet")
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert groups == parts and max(parts) <= mined.mining.shard_size
        table = read_labeled(run, split)
        labels = table.column("cluster").to_numpy()
        np.testing.assert_array_equal(labels, assign(features_of(table), kmeans))
    sizes = [manifest.metrics[f"size_{k}"] for k in range(3)]
    train_labels = read_labeled(run, "train").column("cluster").to_numpy()
    assert sizes == np.bincount(train_labels, minlength=3).tolist()
    cluster.run_stage(mined, force=True)  # back to the module's config
