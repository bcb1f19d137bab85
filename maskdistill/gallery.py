"""The cluster gallery: what each pseudo class looks like, for people without labels.

Per cluster, its most typical masks (nearest its K-means centroid; for the distilled labels, the
detector's most confident) and a few of its least typical, as one picture `cluster_NNN.png`,
plus a contact sheet (`sheet.png`, one row per cluster), an index page (`index.html`) and the
choice itself (`gallery.json`). Three layers, each usable alone:

- the choice (`iter_tiles`, `centroid_distances`, `kept_candidates`, `ClusterExtremes`): pure
  functions of the labels and distances (or scores), no images; `ClusterExtremes` keeps only
  each cluster's nearest and farthest masks of a stream, so the writers read one part at a time;
- the drawing (`gallery_tile`, `cluster_picture`, `contact_sheet`, `index_html`): arrays in,
  arrays or text out;
- the writers (`write_cluster_gallery`, `write_distill_gallery`): read a stage's output, load
  only the images of the shown masks (K clusters x 16 at most) and write the files.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskdistill.config import ExperimentConfig
from maskdistill.data import Dataset, UnreadableImage, dataset_of
from maskdistill.masks import decode_rle, mask_to_box, resize_nearest
from maskdistill.outputs import (
    features_of,
    gallery_folder,
    iter_labeled,
    num_clusters,
    pseudo_folder,
    read_kmeans,
)
from maskdistill.pseudolabels import stored_kept
from maskdistill.rundir import RunDir
from maskdistill.shards import iter_parts, split_name
from maskdistill.stages import CLUSTER, DISTILL
from maskdistill.visualize import image_grid, outline, palette, png_bytes, tint

TYPICAL = 12  # most typical masks per cluster picture
COLUMNS = 6  # tiles per row of a cluster picture (the typical grid is 2 rows of 6)
LEAST_TYPICAL = 4  # least typical masks per cluster picture, one row
SPARE = 8  # extra masks kept per cluster and end of a streamed ranking, for unreadable images
TILE = 96  # px, the side of a square tile in a cluster picture
SHEET_TILES = 6  # typical tiles per row of the contact sheet
SHEET_TILE = 64  # px, the side of a contact-sheet tile
MARGIN = 0.25  # share of the box's longer side shown around it on each side
MIN_CROP = 16  # px, the smallest square window cut from the image
GAP = 4  # px between tiles (and around them)
TITLE_HEIGHT = 24  # px, the title line of a cluster picture or the sheet
CAPTION_HEIGHT = 16  # px, the line above each grid of a cluster picture
LABEL_WIDTH = 132  # px, the label column of the contact sheet
OUTSIDE = (200, 200, 200)  # fills the part of a tile's window that lies outside the image

INDEX, SHEET, CHOICE = "index.html", "sheet.png", "gallery.json"
REF_COLUMNS = ("image_id", "height", "width", "mask_rle")  # a cluster-stage MaskRef's columns


# ---- the choice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterTiles:
    """Which masks one cluster's picture shows, as indices into the gallery's mask list.

    typical: the most typical first; least_typical: the least typical first (never one of the
    typical); skipped: masks passed over because `usable` refused them (unreadable images).
    """

    cluster: int
    size: int
    share: float
    typical: tuple[int, ...]
    least_typical: tuple[int, ...]
    skipped: tuple[int, ...] = ()


def centroid_distances(points: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 [N]: squared L2 distance of each point to its own cluster's centroid, in the space
    K-means works in (`KMeansResult.transform.apply(features)`)."""
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if points.ndim != 2 or labels.shape != (len(points),):
        raise ValueError(f"need points [N, D] and labels [N], got {points.shape}, {labels.shape}")
    if len(points) == 0:
        return np.zeros(0, dtype=np.float64)
    difference = points - np.asarray(centroids, dtype=np.float64)[labels]
    return np.einsum("nd,nd->n", difference, difference)


