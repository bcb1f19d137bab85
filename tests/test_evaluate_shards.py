"""The evaluation reads its tables one shard of image ids at a time (issue 18) and scores exactly
what it scored when it read whole splits."""

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from maskdistill import evaluate, outputs
from maskdistill.data.base import UnreadableImage
from maskdistill.rows_by_id import RowsById
from tests.evaluation_run import write_scored_run

# Golden: `evaluate.evaluate_split` at commit 73d2e61 (tables read whole with
# `outputs.read_labeled` / `read_pseudo` into dicts, the split decoded in dataset order, the
# probe's train images listed, then cached) on `write_scored_run`'s run with the overrides of
# each test, run twice with identical results; the probe's row is its weights' |w| sum.
VAL_MIOU = {
    evaluate.MINED: 0.460420328132,
    evaluate.DETECTOR: 0.816929396016,
    evaluate.SEGMENTER: 0.17684128726,
    evaluate.CRF: 0.199944415842,
    evaluate.PROBE: 0.186588541667,
    evaluate.PROBE_CRF: 0.186588541667,
}
VAL_MASK_AP = {  # AP, AP50, AP75
    "mined multi class-agnostic": [0.266905940594, 0.457920792079, 0.168316831683],
    "mined multi semantic": [0.246287128713, 0.362211221122, 0.1699669967],
    "mined single class-agnostic": [0.399381188119, 0.681930693069, 0.257425742574],
    "mined single semantic": [0.352722772277, 0.543729372937, 0.211221122112],
    "detector multi class-agnostic": [0.340669693343, 0.668005262065, 0.275907590759],
    "detector multi semantic": [0.394636963696, 0.715346534653, 0.317244224422],
    "detector single class-agnostic": [0.342014380009, 0.62004950495, 0.288071664309],
    "detector single semantic": [0.35896589659, 0.752475247525, 0.254125412541],
}
TRAIN_MASK_AP = {  # mask AP on the 4 train images, mined masks scored 1
    "mined multi class-agnostic": [0.30099009901, 0.425742574257, 0.287128712871],
    "mined multi semantic": [0.115511551155, 0.135313531353, 0.135313531353],
    "mined single class-agnostic": [0.529702970297, 0.752475247525, 0.50495049505],
    "mined single semantic": [0.430693069307, 0.50495049505, 0.50495049505],
    "detector multi class-agnostic": [0.681753889675, 1.0, 0.615841584158],
    "detector multi semantic": [0.707590759076, 1.0, 0.574257425743],
    "detector single class-agnostic": [0.690594059406, 1.0, 0.690594059406],
    "detector single semantic": [0.690594059406, 1.0, 0.690594059406],
}
CONFUSION = {  # [segmenter label, true class] pixels of the 10 val images (32 x 48 each)
    evaluate.MINED: [
        [14252, 123, 112, 132, 124],
        [18, 6, 244, 0, 0],
        [24, 0, 84, 0, 0],
        [20, 113, 0, 0, 0],
        [16, 0, 0, 92, 0],
    ],
    evaluate.DETECTOR: [
        [14249, 28, 58, 61, 13],
        [20, 0, 382, 0, 0],
        [13, 0, 0, 0, 111],
        [28, 214, 0, 0, 0],
        [20, 0, 0, 163, 0],
    ],
}
PROBE_WEIGHT_ABS_SUM = 27.855917707510343


def _ap(results: dict[str, dict[str, float]]) -> dict[tuple[str, str], float]:
    return {(name, k): ap[k] for name, ap in results.items() for k in ("AP", "AP50", "AP75")}


def _golden(table: dict[str, list[float]]) -> dict[tuple[str, str], float]:
    keys = ("AP", "AP50", "AP75")
    return {(n, k): v for n, row in table.items() for k, v in zip(keys, row, strict=True)}


