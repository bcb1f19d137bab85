from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maskdistill.config import load_config
from maskdistill.data.base import IGNORE_INDEX
from maskdistill.names import (
    BACKGROUND,
    NamesError,
    grouping,
    identity,
    initial_names,
    parse_names,
    read_class_map,
)
from maskdistill.pseudolabels import encode_label_map
from maskdistill.segmenter import SegmentationSamples
from maskdistill.stages import stage_hashes


def test_names_merges_and_background_give_the_segmenter_labels() -> None:
    document = {"clusters": {0: "dog", 1: "background", 2: 0, 3: "cat", 5: 3}}
    classes = parse_names(document, 6)
    # Roots: 0 <- {0, 2}, 3 <- {3, 5}, 4 alone; 1 background. Labels in root order: 0, 3, 4.
    assert classes.labels == (1, 0, 1, 2, 3, 2)
    assert classes.names == ("dog", BACKGROUND, "dog", "cat", "cluster 4", "cat")
    assert classes.num_classes == 4
    assert classes.class_names == [BACKGROUND, "dog", "cat", "cluster 4"]
    assert classes.cluster_names == [
        BACKGROUND,
        "dog",
        BACKGROUND,
        "dog",
        "cat",
        "cluster 4",
        "cat",
    ]
    assert classes.groups() == [[0, 2], [3, 5], [4]]
    assert not classes.is_identity


def test_the_lookup_maps_pseudo_label_values_and_keeps_ignore() -> None:
    classes = parse_names({"clusters": {1: 0, 2: "background"}}, 3)
    table = classes.lookup()
    # Stored values: 0 background, 1 + k cluster k; cluster 1 -> label of 0 (1), 2 -> 0.
    assert table[[0, 1, 2, 3]].tolist() == [0, 1, 1, 0]
    assert table[IGNORE_INDEX] == IGNORE_INDEX and table[4] == IGNORE_INDEX


def test_chains_resolve_and_a_merge_into_background_is_background() -> None:
    classes = parse_names({"clusters": {0: 1, 1: 2, 2: "Background ", 3: "x"}}, 4)
    assert classes.labels == (0, 0, 0, 1)
    assert parse_names({"clusters": {0: 1, 1: 2}}, 3).labels == (1, 1, 1)


def test_no_file_is_identity(tmp_path: Path) -> None:
    assert read_class_map(str(tmp_path), 3) == identity(3)
    assert identity(3).is_identity and identity(3).class_names[1:] == [
        "cluster 0",
        "cluster 1",
        "cluster 2",
    ]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"clusters": {7: "dog"}}, r"cluster 7: no such cluster \(this run has 3: 0-2\)"),
        ({"clusters": {0: 9}}, r"cluster 0: merges into 9, which is no cluster"),
        ({"clusters": {0: 1, 1: 2, 2: 0}}, r"cycle: 0 -> 1 -> 2 -> 0"),
        ({"clusters": {0: ""}}, r"cluster 0: '' is not a name"),
        ({"clusters": {0: ["dog"]}}, r"cluster 0: \['dog'\] is not a name"),
        ({"clusters": {0: True}}, r"cluster 0: True is not a name"),
        ({"clusters": {"dog": 1}}, r"key 'dog': expected a cluster number"),
        ({"clusers": {0: "dog"}}, r"unknown key 'clusers'"),
        ({"clusters": {0: "background", 1: "background", 2: 0}}, r"no class left"),
        (["dog"], r"expected a mapping"),
    ],
)
def test_bad_names_files_name_the_key_and_value(document: object, message: str) -> None:
    with pytest.raises(NamesError, match=message):
        parse_names(document, 3, source="run/names.yaml")


def test_the_grouping_ignores_names_and_needs_no_cluster_count() -> None:
    assert grouping({"clusters": {0: "dog", 1: "cat"}}) == {}
    assert grouping(None) == {}
    found = grouping({"clusters": {0: "dog", 4: 0, 2: "background", 3: 4}})
    assert found == {"background": [2], "merged": [[0, 3, 4]]}
    renamed = grouping({"clusters": {0: "puppy", 4: 0, 2: "background", 3: 4}})
    assert renamed == found


def test_initial_names_round_trip_as_the_identity_with_matched_names() -> None:
    text = initial_names([30, 10, 0], ["dog", None, "cat: tabby"], how="matched on 'val'")
    classes = parse_names(yaml.safe_load(text), 3)
    assert classes.is_identity
    assert classes.names == ("dog", "cluster 1", "cat: tabby")
    assert "# 30 masks, 75.0%" in text and "matched on 'val'" in text


def test_names_alone_keep_every_hash_merges_change_the_segmenter_and_later(
    tmp_path: Path,
) -> None:
    config = load_config(None, [f"run_dir={tmp_path}"])
    before = stage_hashes(config)
    (tmp_path / "names.yaml").write_text('clusters:\n  0: "dog"\n  1: "cat"\n')
    assert stage_hashes(config) == before
    (tmp_path / "names.yaml").write_text('clusters:\n  0: "dog"\n  1: 0\n')
    after = stage_hashes(config)
    changed = [stage for stage in before if before[stage] != after[stage]]
    assert changed == ["segmenter", "evaluate"]


def test_merged_clusters_train_as_one_class() -> None:
    class Images:
        class_names = ()

        def load(self, image_id: str) -> object:
            from maskdistill.data.base import Sample

            return Sample(image_id, np.zeros((8, 8, 3), dtype=np.uint8))

    stored = np.zeros((8, 8), dtype=np.uint8)
    stored[:, 2:4], stored[:, 4:6], stored[:, 6:] = 1, 2, 3  # clusters 0, 1, 2
    rows = [{"image_id": "a", "label_png": encode_label_map(stored)}]
    classes = parse_names({"clusters": {1: 0, 2: "background"}}, 3)
    samples = SegmentationSamples(
        rows,
        Images(),  # type: ignore[arg-type]
        crop_size=8,
        scale_range=(1.0, 1.0),
        rotation_degrees=0.0,
        hflip=False,
        label_lookup=classes.lookup(),
    )
    _, label = samples.load(0)
    expected = classes.lookup()[stored].astype(np.int64)  # [0 0 1 1 1 1 0 0] per row
    assert torch.equal(label, torch.from_numpy(expected))
    assert set(label.unique().tolist()) == {0, 1}