def iter_tiles(
    labels: np.ndarray,
    rank: np.ndarray,
    num_clusters: int,
    *,
    typical: int = TYPICAL,
    least_typical: int = LEAST_TYPICAL,
    usable: Callable[[int], bool] | None = None,
    sizes: np.ndarray | None = None,
) -> Iterator[ClusterTiles]:
    """Each cluster's most and least typical masks, one cluster at a time (cluster 0 first):
    smallest `rank` first (the distance to the centroid, or minus the detector score), ties by
    index.

    typical: the `typical` lowest ranks in order; least_typical: the `least_typical` highest
    ranks, highest first, among the masks not shown as typical, so a cluster of at most
    `typical` masks shows each once and an empty one shows none. `usable(i)`, when given, is
    asked once for each mask about to be shown, in that order, only when its cluster is
    reached; a mask it refuses is skipped and the next one in the ranking takes its place.
    Size and share count every mask, or are `sizes` (masks per cluster) when the masks are only
    each cluster's extremes (`ClusterExtremes`).
    """
    labels = np.asarray(labels)
    rank = np.asarray(rank, dtype=np.float64)
    if labels.ndim != 1 or rank.shape != labels.shape:
        raise ValueError(f"need labels [N] and rank [N], got {labels.shape} and {rank.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer cluster ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_clusters):
        raise ValueError(
            f"labels must lie in 0..{num_clusters - 1}, got {labels.min()}..{labels.max()}"
        )
    if not np.isfinite(rank).all():
        raise ValueError("rank must be finite: NaN or inf has no place in the ranking")
    if typical < 0 or least_typical < 0:
        raise ValueError(f"tile counts must be >= 0, got {typical} and {least_typical}")
    labels = labels.astype(np.int64, copy=False)
    order = np.lexsort((np.arange(len(labels)), rank, labels))  # by cluster, rank, index
    counts = np.bincount(labels, minlength=num_clusters)
    if sizes is None:
        sizes = counts
    elif sizes.shape != (num_clusters,) or (sizes < counts).any():
        raise ValueError(f"sizes {sizes.tolist()} must count at least the given masks per cluster")
    starts = np.concatenate([[0], np.cumsum(counts)])
    return _clusters(order, sizes, starts, typical, least_typical, usable)


def _clusters(
    order: np.ndarray,
    sizes: np.ndarray,
    starts: np.ndarray,
    typical: int,
    least_typical: int,
    usable: Callable[[int], bool] | None,
) -> Iterator[ClusterTiles]:
    total = int(sizes.sum())
    for k, size in enumerate(sizes.tolist()):
        members = order[starts[k] : starts[k + 1]].tolist()
        front, examined, skipped = _take(members, typical, usable)
        back, _, skipped_back = _take(members[examined:][::-1], least_typical, usable)
        yield ClusterTiles(
            cluster=k,
            size=size,
            share=size / total if total else 0.0,
            typical=tuple(front),
            least_typical=tuple(back),
            skipped=tuple(skipped + skipped_back),
        )


def _take(
    ranked: Sequence[int], count: int, usable: Callable[[int], bool] | None
) -> tuple[list[int], int, list[int]]:
    """The first `count` usable of `ranked`, how many were examined, and the refused ones."""
    taken: list[int] = []
    refused: list[int] = []
    examined = 0
    for i in ranked:
        if len(taken) == count:
            break
        examined += 1
        if usable is None or usable(i):
            taken.append(i)
        else:
            refused.append(i)
    return taken, examined, refused


class ClusterExtremes:
    """Each cluster's `near` lowest- and `far` highest-ranked masks of a stream of batches
    (rank = `sign` x value, ties by arrival), and each cluster's size, in memory bounded by
    K x (near + far) masks however long the stream. `iter_tiles(labels, sign * values, K,
    sizes=sizes)` on them chooses as on every mask while at most near - typical (far -
    least_typical) masks of a cluster are refused at its typical (least typical) end."""

    def __init__(
        self,
        num_clusters: int,
        *,
        sign: float = 1.0,
        near: int = TYPICAL + SPARE,
        far: int = LEAST_TYPICAL + SPARE,
    ) -> None:
        if num_clusters < 1 or near < 0 or far < 0:
            raise ValueError(f"need K >= 1 and near, far >= 0, got {num_clusters}, {near}, {far}")
        self.num_clusters, self.sign, self.near, self.far = num_clusters, sign, near, far
        self.sizes = np.zeros(num_clusters, dtype=np.int64)
        self.masks: list[MaskRef] = []
        self.labels = np.zeros(0, dtype=np.int64)
        self.values = np.zeros(0, dtype=np.float64)

    def add(self, masks: Sequence[MaskRef], labels: np.ndarray, values: np.ndarray) -> None:
        """One batch: its masks, their clusters and values, in stream order."""
        labels = np.asarray(labels, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if labels.shape != (len(masks),) or values.shape != labels.shape:
            raise ValueError(f"{len(masks)} masks, labels {labels.shape}, values {values.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_clusters):
            raise ValueError(f"labels must lie in 0..{self.num_clusters - 1}")
        self.sizes += np.bincount(labels, minlength=self.num_clusters)
        labels = np.concatenate([self.labels, labels])
        values = np.concatenate([self.values, values])
        order = np.lexsort((np.arange(len(labels)), self.sign * values, labels))
        ranked = labels[order]
        counts = np.bincount(ranked, minlength=self.num_clusters)
        place = np.arange(len(ranked)) - (np.cumsum(counts) - counts)[ranked]  # within cluster
        keep = np.sort(order[(place < self.near) | (place >= counts[ranked] - self.far)])
        everything = [*self.masks, *masks]  # kept ones first: stream order is list order
        self.masks = [everything[i] for i in keep.tolist()]
        self.labels, self.values = labels[keep], values[keep]


@dataclass(frozen=True)
class MaskRef:
    """One mask a gallery may show: its image, its COCO RLE counts on that image, and for a
    distilled mask which of the image's candidates it is."""

    image_id: str
    height: int
    width: int
    rle: str
    candidate: int | None = None

    def mask(self) -> np.ndarray:
        """The bool [height, width] mask."""
        return decode_rle({"size": [self.height, self.width], "counts": self.rle})


def kept_candidates(
    rows: Iterable[Mapping[str, Any]], *, tau: float, keep_best_when_none: bool
) -> tuple[list[MaskRef], np.ndarray, np.ndarray]:
    """The confident masks the distill stage kept (Sec 3.3, `confident_masks`) of PSEUDO_SCHEMA
    rows: their references, 0-based clusters (int64) and detector scores (float64)."""
    refs: list[MaskRef] = []
    classes: list[int] = []
    scores: list[float] = []
    for row in rows:
        kept = stored_kept(row, tau=tau, keep_best_when_none=keep_best_when_none)
        for j in kept.tolist():
            refs.append(
                MaskRef(
                    str(row["image_id"]),
                    int(row["height"]),
                    int(row["width"]),
                    str(row["candidate_rle"][j]),
                    candidate=j,
                )
            )
            classes.append(int(row["candidate_class"][j]))
            scores.append(float(row["candidate_score"][j]))
    return refs, np.asarray(classes, dtype=np.int64), np.asarray(scores, dtype=np.float64)


# ---- the drawing -----------------------------------------------------------------------------


def cluster_colour(cluster: int) -> tuple[int, int, int]:
    """The colour cluster `cluster` has in label maps and overlays (label 1 + cluster)."""
    r, g, b = palette(cluster + 2)[1 + cluster]
    return int(r), int(g), int(b)


def crop_window(mask: np.ndarray) -> tuple[int, int, int]:
    """(x0, y0, side): the square window a tile shows, centred on the mask's box with `MARGIN`
    of its longer side on each side (at least `MIN_CROP` px); the whole image for an empty mask.
    The window may reach past the image."""
    height, width = mask.shape
    x0, y0, x1, y1 = mask_to_box(mask) if mask.any() else (0, 0, width, height)
    side = max(MIN_CROP, math.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * MARGIN)))
    return (x0 + x1 - side) // 2, (y0 + y1 - side) // 2, side


def gallery_tile(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], *, size: int = TILE
) -> np.ndarray:
    """uint8 [size, size, 3]: the image around the mask (`crop_window`, `OUTSIDE` past the
    image's edge), resized, the mask tinted in `colour` and outlined in it."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match the image {image.shape[:2]}")
    x0, y0, side = crop_window(mask)
    pixels = np.empty((side, side, 3), dtype=np.uint8)
    pixels[:] = OUTSIDE
    shown = np.zeros((side, side), dtype=bool)
    rows = slice(max(y0, 0), min(y0 + side, mask.shape[0]))
    cols = slice(max(x0, 0), min(x0 + side, mask.shape[1]))
    inside = (slice(rows.start - y0, rows.stop - y0), slice(cols.start - x0, cols.stop - x0))
    pixels[inside] = image[rows, cols]
    shown[inside] = mask[rows, cols]
    pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    shown = resize_nearest(shown, (size, size))
    tile = tint(pixels, shown, colour)
    tile[outline(shown)] = colour
    return tile


def picture_width(columns: int = COLUMNS, tile: int = TILE) -> int:
    return GAP + columns * (tile + GAP)


def section_height(count: int, columns: int = COLUMNS, tile: int = TILE) -> int:
    """A caption and the rows of `count` tiles (0 for none)."""
    return CAPTION_HEIGHT + GAP + math.ceil(count / columns) * (tile + GAP) if count else 0


def cluster_picture(
    title: str,
    colour: tuple[int, int, int],
    typical: Sequence[np.ndarray],
    least_typical: Sequence[np.ndarray],
    *,
    captions: tuple[str, str] = ("most typical", "least typical"),
    columns: int = COLUMNS,
) -> np.ndarray:
    """uint8 [TITLE_HEIGHT + section_height(len(typical)) + section_height(len(least)),
    picture_width(), 3]: a title line with the cluster's colour, then each non-empty group of
    square tiles (`TILE` px) under its caption, `columns` a row, `GAP` px apart."""
    width = picture_width(columns)
    parts = [_text_line(title, width, TITLE_HEIGHT, colour)]
    for caption, tiles in zip(captions, (typical, least_typical), strict=True):
        if tiles:
            rows = [list(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
            parts.append(_text_line(caption, width, CAPTION_HEIGHT))
            parts.append(_pad_width(image_grid(rows, tile=TILE, gap=GAP), width))
    return np.concatenate(parts, axis=0)


@dataclass
class SheetRow:
    """One cluster's row of the contact sheet: label lines, colour, its first typical tiles."""

    lines: list[str]
    colour: tuple[int, int, int]
    tiles: list[np.ndarray] = field(default_factory=list)