def test_scores_by_shard_equal_the_whole_split_golden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 val images in shards of 4 sorted ids (4, 4, 2), batches of 3 across them.
    config = write_scored_run(
        tmp_path,
        "evaluation.linear_probe=true",
        "evaluation.probe_epochs=8",
        "evaluation.probe_batch_size=1",
        "evaluation.crf=true",
        "evaluation.num_overlays=2",
    )
    fits: list[torch.nn.Conv2d] = []
    fit = evaluate.probe.fit_linear_probe
    monkeypatch.setattr(
        evaluate.probe, "fit_linear_probe", lambda *a, **k: fits.append(fit(*a, **k)) or fits[-1]
    )
    metrics, findings, _ = evaluate.evaluate_split(config)
    assert {row: metrics[row]["miou"] for row in VAL_MIOU} == pytest.approx(VAL_MIOU, abs=1e-11)
    assert _ap(metrics["mask AP"]) == pytest.approx(_golden(VAL_MASK_AP), abs=1e-11)
    assert metrics[evaluate.MASK_AP_SET] == {"split": "val", "images": 10}
    for row, confusion in CONFUSION.items():
        assert findings.confusion[row].tolist() == confusion
    assert findings.confusion[evaluate.SEGMENTER].sum() == 10 * 32 * 48
    assert [s.image_id for s in findings.truth] == [f"val_{i:06d}" for i in range(10)]
    assert len(findings.overlays) == 2 and findings.scored == 10
    (probe,) = fits  # probe_crf is the same probe (no self-training)
    weights = float(probe.weight.detach().double().abs().sum())
    assert weights == pytest.approx(PROBE_WEIGHT_ABS_SUM, rel=1e-6)


def test_mask_ap_split_by_shard_equals_the_golden(tmp_path: Path) -> None:
    config = write_scored_run(
        tmp_path,
        "evaluation.linear_probe=false",
        "evaluation.mask_ap_split=train",
        "evaluation.mined_score=one",
        "evaluation.num_overlays=0",
    )
    metrics, findings, _ = evaluate.evaluate_split(config)
    assert _ap(metrics["mask AP"]) == pytest.approx(_golden(TRAIN_MASK_AP), abs=1e-11)
    assert metrics[evaluate.MASK_AP_SET] == {"split": "train", "images": 4}
    assert metrics[evaluate.MINED]["miou"] == pytest.approx(VAL_MIOU[evaluate.MINED], abs=1e-11)
    assert [s.scores.tolist() for s in findings.mined][:3] == [[1.0], [1.0], [1.0]]


