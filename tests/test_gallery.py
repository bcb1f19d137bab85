import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from maskdistill import gallery
from maskdistill.config import load_config
from maskdistill.data import Sample, UnreadableImage
from maskdistill.gallery import (
    CAPTION_HEIGHT,
    DISTANCE,
    GAP,
    LEAST_TYPICAL,
    TILE,
    TITLE_HEIGHT,
    TYPICAL,
    ClusterExtremes,
    ClusterTiles,
    MaskRef,
    centroid_distances,
    cluster_colour,
    gallery_tile,
    iter_tiles,
    kept_candidates,
    picture_width,
    section_height,
    write_distill_gallery,
    write_gallery,
)
from maskdistill.masks import encode_rle
from maskdistill.outputs import PSEUDO_SCHEMA, write_table
from maskdistill.rundir import RunDir, StageManifest, write_manifest


def choose_tiles(*args: Any, **options: Any) -> list[ClusterTiles]:
    return list(iter_tiles(*args, **options))


# Two clusters on a line: centroid 0 at (0, 0), centroid 1 at (10, 0).
CENTROIDS = np.array([[0.0, 0.0], [10.0, 0.0]])
POINTS = np.array(
    [
        [1, 0],  # 0: cluster 0, 1^2 = 1
        [3, 0],  # 1: cluster 0, 3^2 = 9
        [10, 1],  # 2: cluster 1, 1^2 = 1
        [0, 2],  # 3: cluster 0, 2^2 = 4
        [1, 1],  # 4: cluster 0, 1 + 1 = 2
        [-3, -3],  # 5: cluster 0, 9 + 9 = 18
        [0.5, 0],  # 6: cluster 0, 0.25
        [4, 0],  # 7: cluster 0, 16
        [12, 0],  # 8: cluster 1, 2^2 = 4
    ]
)
LABELS = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1])


def test_typical_tiles_are_nearest_the_centroid_in_order_and_least_typical_the_farthest() -> None:
    distances = centroid_distances(POINTS, CENTROIDS, LABELS)
    np.testing.assert_allclose(distances, [1, 9, 1, 4, 2, 18, 0.25, 16, 4])
    zero, one = choose_tiles(LABELS, distances, 2, typical=3, least_typical=2)
    # Cluster 0 by distance: 6 (0.25), 0 (1), 4 (2), 3 (4), 1 (9), 7 (16), 5 (18).
    assert zero.typical == (6, 0, 4)
    assert zero.least_typical == (5, 7)  # farthest first
    assert (zero.size, zero.share) == (7, pytest.approx(7 / 9))
    # Cluster 1: 2 (1), 8 (4); smaller than the grid, so each shown once, none least typical.
    assert one.typical == (2, 8) and one.least_typical == ()
    assert (one.size, one.share) == (2, pytest.approx(2 / 9))


def test_a_cluster_smaller_than_the_grid_shows_each_mask_once() -> None:
    rank = np.random.default_rng(0).permutation(40).astype(float)
    labels = np.array([0] * 5 + [1] * 14 + [2] * 21)
    small, fourteen, large = choose_tiles(labels, rank, 3)
    assert small.typical == tuple(sorted(range(5), key=lambda i: rank[i]))
    assert small.least_typical == ()
    by_rank = sorted(range(5, 19), key=lambda i: rank[i])
    assert fourteen.typical == tuple(by_rank[:TYPICAL])
    assert fourteen.least_typical == tuple(
        by_rank[: TYPICAL - 1 : -1]
    )  # the 2 left, farthest first
    by_rank = sorted(range(19, 40), key=lambda i: rank[i])
    assert large.typical == tuple(by_rank[:TYPICAL])
    assert large.least_typical == tuple(by_rank[::-1][:LEAST_TYPICAL])
    assert not set(large.typical) & set(large.least_typical)


