"""export-labels: mined and distilled pseudo labels as COCO JSON, read back with pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from maskdistill import outputs
from maskdistill.cli import main
from maskdistill.config import load_config
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.masks import encode_rle, mask_to_box
from maskdistill.pseudolabels import encode_label_map
from maskdistill.rundir import RunDir, StageManifest, write_manifest
from maskdistill.shards import write_shard
from maskdistill.stages import CLUSTER, DISTILL, MINE

H, W = 32, 48
TAU = 0.5
K = 4
# cluster 1 merges into "dog", cluster 2 is background, cluster 3 keeps "cluster 3"
NAMES_YAML = 'clusters:\n  0: "dog"\n  1: 0\n  2: "background"\n'
LABEL_OF = {0: 1, 1: 1, 2: 0, 3: 2}
CATEGORIES = [
    {"id": 1, "name": "dog", "maskdistill_clusters": [0, 1]},
    {"id": 2, "name": "cluster 3", "maskdistill_clusters": [3]},
]
IDS = [f"train_{i:06d}" for i in range(4)]


def blob(seed: int) -> np.ndarray:
    """A bool [H, W] mask: a disc and a bar, so its RLE has several runs per column."""
    rng = np.random.default_rng(seed)
    cy, cx, r = rng.integers(8, 24), rng.integers(10, 38), rng.integers(4, 8)
    y, x = np.mgrid[:H, :W]
    mask = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    mask[2:5, 3 + seed : 20 + seed] = True
    return mask


def mined_row(image_id: str, mask: np.ndarray, score: float, **extra: Any) -> dict[str, Any]:
    return {
        "image_id": image_id, "height": mask.shape[0], "width": mask.shape[1],
        "mask_rle": encode_rle(mask)["counts"], "bbox": list(mask_to_box(mask)),
        "score": score, "seed_patch": [0, 0], "seed_box": [0, 0, 16, 16],
        "feature": [0.0, 1.0], **extra,
    }  # fmt: skip


def pseudo_row(image_id: str, candidates: list[tuple[np.ndarray, float, int]]) -> dict[str, Any]:
    """A distill row as jobs/distill.py writes it: every candidate, `kept` by tau's rule."""
    scores = [s for _, s, _ in candidates]
    passing = sum(s > TAU for s in scores)
    return {
        "image_id": image_id, "height": H, "width": W,
        "label_png": encode_label_map(np.zeros((H, W), np.int64)),
        "kept": passing or min(1, len(scores)),
        "best_score": max(scores, default=float("nan")),
        "candidate_rle": [encode_rle(m)["counts"] for m, _, _ in candidates],
        "candidate_bbox": [detector_box(m) for m, _, _ in candidates],
        "candidate_score": scores,
        "candidate_class": [c for _, _, c in candidates],
    }  # fmt: skip


def detector_box(mask: np.ndarray) -> list[float]:
    """A float box near the mask's, as a detector's regression gives (exact in float32)."""
    x0, y0, x1, y1 = mask_to_box(mask)
    return [x0 - 0.25, y0 + 0.5, x1 + 0.75, y1 - 0.5]


def synthetic_run(tmp_path: Path, *, cluster: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """A run over 4 synthetic train images with one mined mask each (clusters 0..3) and, with
    `cluster`, the cluster stage and names.yaml."""
    run_dir = tmp_path / "run"
    config = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "data.synthetic.train_images=4",
            "data.synthetic.val_images=2",
            f"data.synthetic.image_size=[{H}, {W}]",
            f"pseudo_labels.tau={TAU}",
        ],
    )
    run = RunDir(str(run_dir))
    run.write_config(config)
    rows = [mined_row(i, blob(n), 0.1 * (n + 1), cluster=n) for n, i in enumerate(IDS)]
    mined = [{k: v for k, v in row.items() if k != "cluster"} for row in rows]
    write_shard(run, outputs.mined_folder("train"), 0, mined, [], outputs.MASK_SCHEMA)
    write_manifest(run, StageManifest(MINE, "minehash"))
    if cluster:
        table = pa.Table.from_pylist(rows, schema=outputs.LABELED_SCHEMA)
        outputs.write_table(run, table, *outputs.labeled_path("train"))
        manifest = StageManifest(CLUSTER, "c", upstream={MINE: "minehash"}, metrics={"clusters": K})
        write_manifest(run, manifest)
        (run_dir / "names.yaml").write_text(NAMES_YAML)
    return run_dir, rows


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def assert_same_mask(coco: COCO, ann: dict[str, Any], counts: str) -> None:
    """The annotation's RLE is the Parquet row's, and decodes to the same pixels."""
    rle = coco.annToRLE(ann)
    assert rle["counts"] == counts and rle["size"] == [H, W]
    stored = coco_mask.decode({"size": [H, W], "counts": counts.encode()})
    np.testing.assert_array_equal(coco.annToMask(ann), stored)
    assert ann["area"] == int(stored.sum())


