"""Mask R-CNN distillation (Sec 3.2, A.1): model building, MoCo init, targets, training, predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.ops import FrozenBatchNorm2d

from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.detector import (
    Candidates,
    MaskTargets,
    build_detector,
    collate,
    detector_losses,
    predict,
    total_loss,
)
from maskdistill.masks import decode_rle, encode_rle, mask_to_box
from maskdistill.weights import MOCO_PREFIX
from tests.moco import moco_release_state, save_moco

SIZE = (96, 128)
NUM_CLASSES = 4  # 3 clusters + background
# Small sizes and proposal counts keep a CPU training step well under a second.
SMALL: dict[str, Any] = {
    "arch": "maskrcnn_resnet18_fpn",
    "num_classes": NUM_CLASSES,
    "train_short_sides": (96, 128),
    "test_short_side": 128,
    "max_size": 192,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 20,
}
LOSS_NAMES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
FROZEN_PREFIXES = ("conv1.", "bn1.", "layer1.")


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenes:
    return SyntheticScenes(num_images=4, image_size=SIZE)


@pytest.fixture(scope="module")
def rows(scenes: SyntheticScenes) -> list[dict[str, Any]]:
    """One labelled-mask row per image: its largest ground-truth instance, cluster = class - 1."""
    out = []
    for image_id in scenes.image_ids():
        sample = scenes.load(image_id)
        assert sample.instance_masks is not None and sample.instance_classes is not None
        k = int(sample.instance_masks.sum(axis=(1, 2)).argmax())
        mask = sample.instance_masks[k]
        out.append(
            {
                "image_id": image_id,
                "height": SIZE[0],
                "width": SIZE[1],
                "mask_rle": encode_rle(mask)["counts"],
                "bbox": list(mask_to_box(mask)),
                "cluster": int(sample.instance_classes[k]) % (NUM_CLASSES - 1),
            }
        )
    return out


def decoded(row: dict[str, Any]) -> np.ndarray:
    return decode_rle({"size": [row["height"], row["width"]], "counts": row["mask_rle"]})


def body_tensors(model: MaskRCNN) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.backbone.body.state_dict().items()}


@pytest.fixture(scope="module")
def training_run(rows: list[dict[str, Any]], scenes: SyntheticScenes) -> dict[str, Any]:
    """Three SGD steps on batches of 2 from a random-init resnet18 detector."""
    torch.manual_seed(0)
    model = build_detector(**SMALL)
    before = body_tensors(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        MaskTargets(rows, scenes), batch_size=2, shuffle=False, collate_fn=collate
    )
    losses, grads = [], {}
    for step, (images, targets) in enumerate([*loader, next(iter(loader))]):
        optimizer.zero_grad()
        parts = detector_losses(model, images, targets)
        total_loss(parts).backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        losses.append({k: float(v.detach()) for k, v in parts.items()})
    return {"model": model, "before": before, "losses": losses, "grads": grads}


def test_losses_are_the_eq3_and_rpn_terms_and_finite(training_run: dict[str, Any]) -> None:
    for parts in training_run["losses"]:
        assert set(parts) == LOSS_NAMES
        assert all(np.isfinite(v) and v >= 0 for v in parts.values()), parts


def test_total_loss_is_the_sum() -> None:
    parts = {"a": torch.tensor(1.5), "b": torch.tensor(2.0, requires_grad=True)}
    loss = total_loss(parts)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(3.5)
    assert float(parts["b"].grad) == 1.0  # type: ignore[arg-type]


def test_every_trainable_parameter_gets_a_finite_nonzero_gradient(
    training_run: dict[str, Any],
) -> None:
    grads = training_run["grads"]
    names = {n for n, p in training_run["model"].named_parameters() if p.requires_grad}
    assert grads.keys() == names
    for prefix in ("backbone.body.layer2", "backbone.fpn", "rpn", "roi_heads.mask_predictor"):
        assert any(n.startswith(prefix) for n in names), prefix
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_frozen_stages_stay_frozen(training_run: dict[str, Any]) -> None:
    model, before = training_run["model"], training_run["before"]
    after = body_tensors(model)
    frozen = [k for k in before if k.startswith(FROZEN_PREFIXES)]
    assert "bn1.running_mean" in frozen and "layer1.0.bn1.running_var" in frozen
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert isinstance(model.backbone.body.layer1[0].bn1, FrozenBatchNorm2d)
    # the trainable stages did train, running statistics included (init "none": plain BN)
    assert isinstance(model.backbone.body.layer2[0].bn1, torch.nn.BatchNorm2d)
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])


@pytest.mark.parametrize(
    ("layers", "trained"),
    [
        (3, ("layer2.", "layer3.", "layer4.")),
        (0, ()),
        (5, ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")),
    ],
)
def test_trainable_backbone_layers(layers: int, trained: tuple[str, ...]) -> None:
    model = build_detector(**SMALL, trainable_backbone_layers=layers)
    for name, param in model.backbone.body.named_parameters():
        assert param.requires_grad == name.startswith(trained), name


def test_eval_uses_the_test_size_and_training_draws_from_the_train_sizes() -> None:
    model = build_detector(**{**SMALL, "test_short_side": 112})
    image = torch.rand(3, *SIZE)
    model.eval()
    assert model.transform.min_size == (112,)
    assert model.transform([image])[0].image_sizes == [(112, 149)]
    model.train()
    assert model.transform.min_size == (96, 128)
    torch.manual_seed(0)
    sides = {min(model.transform([image])[0].image_sizes[0]) for _ in range(20)}
    assert sides == {96, 128}


@pytest.mark.parametrize("arch", ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_resnet50_heads_have_one_output_per_class(arch: str) -> None:
    model = build_detector(arch=arch, num_classes=21)
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 21 * 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 21
    assert model.transform.min_size == tuple(range(480, 801, 32))
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad


@pytest.fixture(scope="module")
def moco_state() -> dict[str, torch.Tensor]:
    return moco_release_state(1)


def test_moco_checkpoint_initialises_the_backbone_body(
    moco_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = save_moco(moco_state, tmp_path / "moco_v2.pth.tar")
    model = build_detector(num_classes=3, init="moco", init_path=path)
    loaded = model.backbone.body.state_dict()
    expected = {
        k[len(MOCO_PREFIX) :]: v
        for k, v in moco_state.items()
        if k.startswith(MOCO_PREFIX) and ".fc." not in k and not k.endswith("num_batches_tracked")
    }
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    bns = [m for m in model.backbone.body.modules() if "BatchNorm" in type(m).__name__]
    assert bns and all(isinstance(m, FrozenBatchNorm2d) for m in bns)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad


def test_moco_checkpoint_missing_a_key_names_file_and_key(
    moco_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    broken = {k: v for k, v in moco_state.items() if k != f"{MOCO_PREFIX}layer3.0.conv1.weight"}
    path = save_moco(broken, tmp_path / "broken.pth.tar")
    with pytest.raises(ValueError, match="broken.pth.tar") as err:
        build_detector(num_classes=3, init="moco", init_path=path)
    assert "missing keys: 1: layer3.0.conv1.weight" in str(err.value)
    assert "unexpected keys: 0" in str(err.value)


def test_moco_init_needs_a_path() -> None:
    with pytest.raises(ValueError, match="init_path"):
        build_detector(num_classes=3, init="moco")


def test_mask_targets_golden(rows: list[dict[str, Any]], scenes: SyntheticScenes) -> None:
    targets = MaskTargets(rows, scenes, hflip=False)
    assert len(targets) == len(rows)
    for i, row in enumerate(rows):
        image, target = targets[i]
        mask = decoded(row)
        assert image.dtype == torch.uint8 and image.shape == (3, *SIZE)  # scaled on the device
        expected = torch.from_numpy(scenes.load(row["image_id"]).image).permute(2, 0, 1)
        assert torch.equal(image, expected)
        assert target["labels"].tolist() == [row["cluster"] + 1]
        assert target["labels"].dtype == torch.int64
        assert target["boxes"].dtype == torch.float32
        assert target["boxes"].tolist() == [list(mask_to_box(mask))] == [row["bbox"]]
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (1, *SIZE)
        assert np.array_equal(target["masks"][0].numpy().astype(bool), mask)


def test_mask_targets_flip_image_mask_and_box_together(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    targets = MaskTargets(rows, scenes, seed=3)
    decisions = [targets.flips(0, epoch) for epoch in range(20)]
    assert set(decisions) == {True, False}
    targets.epoch = decisions.index(True)
    image, target = targets[0]
    again, _ = targets.load(0, variant=targets.epoch)
    assert torch.equal(
        targets.load(0, variant=decisions.index(False))[0],
        MaskTargets(rows, scenes, hflip=False)[0][0],
    )
    plain, plain_target = MaskTargets(rows, scenes, hflip=False)[0]
    assert torch.equal(image, again)
    assert torch.equal(image, plain.flip(-1))
    assert torch.equal(target["masks"], plain_target["masks"].flip(-1))
    x0, y0, x1, y1 = plain_target["boxes"][0].tolist()
    assert target["boxes"][0].tolist() == [SIZE[1] - x1, y0, SIZE[1] - x0, y1]
    assert target["boxes"][0].tolist() == list(mask_to_box(target["masks"][0].numpy()))


def test_mask_targets_reject_a_size_mismatch(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    wrong = [{**rows[1], "height": SIZE[0] + 1}]
    with pytest.raises(ValueError, match=rows[1]["image_id"]):
        MaskTargets(wrong, scenes)[0]


def test_collate_keeps_lists(rows: list[dict[str, Any]], scenes: SyntheticScenes) -> None:
    dataset = MaskTargets(rows, scenes)
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2
    assert torch.equal(images[1], dataset[1][0])
    assert torch.equal(targets[0]["boxes"], dataset[0][1]["boxes"])


def test_predict_returns_candidates_at_input_size() -> None:
    torch.manual_seed(0)
    model = build_detector(**SMALL, box_score_thresh=0.0)
    images = [torch.rand(3, *SIZE), torch.rand(3, 80, 112)]
    candidates = predict(model, images)
    assert not model.training
    with torch.no_grad():
        raw = model(images)
    assert len(candidates) == 2
    for image, found, out in zip(images, candidates, raw, strict=True):
        assert isinstance(found, Candidates)
        count = len(found.scores)
        assert 0 < count <= SMALL["box_detections_per_img"]
        assert found.masks.dtype == bool and found.masks.shape == (count, *image.shape[1:])
        assert found.boxes.dtype == np.float32 and found.boxes.shape == (count, 4)
        assert found.scores.dtype == np.float32 and found.classes.dtype == np.int64
        assert np.all(np.diff(found.scores) <= 0) and np.all(
            (found.scores >= 0) & (found.scores <= 1)
        )
        assert np.all((found.classes >= 0) & (found.classes < NUM_CLASSES - 1))
        assert np.array_equal(found.classes, out["labels"].numpy() - 1)
        assert np.array_equal(found.masks, out["masks"][:, 0].numpy() > 0.5)
        assert np.all(found.boxes[:, 2] <= image.shape[2]) and np.all(
            found.boxes[:, 3] <= image.shape[1]
        )


def test_a_trained_detector_loads_without_reading_its_init_weights(
    moco_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    trained = build_detector(
        num_classes=3, init="moco", init_path=save_moco(moco_state, tmp_path / "moco.pth.tar")
    )
    structure = build_detector(
        num_classes=3, init="moco", init_path=str(tmp_path / "gone.pth.tar"), load_init=False
    )
    assert type(structure.backbone.body.bn1) is FrozenBatchNorm2d
    structure.load_state_dict(trained.state_dict())  # strict: the same layers


def test_uint8_images_give_the_losses_of_the_same_images_in_0_to_1(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    """Loader processes send uint8 (a quarter of float32's bytes); the step scales them."""
    torch.manual_seed(0)
    model = build_detector(**SMALL)
    images, targets = collate([MaskTargets(rows, scenes, hflip=False)[i] for i in (0, 1)])
    assert all(image.dtype == torch.uint8 for image in images)
    torch.manual_seed(1)  # the RPN and box heads sample proposals
    from_bytes = detector_losses(model, images, targets)
    torch.manual_seed(1)
    from_floats = detector_losses(model, [image / 255.0 for image in images], targets)
    assert from_bytes.keys() == from_floats.keys()
    for name, value in from_bytes.items():
        assert torch.allclose(value, from_floats[name]), name