def test_an_empty_cluster_has_size_zero_and_no_tiles() -> None:
    tiles = choose_tiles(np.array([0, 2, 0]), np.array([0.5, 0.1, 0.2]), 3)
    assert [t.size for t in tiles] == [2, 0, 1]
    empty = tiles[1]
    assert (empty.share, empty.typical, empty.least_typical) == (0.0, (), ())
    assert choose_tiles(np.zeros(0, np.int64), np.zeros(0), 2)[0].size == 0


def test_refused_masks_give_their_place_to_the_next_and_only_shown_ones_are_asked() -> None:
    distances = centroid_distances(POINTS, CENTROIDS, LABELS)
    asked: list[int] = []

    def usable(i: int) -> bool:
        asked.append(i)
        return i not in (0, 5)

    zero, one = choose_tiles(LABELS, distances, 2, typical=3, least_typical=2, usable=usable)
    assert zero.typical == (6, 4, 3) and zero.least_typical == (7, 1)
    assert zero.skipped == (0, 5) and zero.size == 7
    assert asked == [6, 0, 4, 3, 5, 7, 1, 2, 8]


def _pseudo_row(image_id: str, scores: list[float], classes: list[int], kept: int) -> dict:
    masks = [np.zeros((48, 64), bool) for _ in scores]
    for j, mask in enumerate(masks):
        mask[4 + j : 20 + 2 * j, 6 + 3 * j : 30 + j] = True
    return {
        "image_id": image_id,
        "height": 48,
        "width": 64,
        "label_png": b"",
        "kept": kept,
        "best_score": max(scores, default=float("nan")),
        "candidate_rle": [encode_rle(m)["counts"] for m in masks],
        "candidate_bbox": [[0.0, 0.0, 1.0, 1.0] for _ in scores],
        "candidate_score": scores,
        "candidate_class": classes,
    }


@pytest.mark.parametrize("sign", [1.0, -1.0])  # distances (nearest first) or scores
def test_streamed_extremes_choose_the_tiles_of_the_whole_ranking(sign: float) -> None:
    rng = np.random.default_rng(3)
    labels = np.array([0] * 300 + [1] * 30 + [2] * 5 + [3] * 0 + [0] * 100)  # 435 masks
    rng.shuffle(labels)
    values = rng.integers(0, 40, len(labels)).astype(float)  # many ties: broken by order
    masks = [MaskRef(f"m{i:03d}", 4, 4, "16") for i in range(len(labels))]
    refused = {int(i) for i in rng.choice(len(labels), 60, replace=False)}  # < SPARE a side
    extremes = ClusterExtremes(4, sign=sign, near=TYPICAL + 8, far=LEAST_TYPICAL + 8)
    for start in range(0, len(labels), 37):  # parts of 37 masks
        part = slice(start, start + 37)
        extremes.add(masks[part], labels[part], values[part])
        assert len(extremes.masks) <= 4 * (TYPICAL + LEAST_TYPICAL + 16), "bounded in N"
    assert extremes.sizes.tolist() == [400, 30, 5, 0]

    def shown(
        ids: list[MaskRef], lab: np.ndarray, val: np.ndarray, **options: Any
    ) -> list[tuple[Any, ...]]:
        def usable(i: int) -> bool:
            return int(ids[i].image_id[1:]) not in refused

        chosen = choose_tiles(lab, sign * val, 4, usable=usable, **options)
        named = [
            [ids[i].image_id for i in ix]
            for c in chosen
            for ix in (c.typical, c.least_typical, c.skipped)
        ]
        return [(c.size, c.share) for c in chosen] + named

    whole = shown(masks, labels, values)
    assert shown(extremes.masks, extremes.labels, extremes.values, sizes=extremes.sizes) == whole
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        extremes.add(masks[:1], np.array([4]), np.array([0.0]))


