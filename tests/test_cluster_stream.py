"""K-means fitted on a sample, every mined mask labelled part by part (`cluster_stream`)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskdistill.cluster_stream import fit_sample, label_split
from maskdistill.clustering import KMeansResult, fit_kmeans, sample_positions
from maskdistill.outputs import (
    LABELED_SCHEMA,
    MASK_SCHEMA,
    features_of,
    iter_labeled,
    read_labeled,
    read_mined,
)
from maskdistill.rundir import RunDir

PARTS = (5, 5, 2)  # rows per mine part of the train split, as mining.shard_size=5 cuts 12


def _features(count: int, seed: int = 0) -> np.ndarray:
    """Points around 3 separated directions in 8 dimensions (K-means finds them)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8, dtype=np.float32)[:3] * 4
    return centres[np.arange(count) % 3] + 0.2 * rng.standard_normal((count, 8)).astype(np.float32)


def _mine(run: RunDir, split: str, features: np.ndarray, parts: tuple[int, ...]) -> None:
    """Mine parts holding `features` in order, `parts` rows each, ids sorted across parts."""
    start = 0
    for shard, count in enumerate(parts):
        rows = [
            {
                "image_id": f"{split}_{i:04d}",
                "height": 8,
                "width": 8,
                "mask_rle": "0 64",
                "bbox": [0, 0, 8, 8],
                "score": 1.0,
                "seed_patch": [0, 0],
                "seed_box": [0, 0, 8, 8],
                "feature": features[i].tolist(),
            }
            for i in range(start, start + count)
        ]
        path = Path(run.path("mine", split, f"part-{shard:05d}.parquet"))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=MASK_SCHEMA), path)
        start += count


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    _mine(run, "train", _features(12), PARTS)
    _mine(run, "val", _features(7, seed=1), (4, 0, 3))  # a part with no rows between
    return run


def test_a_sample_fit_assigns_every_feature_its_nearest_centroid(run: RunDir) -> None:
    sample, total = fit_sample(run, "train", fit_samples=7, seed=4)
    features = features_of(read_mined(run, "train"))
    assert total == 12 and sample.shape == (7, 8)
    np.testing.assert_array_equal(sample, features[sample_positions(12, 7, seed=4)])
    result = fit_kmeans(sample, 3, n_init=2, seed=0)
    for split, rows in (("train", 12), ("val", 7)):
        sizes = label_split(run, split, result)
        labeled = read_labeled(run, split)
        assert labeled.schema == LABELED_SCHEMA and labeled.num_rows == rows == sizes.sum()
        assert labeled.column("image_id").to_pylist() == [f"{split}_{i:04d}" for i in range(rows)]
        points = result.transform.apply(features_of(labeled))
        squared = ((points[:, None] - result.centroids[None]) ** 2).sum(-1)  # [rows, 3]
        labels = labeled.column("cluster").to_numpy()
        np.testing.assert_array_equal(labels, squared.argmin(1))
        np.testing.assert_array_equal(sizes, np.bincount(labels, minlength=3))
    train = read_labeled(run, "train").column("cluster").to_numpy()
    # the streaming assign gives the fit set the labels K-means gave it
    np.testing.assert_array_equal(train[sample_positions(12, 7, seed=4)], result.labels)


def test_without_a_cap_the_labels_are_those_of_kmeans_on_every_feature(run: RunDir) -> None:
    sample, total = fit_sample(run, "train", fit_samples=None, seed=4)
    features = features_of(read_mined(run, "train"))
    np.testing.assert_array_equal(sample, features)  # all of them, in shard order
    today = fit_kmeans(features, 3, n_init=2, seed=0)  # the stage before fit_samples
    streamed = fit_kmeans(sample, 3, n_init=2, seed=0)
    np.testing.assert_array_equal(streamed.centroids, today.centroids)
    label_split(run, "train", streamed)
    labels = read_labeled(run, "train").column("cluster").to_numpy()
    np.testing.assert_array_equal(labels, today.labels)
    assert sorted(np.bincount(labels).tolist()) == [4, 4, 4]  # rows i % 3 share a centre
    assert fit_sample(run, "train", fit_samples=12, seed=9)[0].tobytes() == sample.tobytes()


def test_the_written_file_has_one_row_group_per_nonempty_mine_part(run: RunDir) -> None:
    result = fit_kmeans(features_of(read_mined(run, "train")), 3, n_init=1)
    label_split(run, "train", result)
    label_split(run, "val", result)
    for split, parts in (("train", [5, 5, 2]), ("val", [4, 3])):
        metadata = pq.read_metadata(run.path("cluster", f"{split}.parquet"))
        assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == parts
        assert [t.num_rows for t in iter_labeled(run, split, ["cluster"])] == parts


def test_a_split_without_masks_gets_an_empty_typed_file(run: RunDir) -> None:
    result = fit_kmeans(features_of(read_mined(run, "train")), 3, n_init=1)
    sizes = label_split(run, "test", result)  # never mined: no parts
    assert sizes.tolist() == [0, 0, 0]
    empty = read_labeled(run, "test")
    assert empty.num_rows == 0 and empty.schema == LABELED_SCHEMA


def test_a_failed_pass_leaves_the_earlier_file_and_no_partial_one(run: RunDir) -> None:
    good = fit_kmeans(features_of(read_mined(run, "train")), 3, n_init=1)
    label_split(run, "train", good)
    before = Path(run.path("cluster", "train.parquet")).read_bytes()
    wrong = KMeansResult(good.labels, np.zeros((3, 5), np.float32), 0.0, good.transform)
    with pytest.raises(ValueError, match="centroids have 5"):
        label_split(run, "train", wrong)  # fails on the first part, after the file was opened
    assert Path(run.path("cluster", "train.parquet")).read_bytes() == before
    assert sorted(p.name for p in Path(run.path("cluster")).iterdir()) == ["train.parquet"]