def test_mined_masks_round_trip_with_clusters_named_merged_and_background_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, rows = synthetic_run(tmp_path)
    out = tmp_path / "export" / "labels.json"
    assert main(["export-labels", str(run_dir), str(out), "--stage", "mine"]) == 0
    printed = capsys.readouterr().out
    coco = load_coco(out)
    assert coco.loadCats(coco.getCatIds()) == CATEGORIES
    images = [coco.imgs[i] for i in sorted(coco.imgs)]
    assert [(i["id"], i["maskdistill_id"]) for i in images] == list(enumerate(IDS, start=1))
    scenes = SyntheticScenes(split="train", num_images=4, image_size=(H, W))
    for image in images:
        assert image["file_name"] == f"train/{image['maskdistill_id']}.png"
        assert (image["height"], image["width"]) == (H, W)
        rendered = np.array(Image.open(out.parent / image["file_name"]))
        np.testing.assert_array_equal(rendered, scenes.load(image["maskdistill_id"]).image)
    anns = coco.loadAnns(sorted(coco.getAnnIds()))
    by_id = {row["image_id"]: row for row in rows}
    assert [coco.imgs[a["image_id"]]["maskdistill_id"] for a in anns] == [IDS[0], IDS[1], IDS[3]]
    for ann in anns:
        row = by_id[coco.imgs[ann["image_id"]]["maskdistill_id"]]
        assert_same_mask(coco, ann, row["mask_rle"])
        x0, y0, x1, y1 = row["bbox"]
        assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert ann["bbox"] == coco_mask.toBbox(coco.annToRLE(ann)).tolist()  # tight box
        assert ann["maskdistill_cluster"] == row["cluster"]
        assert ann["category_id"] == LABEL_OF[row["cluster"]]
        assert ann["score"] == pytest.approx(row["score"]) and ann["iscrowd"] == 0
    info = json.loads(out.read_text())["info"]
    assert (info["stage"], info["split"], info["run"]) == ("mine", "train", str(run_dir))
    assert "dog: 2, cluster 3: 1" in printed and "1 annotations of clusters named background" in (
        printed
    )


def test_distilled_export_holds_exactly_the_kept_candidates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = synthetic_run(tmp_path)
    masks = [blob(10 + n) for n in range(7)]
    candidates = {
        IDS[0]: [(masks[0], 0.3, 3), (masks[1], 0.95, 0), (masks[2], 0.7, 2)],  # 0.7: background
        IDS[1]: [(masks[3], 0.2, 1), (masks[4], 0.4, 3)],  # none > tau: the best one is kept
        IDS[2]: [],
        IDS[3]: [(masks[5], TAU, 1), (masks[6], 0.8125, 0)],  # tau itself does not pass
    }
    rows = [pseudo_row(i, found) for i, found in candidates.items()]
    run = RunDir(str(run_dir))
    write_shard(run, outputs.pseudo_folder("train"), 0, rows, [], outputs.PSEUDO_SCHEMA)
    science = {"pseudo_labels.tau": TAU, "pseudo_labels.keep_best_when_none": True}
    write_manifest(run, StageManifest(DISTILL, "d", science=science))
    out = tmp_path / "distill.json"
    assert main(["export-labels", str(run_dir), str(out), "--stage", "distill"]) == 0
    coco = load_coco(out)
    assert coco.loadCats(coco.getCatIds()) == CATEGORIES
    assert len(coco.imgs) == 4  # the image without candidates is listed, with no annotation
    anns = coco.loadAnns(sorted(coco.getAnnIds()))
    expected = [(IDS[0], 1, 1), (IDS[1], 1, 2), (IDS[3], 1, 1)]  # (image, candidate, category)
    assert [(coco.imgs[a["image_id"]]["maskdistill_id"], a["category_id"]) for a in anns] == [
        (i, c) for i, _, c in expected
    ]
    for ann, (image_id, index, _) in zip(anns, expected, strict=True):
        mask, score, cluster = candidates[image_id][index]
        assert_same_mask(coco, ann, encode_rle(mask)["counts"])
        x0, y0, x1, y1 = detector_box(mask)
        assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert ann["score"] == pytest.approx(score) and ann["maskdistill_cluster"] == cluster
    printed = capsys.readouterr().out
    assert "4 images, 3 annotations (dog: 2, cluster 3: 1)" in printed
    assert "1 annotations of clusters named background left out" in printed


