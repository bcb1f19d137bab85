from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from maskdistill import evaluate, outputs
from maskdistill.config import DataConfig, ExperimentConfig
from maskdistill.data.base import Dataset, Sample, UnreadableImage
from maskdistill.masks import encode_rle
from maskdistill.rundir import RunDir
from tests.runs import NUM_CLASSES, write_run


def test_mined_label_map_paints_the_mask_with_one_plus_its_cluster() -> None:
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True
    row = {"mask_rle": encode_rle(mask)["counts"], "cluster": 2}
    labels = evaluate.mined_label_map(row, (4, 5))
    assert labels.dtype == np.int64
    assert (labels[mask] == 3).all() and (labels[~mask] == 0).all()
    assert not evaluate.mined_label_map(None, (4, 5)).any()


def test_label_names_follow_the_matching_and_fall_back_to_clusters() -> None:
    names = evaluate.label_names([0, 2, -1, 1], ["background", "cat", "dog"])
    assert names == ["background", "dog", "cluster 1", "cat"]
    assert evaluate.label_names([-1, -1], ["background"]) == ["background", "cluster 0"]


def test_table1_lists_present_rows_in_the_papers_order_in_percent() -> None:
    metrics = {evaluate.SEGMENTER: {"miou": 0.5}, evaluate.MINED: {"miou": 0.125}}
    lines = evaluate.table1(metrics).splitlines()
    assert lines[2] == f"| {evaluate.MINED} | 12.5 |"
    assert lines[3] == f"| {evaluate.SEGMENTER} | 50.0 |"
    assert len(lines) == 4


def test_findings_sum_confusions_over_images() -> None:
    findings = evaluate.Findings(num_predicted=3, num_classes=2, num_overlays=0)
    truth = np.array([[0, 1], [1, 255]])
    findings.add("row", np.array([[0, 2], [2, 1]]), truth)
    findings.add("row", np.array([[1, 1], [1, 1]]), truth)
    assert findings.confusion["row"].tolist() == [[1, 0], [1, 2], [0, 2]]


def test_evaluation_needs_a_val_split(tmp_path: Path) -> None:
    config = ExperimentConfig.model_validate(
        {"run_dir": str(tmp_path), "data": {"val_split": None}}
    )
    with pytest.raises(ValueError, match="val_split"):
        evaluate.evaluate_split(config)


class _CountingLoads:
    """A split's data set that counts `load` per image id and cannot read `unreadable`."""

    def __init__(self, dataset: Dataset, loads: Counter[str], unreadable: str = "") -> None:
        self.dataset, self.loads, self.unreadable = dataset, loads, unreadable
        self.class_names = dataset.class_names

    def image_ids(self) -> list[str]:
        return self.dataset.image_ids()

    def load(self, image_id: str) -> Sample:
        self.loads[image_id] += 1
        if image_id == self.unreadable:
            raise UnreadableImage(image_id, "planted")
        return self.dataset.load(image_id)


def test_linear_probe_is_scored_in_the_single_pass_over_val(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RunDir(
        str(
            write_run(
                tmp_path,
                "data.synthetic.train_images=3",
                "data.synthetic.val_images=4",
                "data.synthetic.image_size=[32, 48]",
                "evaluation.resources.num_gpus=0",
                "evaluation.resources.batch_size=3",
                "evaluation.resources.loader_workers=0",  # loads counted in this process
                "evaluation.linear_probe=true",
                "evaluation.probe_epochs=1",
                "evaluation.mask_ap=false",
                "evaluation.num_overlays=0",
            )
        )
    ).read_config()
    loads: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}
    real = evaluate.dataset_of

    def counting(data: DataConfig, split: str) -> _CountingLoads:
        return _CountingLoads(real(data, split), loads[split], unreadable="val_000001")

    # no mined masks, no pseudo labels (no distill parts)
    run = RunDir(str(tmp_path))
    outputs.write_table(run, outputs.LABELED_SCHEMA.empty_table(), *outputs.labeled_path("val"))
    monkeypatch.setattr(evaluate, "dataset_of", counting)

    metrics, findings, class_names = evaluate.evaluate_split(config)
    assert list((tmp_path / "evaluate" / "tensorboard" / "probe").glob("events.out.tfevents.*"))

    assert loads["val"] == {f"val_{i:06d}": 1 for i in range(4)}  # decoded once, probe included
    assert loads["train"] == {f"train_{i:06d}": 1 for i in range(3)}
    classes = len(class_names)
    assert findings.confusion[evaluate.PROBE].shape == (classes, classes)
    assert findings.confusion[evaluate.SEGMENTER].shape == (NUM_CLASSES, classes)
    # The unreadable image is scored by no row: 3 images of 32 x 48 pixels in each.
    for row in (evaluate.SEGMENTER, evaluate.PROBE):
        assert findings.confusion[row].sum() == 3 * 32 * 48
    assert findings.skips.reasons() == {"val_000001": "planted"}
    assert metrics[evaluate.PROBE]["mapping"] == list(range(classes))  # class ids: identity


def test_mask_ap_on_a_split_of_its_own_with_mined_masks_scored_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A.4 (PASCAL: trainval): Table 1 on val, mask AP on `evaluation.mask_ap_split`. Each train
    # image holds one object and its mined mask is exactly that object: class-agnostic AP 1.
    config = RunDir(
        str(
            write_run(
                tmp_path,
                "data.synthetic.train_images=3",
                "data.synthetic.val_images=2",
                "data.synthetic.image_size=[32, 48]",
                "data.synthetic.max_objects=1",
                "evaluation.resources.num_gpus=0",
                "evaluation.linear_probe=false",
                "evaluation.num_overlays=0",
                "evaluation.mask_ap_split=train",
                "evaluation.mined_score=one",
            )
        )
    ).read_config()
    real = evaluate.dataset_of
    train = real(config.data, "train")
    mined = []
    for image_id in train.image_ids():
        sample = train.load(image_id)
        assert sample.instance_masks is not None and len(sample.instance_masks) == 1
        rle = encode_rle(sample.instance_masks[0])["counts"]
        size = {"height": 32, "width": 48}
        mined.append({"image_id": image_id, **size, "mask_rle": rle, "cluster": 0, "score": 0.25})
    run = RunDir(str(tmp_path))
    outputs.write_table(run, pa.Table.from_pylist(mined), *outputs.labeled_path("train"))
    outputs.write_table(run, outputs.LABELED_SCHEMA.empty_table(), *outputs.labeled_path("val"))
    unreadable = train.image_ids()[1]

    def one_unreadable(data: DataConfig, split: str) -> Dataset:
        dataset = real(data, split)
        return _CountingLoads(dataset, Counter(), unreadable if split == "train" else "")

    monkeypatch.setattr(evaluate, "dataset_of", one_unreadable)  # no distill parts: no candidates

    metrics, findings, _ = evaluate.evaluate_split(config)
    readable = [i for i in train.image_ids() if i != unreadable]
    assert [s.image_id for s in findings.truth] == readable  # train's, none of val's
    assert [s.scores.tolist() for s in findings.mined] == [[1.0], [1.0]]  # not 0.25
    assert metrics[evaluate.MASK_AP_SET] == {"split": "train", "images": 2}
    assert metrics["mask AP"]["mined single class-agnostic"]["AP"] == pytest.approx(1.0)
    assert metrics["mask AP"]["detector multi class-agnostic"]["AP"] == 0.0  # no candidates
    assert findings.scored == 2 and findings.skips.reasons() == {unreadable: "planted"}