class _Watched:
    """Counts what the evaluation reads: rows per `RowsById.rows` call (a shard's), the ids
    asked for, and the rows of every Parquet row group decoded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shards: list[int] = []
        self.kept: list[int] = []
        self.group_rows: list[int] = []
        rows, read_group = RowsById.rows, pq.ParquetFile.read_row_group

        def counted_rows(reader: RowsById, image_ids: list[str]) -> dict[str, Any]:
            found = rows(reader, image_ids)
            self.shards.append(len(image_ids))
            self.kept.append(len(found))
            return found

        def counted_group(parquet: pq.ParquetFile, *args: Any, **kwargs: Any) -> pa.Table:
            table = read_group(parquet, *args, **kwargs)
            self.group_rows.append(table.num_rows)
            return table

        def whole(*args: Any) -> None:
            raise AssertionError("the evaluation read a whole table")

        monkeypatch.setattr(RowsById, "rows", counted_rows)
        monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted_group)
        monkeypatch.setattr(outputs, "read_labeled", whole)
        monkeypatch.setattr(outputs, "read_pseudo", whole)


@pytest.mark.parametrize("val_images", [8, 20])
def test_rows_alive_at_once_are_a_shards_whatever_the_split_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, val_images: int
) -> None:
    # Shards of 4 sorted ids; the cluster table has a row group per 4 images, the distill
    # stage a part per 4: each shard reads one group of each table, 4 rows at most.
    config = write_scored_run(
        tmp_path,
        "evaluation.linear_probe=false",
        "evaluation.num_overlays=0",
        val_images=val_images,
    )
    watched = _Watched(monkeypatch)
    metrics, findings, _ = evaluate.evaluate_split(config)
    shards = val_images // 4
    assert watched.shards == [4] * (2 * shards)  # mined and pseudo rows, per shard
    assert max(watched.kept) == 4 and max(watched.group_rows) == 4
    assert len(watched.group_rows) == 2 * shards  # one row group of each table per shard
    # every image with rows was found: all but every 4th mined, all but every 5th pseudo
    assert sum(watched.kept) == (val_images - val_images // 4) + (val_images - val_images // 5)
    assert findings.scored == val_images == metrics[evaluate.MASK_AP_SET]["images"]


def _ids_table(ids: list[str]) -> pa.Table:
    return pa.table({"image_id": ids, "value": list(range(len(ids)))})


def test_rows_by_id_reads_only_the_row_groups_meeting_the_shard(tmp_path: Path) -> None:
    ids = [f"img_{i:03d}" for i in range(12)]
    pq.write_table(_ids_table(ids), tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(_ids_table(["zz_1", "zz_0"]), tmp_path / "b.parquet")
    reader = RowsById([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], ["value"])
    assert [(g.low, g.high) for g in reader.groups] == [
        ("img_000", "img_003"),
        ("img_004", "img_007"),
        ("img_008", "img_011"),
        ("zz_0", "zz_1"),  # min and max, whatever the order inside
    ]
    found = reader.rows(["img_005", "img_005a", "img_006"])  # 005a has no row
    assert found == {
        "img_005": {"image_id": "img_005", "value": 5},
        "img_006": {"image_id": "img_006", "value": 6},
    }
    assert reader.reads == 1  # only img_004..img_007's group
    assert reader.rows(["img_003", "img_004"]).keys() == {"img_003", "img_004"}
    assert reader.reads == 3  # a shard across two groups reads both
    assert reader.rows(["zz_0"]) == {"zz_0": {"image_id": "zz_0", "value": 1}}
    assert reader.rows([]) == {} and reader.reads == 4


def test_rows_by_id_without_statistics_reads_every_group_and_finds_the_same(
    tmp_path: Path,
) -> None:
    ids = [f"img_{i:03d}" for i in range(6)]
    pq.write_table(
        _ids_table(ids), tmp_path / "a.parquet", row_group_size=2, write_statistics=False
    )
    reader = RowsById([str(tmp_path / "a.parquet")], ["value"])
    assert {(g.low, g.high) for g in reader.groups} == {(None, None)}
    assert reader.rows(["img_004"]) == {"img_004": {"image_id": "img_004", "value": 4}}
    assert reader.reads == 3


def test_rows_by_id_names_the_file_lacking_a_column(tmp_path: Path) -> None:
    pq.write_table(_ids_table(["a"]), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'cluster'"):
        RowsById([str(tmp_path / "a.parquet")], ["cluster"])


class _Loads:
    """A split's data set (built once per process: never changed) that counts its loads and
    cannot read `unreadable`."""

    def __init__(
        self, dataset: Any, loads: Counter[str], unreadable: frozenset[str] = frozenset()
    ) -> None:
        self.dataset, self.loads, self.unreadable = dataset, loads, unreadable
        self.class_names = dataset.class_names

    def image_ids(self) -> list[str]:
        return list(self.dataset.image_ids())

    def load(self, image_id: str) -> Any:
        self.loads[image_id] += 1
        if image_id in self.unreadable:
            raise UnreadableImage(image_id, "planted")
        return self.dataset.load(image_id)


def test_probe_keeps_no_train_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe's train pairs stream into its feature cache: when the first feature batch is
    # computed, only that batch's images have been decoded (4 train images, batches of 1).
    config = write_scored_run(
        tmp_path,
        "evaluation.linear_probe=true",
        "evaluation.probe_epochs=1",
        "evaluation.probe_batch_size=1",
        "evaluation.mask_ap=false",
        "evaluation.num_overlays=0",
    )
    loads: Counter[str] = Counter()
    decoded_before_features: list[int] = []
    real_dataset, real_features = evaluate.dataset_of, evaluate.probe.probe_features

    def dataset_of(data: Any, split: str) -> Any:
        dataset = real_dataset(data, split)
        return _Loads(dataset, loads if split == "train" else Counter())

    def features(model: Any, images: torch.Tensor) -> torch.Tensor:
        decoded_before_features.append(sum(loads.values()))
        return real_features(model, images)

    monkeypatch.setattr(evaluate, "dataset_of", dataset_of)
    monkeypatch.setattr(evaluate.probe, "probe_features", features)
    evaluate.evaluate_split(config)
    assert decoded_before_features[:4] == [1, 2, 3, 4]  # then the val pass predicts


def test_skips_leave_the_task_shard_by_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 val images in shards of 4 (4, 4, 2); val_000001 (shard 0) and val_000009 (shard 2)
    # cannot be read: each comes out with its own shard, none is kept for the end.
    config = write_scored_run(
        tmp_path, "evaluation.linear_probe=false", "evaluation.num_overlays=0"
    )
    real = evaluate.dataset_of
    unreadable = frozenset({"val_000001", "val_000009"})

    def dataset_of(data: Any, split: str) -> Any:
        return _Loads(real(data, split), Counter(), unreadable)

    monkeypatch.setattr(evaluate, "dataset_of", dataset_of)
    items = list(evaluate.evaluate_stream(config))
    *batches, result = items
    assert batches == [
        [("val_000001", "planted")],  # shard 0
        [],  # shard 1
        [("val_000009", "planted")],  # shard 2
        [],  # nothing more while the files were written
    ]
    assert isinstance(result, evaluate.Evaluated) and result.scored == 8
    assert result.metrics[evaluate.MASK_AP_SET] == {"split": "val", "images": 8}
    assert (tmp_path / "evaluate" / "metrics.json").exists()