def test_distilled_rows_that_disagree_with_the_stage_tau_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = synthetic_run(tmp_path)
    run = RunDir(str(run_dir))
    row = pseudo_row(IDS[0], [(blob(1), 0.7, 0), (blob(2), 0.6, 3)])  # kept 2 at tau 0.5
    write_shard(run, outputs.pseudo_folder("train"), 0, [row], [], outputs.PSEUDO_SCHEMA)
    write_manifest(run, StageManifest(DISTILL, "d", science={"pseudo_labels.tau": 0.65}))
    out = tmp_path / "distill.json"
    assert main(["export-labels", str(run_dir), str(out), "--stage", "distill"]) == 2
    assert "kept 2" in capsys.readouterr().err and not out.exists()


def test_image_folder_run_before_clustering_names_files_under_the_data_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "photos"
    for name, size in (("a.png", (20, 30)), ("sub/b.png", (24, 18))):
        (root / "shots" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size[::-1]).save(root / "shots" / name)
    run_dir = tmp_path / "run"
    config = load_config(
        None,
        [f"run_dir={run_dir}", "data.kind=folder", f"data.root={root}"]
        + ["data.train_split=shots", "data.val_split=null"],
    )
    run = RunDir(str(run_dir))
    run.write_config(config)
    rows = []
    for n, (image_id, (h, w)) in enumerate((("a.png", (20, 30)), ("sub/b.png", (24, 18)))):
        mask = np.zeros((h, w), bool)
        mask[2 + n : 9, 3 : 11 + n] = True
        rows.append(mined_row(image_id, mask, 0.5))
    write_shard(run, outputs.mined_folder("shots"), 0, rows, [], outputs.MASK_SCHEMA)
    write_manifest(run, StageManifest(MINE, "minehash"))
    out = tmp_path / "labels.json"
    assert main(["export-labels", str(run_dir), str(out), "--stage", "mine"]) == 0
    assert "no cluster stage yet" in capsys.readouterr().out
    coco = load_coco(out)
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "object"}]
    for image in coco.imgs.values():
        assert image["file_name"] == f"shots/{image['maskdistill_id']}"
        with Image.open(root / image["file_name"]) as picture:
            assert picture.size == (image["width"], image["height"])
    anns = coco.loadAnns(coco.getAnnIds())
    assert [a["category_id"] for a in anns] == [1, 1] and "maskdistill_cluster" not in anns[0]
    assert not list(out.parent.glob("shots"))  # real files: nothing rendered
    assert main(["export-labels", str(run_dir), str(out), "--stage", "mine"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export-labels", str(run_dir), str(out), "--stage", "mine", "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "distill"], "stage 'distill' has not run"),
        (["--stage", "mine", "--split", "test"], "split 'test': not a split of this run"),
    ],
)
def test_bad_input_exits_2_naming_the_stage_or_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    run_dir, _ = synthetic_run(tmp_path, cluster=False)
    out = tmp_path / "labels.json"
    assert main(["export-labels", str(run_dir), str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_not_a_run_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "labels.json"
    assert main(["export-labels", str(tmp_path / "nope"), str(out), "--stage", "mine"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists() and not out.exists()