def test_kept_candidates_are_the_confident_masks_most_confident_first() -> None:
    rows = [
        _pseudo_row("a", [0.6, 0.95, 0.3, 0.92], [1, 0, 0, 2], kept=2),  # > 0.9: 1, then 3
        _pseudo_row("b", [0.4, 0.7], [0, 1], kept=1),  # none passes: the best, 1
        _pseudo_row("c", [], [], kept=0),
    ]
    refs, classes, scores = kept_candidates(rows, tau=0.9, keep_best_when_none=True)
    assert [(r.image_id, r.candidate) for r in refs] == [("a", 1), ("a", 3), ("b", 1)]
    assert classes.tolist() == [0, 2, 1]
    assert scores.tolist() == pytest.approx([0.95, 0.92, 0.7])
    with pytest.raises(ValueError, match="another config"):
        kept_candidates(rows, tau=0.5, keep_best_when_none=True)


class Images:
    """A data set of the given images; the ids in `unreadable` raise UnreadableImage."""

    class_names: tuple[str, ...] = ()

    def __init__(self, images: dict[str, np.ndarray], unreadable: set[str]) -> None:
        self.images, self.unreadable, self.loaded = images, unreadable, []

    def load(self, image_id: str) -> Sample:
        self.loaded.append(image_id)
        if image_id in self.unreadable:
            raise UnreadableImage(image_id, "truncated file")
        return Sample(image_id, self.images[image_id])


def _region(picture: np.ndarray, top: int, slot: int) -> np.ndarray:
    """Tile `slot` of the grid whose first row starts at `top` (GAP above it), 6 a row."""
    y = top + GAP + (slot // 6) * (TILE + GAP)
    x = GAP + (slot % 6) * (TILE + GAP)
    return picture[y : y + TILE, x : x + TILE]


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("href", "src") and v]


def test_cluster_pictures_show_the_chosen_masks_and_the_index_links_each(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = [f"img{i:02d}" for i in range(20)]
    images = {i: rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in ids}
    masks = []
    for n, image_id in enumerate(ids):
        mask = np.zeros((40, 50), bool)
        mask[n % 7 : n % 7 + 10 + n, (3 * n) % 40 : (3 * n) % 40 + 8] = True  # some at the edge
        masks.append(MaskRef(image_id, 40, 50, encode_rle(mask)["counts"]))
    # Cluster 0: 17 masks (one unreadable), cluster 1: none, cluster 2: 3 masks.
    labels = np.array([0] * 17 + [2] * 3)
    distances = rng.permutation(20).astype(float)
    unreadable = ids[int(np.argmin(distances[:17]))]  # cluster 0's most typical mask
    dataset = Images(images, unreadable={unreadable})
    run = RunDir(str(tmp_path))
    written = write_gallery(run, "cluster", "train", dataset, masks, labels, distances, 3, DISTANCE)
    folder = tmp_path / "cluster" / "gallery"
    assert json.loads((folder / "gallery.json").read_text()) == written
    assert sorted(p.name for p in folder.iterdir()) == [
        "cluster_000.png",
        "cluster_002.png",
        "gallery.json",
        "index.html",
        "sheet.png",
    ]
    zero, one, two = written["clusters"]
    assert [c["size"] for c in written["clusters"]] == [17, 0, 3]
    assert (one["picture"], one["typical"], one["least_typical"]) == (None, [], [])
    assert zero["skipped"] == [{"image_id": unreadable, "reason": "truncated file"}]
    # 16 readable in cluster 0: 12 typical, the 4 others least typical.
    ranked = sorted(
        (i for i in range(17) if ids[i] not in dataset.unreadable), key=lambda i: distances[i]
    )
    assert [t["image_id"] for t in zero["typical"]] == [ids[i] for i in ranked[:12]]
    assert [t["image_id"] for t in zero["least_typical"]] == [ids[i] for i in ranked[:11:-1]]
    assert [t["distance"] for t in zero["typical"]] == [distances[i] for i in ranked[:12]]
    assert sorted(dataset.loaded) == sorted(ids), "each image read once, only the shown ones"
    for entry, shown in ((zero, (12, 4)), (two, (3, 0))):
        picture = np.asarray(Image.open(folder / entry["picture"]).convert("RGB"))
        height = TITLE_HEIGHT + section_height(shown[0]) + section_height(shown[1])
        assert picture.shape == (height, picture_width(), 3) == (height, 604, 3)
        colour = cluster_colour(entry["cluster"])
        tops = (
            TITLE_HEIGHT + CAPTION_HEIGHT,
            TITLE_HEIGHT + section_height(shown[0]) + CAPTION_HEIGHT,
        )
        for top, group in zip(tops, ("typical", "least_typical"), strict=True):
            for slot, tile in enumerate(entry[group]):
                ref = masks[ids.index(tile["image_id"])]
                expected = gallery_tile(images[ref.image_id], ref.mask(), colour)
                np.testing.assert_array_equal(_region(picture, top, slot), expected)
    links = Links()
    links.feed((folder / "index.html").read_text())
    assert {"cluster_000.png", "cluster_002.png"} <= set(links.links)
    assert all((folder / link).is_file() for link in links.links), "relative, to files there"


def test_a_tile_is_the_mask_tinted_and_outlined_in_its_colour_around_its_box() -> None:
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:40] = True  # a 20 px square: window 20 * 1.5 = 30 px, from (15, 5)
    tile = gallery_tile(image, mask, (255, 0, 0), size=30)  # 1:1 scale
    assert gallery.crop_window(mask) == (15, 5, 30)
    np.testing.assert_array_equal(tile[0, 0], (100, 100, 100))  # image, untinted
    np.testing.assert_array_equal(tile[15, 15], (185, 45, 45))  # inside: 0.45 * 100 + 0.55 * c
    np.testing.assert_array_equal(tile[5, 15], (255, 0, 0))  # on the outline
    edge = gallery_tile(image, np.pad(np.ones((4, 4), bool), ((0, 36), (0, 56))), (0, 0, 255))
    np.testing.assert_array_equal(edge[0, 0], gallery.OUTSIDE)  # the window passes the corner