def contact_sheet(title: str, rows: Sequence[SheetRow], *, count: int = SHEET_TILES) -> np.ndarray:
    """uint8 image: a title line, then one row per cluster, its label on the left and up to
    `count` of its tiles (`SHEET_TILE` px) to the right."""
    width = LABEL_WIDTH + picture_width(count, SHEET_TILE)
    height = SHEET_TILE + 2 * GAP
    parts = [_text_line(title, width, TITLE_HEIGHT)]
    for row in rows:
        label = _label(row.lines, row.colour, height)
        tiles = row.tiles[:count]
        strip = (
            image_grid([tiles], tile=SHEET_TILE, gap=GAP)
            if tiles
            else np.full((height, GAP, 3), 255, dtype=np.uint8)
        )
        parts.append(_pad_width(np.concatenate([label, strip], axis=1), width))
    return np.concatenate(parts, axis=0)


def _text_line(
    text: str, width: int, height: int, colour: tuple[int, int, int] | None = None
) -> np.ndarray:
    """A white strip with `text` in black, after a swatch of `colour` if given."""
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    x = GAP
    if colour is not None:
        swatch = height - 2 * GAP
        draw.rectangle((x, GAP, x + swatch, GAP + swatch), fill=colour, outline="black")
        x += swatch + GAP
    font = ImageFont.load_default()
    draw.text((x, (height - font.getbbox(text)[3]) // 2), text, fill="black", font=font)
    return np.asarray(picture)


def _label(lines: Sequence[str], colour: tuple[int, int, int], height: int) -> np.ndarray:
    picture = Image.new("RGB", (LABEL_WIDTH, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.rectangle((GAP, GAP, GAP + 12, GAP + 12), fill=colour, outline="black")
    font = ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((GAP + (16 if i == 0 else 0), GAP + 14 * i), line, fill="black", font=font)
    return np.asarray(picture)


def _pad_width(picture: np.ndarray, width: int) -> np.ndarray:
    """The picture on the left of a white canvas `width` px wide."""
    if picture.shape[1] >= width:
        return picture
    pad = np.full((picture.shape[0], width - picture.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([picture, pad], axis=1)


def index_html(gallery: Mapping[str, Any]) -> str:
    """A self-contained page (no external assets, relative links): each cluster's size, share
    and picture, and links to the sheet and gallery.json, from a `gallery.json` document."""
    esc = html.escape
    title = f"{gallery['stage']} gallery: {gallery['split']}"
    rows = []
    for entry in gallery["clusters"]:
        k = entry["cluster"]
        r, g, b = cluster_colour(k)
        picture = entry["picture"]
        shown = (
            f'<a href="{esc(picture)}"><img src="{esc(picture)}" alt="cluster {k}" '
            f'loading="lazy"></a>'
            if picture
            else "<em>no masks to show</em>"
        )
        rows.append(
            f'<tr id="cluster-{k}"><td><span class="swatch" '
            f'style="background:rgb({r},{g},{b})"></span>cluster {k}</td>'
            f"<td>{entry['size']}</td><td>{entry['share']:.1%}</td><td>{shown}</td></tr>"
        )
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(title)}</title>",
            "<style>body{font-family:sans-serif;margin:1.5em}td,th{padding:4px 8px;"
            "text-align:left;vertical-align:top}tr:nth-child(even){background:#f4f4f4}"
            ".swatch{display:inline-block;width:12px;height:12px;margin-right:6px;"
            "border:1px solid #000}img{max-width:100%}</style>",
            "</head><body>",
            f"<h1>{esc(title)}</h1>",
            f"<p>{gallery['total']} masks in {gallery['num_clusters']} clusters. "
            f"{esc(gallery['order'])}</p>",
            f'<p><a href="{SHEET}">contact sheet</a> · <a href="{CHOICE}">{CHOICE}</a></p>',
            "<table><tr><th>cluster</th><th>masks</th><th>share</th><th>picture</th></tr>",
            *rows,
            "</table></body></html>",
            "",
        ]
    )


# ---- the writers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """What orders a gallery's masks: `key` names the value in gallery.json; `sign` * value is
    the rank (smaller: more typical)."""

    key: str
    sign: float
    order: str
    captions: tuple[str, str]
    noun: str


DISTANCE = Measure(
    "distance",
    1.0,
    "Typical masks are nearest their cluster's K-means centroid (squared L2 distance in the "
    "space K-means works in), least typical farthest; nearest first, then farthest first.",
    ("most typical: nearest the centroid", "least typical: farthest from the centroid"),
    "masks",
)
SCORE = Measure(
    "score",
    -1.0,
    "Confident masks the distill stage kept; typical are the detector's highest scores, least "
    "typical its lowest kept; highest first, then lowest first.",
    ("most confident", "least confident kept"),
    "confident masks",
)


def write_gallery(
    run: RunDir,
    stage: str,
    split: str,
    dataset: Dataset,
    masks: Sequence[MaskRef],
    labels: np.ndarray,
    values: np.ndarray,
    num_clusters: int,
    measure: Measure,
    *,
    sizes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Choose each cluster's tiles by `measure` of `values`, draw them from `dataset` and write
    the gallery under `<stage>/gallery/`, replacing an earlier one; returns gallery.json's
    document. Only the shown masks' images are read; an unreadable one (or one whose size no
    longer matches its mask) is skipped, listed, and the next mask in the ranking shown instead.
    `sizes`: masks per cluster when `masks` are only their extremes (`ClusterExtremes`).
    """
    folder = gallery_folder(stage)
    run.remove(folder)
    labels = np.asarray(labels, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    reasons: dict[int, str] = {}

    def usable(i: int) -> bool:
        ref = masks[i]
        try:
            image = dataset.load(ref.image_id).image
        except UnreadableImage as err:
            reasons[i] = err.reason
            return False
        if image.shape[:2] != (ref.height, ref.width):
            reasons[i] = (
                f"the image is {image.shape[0]}x{image.shape[1]}, its mask {ref.height}x{ref.width}"
            )
            return False
        mask, colour = ref.mask(), cluster_colour(int(labels[i]))
        drawn[i] = (
            gallery_tile(image, mask, colour),
            gallery_tile(image, mask, colour, size=SHEET_TILE),
        )
        return True

    def tile(i: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"image_id": masks[i].image_id, measure.key: float(values[i])}
        if masks[i].candidate is not None:
            entry["candidate"] = masks[i].candidate
        return entry

    total = len(masks) if sizes is None else int(sizes.sum())
    entries: list[dict[str, Any]] = []
    sheet: list[SheetRow] = []
    ranks = measure.sign * values
    for chosen in iter_tiles(labels, ranks, num_clusters, usable=usable, sizes=sizes):
        k, colour = chosen.cluster, cluster_colour(chosen.cluster)
        picture = None
        if chosen.typical or chosen.least_typical:
            picture = picture_name(k)
            drawing = cluster_picture(
                f"cluster {k}: {chosen.size} {measure.noun}, {chosen.share:.1%} of {total}",
                colour,
                [drawn[i][0] for i in chosen.typical],
                [drawn[i][0] for i in chosen.least_typical],
                captions=measure.captions,
            )
            run.write_bytes(png_bytes(drawing), folder, picture)
        lines = [f"cluster {k}", f"{chosen.size} {measure.noun}", f"{chosen.share:.1%}"]
        sheet.append(SheetRow(lines, colour, [drawn[i][1] for i in chosen.typical[:SHEET_TILES]]))
        entries.append(
            {
                "cluster": k,
                "size": chosen.size,
                "share": chosen.share,
                "picture": picture,
                "typical": [tile(i) for i in chosen.typical],
                "least_typical": [tile(i) for i in chosen.least_typical],
                "skipped": [
                    {"image_id": masks[i].image_id, "reason": reasons[i]} for i in chosen.skipped
                ],
            }
        )
        drawn.clear()  # keep one cluster's tiles at a time
    title = (
        f"{stage} gallery, {split_name(split)}: {total} {measure.noun} in {num_clusters} clusters"
    )
    run.write_bytes(png_bytes(contact_sheet(title, sheet)), folder, SHEET)
    gallery = {
        "stage": stage,
        "split": split_name(split),
        "total": total,
        "num_clusters": num_clusters,
        "measure": measure.key,
        "order": measure.order,
        "tile": TILE,
        "clusters": entries,
    }
    run.write_json(gallery, folder, CHOICE)
    run.write_bytes(index_html(gallery).encode(), folder, INDEX)
    return gallery


def picture_name(cluster: int) -> str:
    return f"cluster_{cluster:03d}.png"


def write_cluster_gallery(
    config: ExperimentConfig, run: RunDir, split: str | None = None
) -> dict[str, Any]:
    """The cluster stage's gallery of `split` (default: train): typical = nearest the centroid,
    from `cluster/<split>.parquet` and `cluster/kmeans.npz`, read one row group at a time."""
    split = config.data.train_split if split is None else split
    result = read_kmeans(run)
    extremes = ClusterExtremes(len(result.centroids), sign=DISTANCE.sign)
    for table in iter_labeled(run, split, [*REF_COLUMNS, "feature", "cluster"]):
        labels = table.column("cluster").to_numpy().astype(np.int64)
        points = result.transform.apply(features_of(table))
        distances = centroid_distances(points, result.centroids, labels)
        columns = table.select(list(REF_COLUMNS)).to_pydict()
        masks = [MaskRef(*row) for row in zip(*columns.values(), strict=True)]
        extremes.add(masks, labels, distances)
    dataset = dataset_of(config.data, split)
    return _write_extremes(run, CLUSTER, split, dataset, extremes, DISTANCE)


def write_distill_gallery(
    config: ExperimentConfig, run: RunDir, split: str | None = None
) -> dict[str, Any]:
    """The distill stage's gallery of `split` (default: train): its kept (confident) masks,
    typical = the detector's highest scores, from `distill/<split>/part-*.parquet`, read one
    part at a time."""
    split = config.data.train_split if split is None else split
    columns = (
        "image_id",
        "height",
        "width",
        "kept",
        "candidate_rle",
        "candidate_score",
        "candidate_class",
    )
    labels = config.pseudo_labels
    extremes = ClusterExtremes(num_clusters(run), sign=SCORE.sign)
    for table in iter_parts(run, pseudo_folder(split), columns):
        extremes.add(
            *kept_candidates(
                table.to_pylist(), tau=labels.tau, keep_best_when_none=labels.keep_best_when_none
            )
        )
    dataset = dataset_of(config.data, split)
    return _write_extremes(run, DISTILL, split, dataset, extremes, SCORE)


def _write_extremes(
    run: RunDir,
    stage: str,
    split: str,
    dataset: Dataset,
    extremes: ClusterExtremes,
    measure: Measure,
) -> dict[str, Any]:
    return write_gallery(
        run,
        stage,
        split,
        dataset,
        extremes.masks,
        extremes.labels,
        extremes.values,
        extremes.num_clusters,
        measure,
        sizes=extremes.sizes,
    )