def test_the_distill_gallery_lists_only_kept_masks_highest_scores_first(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            f"run_dir={tmp_path}",
            "data.synthetic.train_images=8",
            "data.synthetic.image_size=[48, 64]",
            "pseudo_labels.tau=0.5",
        ],
    )
    run = RunDir(str(tmp_path))
    rng = np.random.default_rng(1)
    rows, kept_scores = [], []
    for i in range(7):  # 3 confident class-0 masks each (21) and one below tau
        scores = [float(np.float32(s)) for s in (*rng.uniform(0.55, 1.0, 3), 0.2)]
        rows.append(_pseudo_row(f"train_{i:06d}", scores, [0, 0, 0, 0], kept=3))
        kept_scores += [(s, f"train_{i:06d}", j) for j, s in enumerate(scores[:3])]
    rows.append(_pseudo_row("train_000007", [0.3, 0.4], [0, 2], kept=1))  # fallback: class 2
    write_table(
        run, pa.Table.from_pylist(rows, schema=PSEUDO_SCHEMA), "distill/train", "part-00000.parquet"
    )
    write_manifest(run, StageManifest("cluster", "test", metrics={"clusters": 3}))
    written = write_distill_gallery(config, run)
    zero, one, two = written["clusters"]
    assert [c["size"] for c in written["clusters"]] == [21, 0, 1]
    kept_scores.sort(reverse=True)
    shown = [(t["score"], t["image_id"], t["candidate"]) for t in zero["typical"]]
    assert shown == kept_scores[:TYPICAL]
    least = [(t["score"], t["image_id"], t["candidate"]) for t in zero["least_typical"]]
    assert least == kept_scores[::-1][:LEAST_TYPICAL]  # lowest kept first, never the 0.2 ones
    assert [(t["image_id"], t["candidate"]) for t in two["typical"]] == [("train_000007", 1)]
    folder = tmp_path / "distill" / "gallery"
    assert {"cluster_000.png", "cluster_002.png", "sheet.png", "index.html"} <= {
        p.name for p in folder.iterdir()
    }
    assert not [c["skipped"] for c in written["clusters"] if c["skipped"]], "images fit masks"
