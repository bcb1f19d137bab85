"""The final segmenter (Sec 3.3 Eq 4, Sec 4.1, A.3): model, hard pixel loss, augmentations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from maskdistill.backbones import IMAGENET_MEAN, IMAGENET_STD
from maskdistill.data.base import IGNORE_INDEX
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.pseudolabels import encode_label_map
from maskdistill.segmenter import (
    SegmentationSamples,
    build_segmenter,
    frozen_modules,
    hard_pixel_loss,
    predict_segmentation,
    segmenter_losses,
)
from maskdistill.weights import MOCO_PREFIX
from tests.moco import moco_release_state, save_moco

SIZE = 64
NUM_CLASSES = 4  # 3 classes + background
PAPER_FROZEN = frozen_modules(2)  # Sec 4.1: stem (conv1, bn1) + layer1, the default


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenes:
    return SyntheticScenes(num_images=4, image_size=(SIZE, SIZE), num_classes=NUM_CLASSES - 1)


@pytest.fixture(scope="module")
def rows(scenes: SyntheticScenes) -> list[dict[str, Any]]:
    """Ground-truth semantic maps as the pseudo labels, stored as the distill stage does."""
    out = []
    for image_id in scenes.image_ids():
        semantic = scenes.load(image_id).semantic
        assert semantic is not None
        out.append({"image_id": image_id, "label_png": encode_label_map(semantic)})
    return out


def plain(
    rows: list[dict[str, Any]], scenes: SyntheticScenes, **kwargs: Any
) -> SegmentationSamples:
    """Samples with no augmentation unless `kwargs` asks for one."""
    options: dict[str, Any] = {
        "crop_size": SIZE,
        "scale_range": (1.0, 1.0),
        "rotation_degrees": 0.0,
        "hflip": False,
    }
    return SegmentationSamples(rows, scenes, **{**options, **kwargs})


def normalised(image: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    return (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]


# --- Eq 4: hard pixel mining -------------------------------------------------------------------


def test_hard_pixel_loss_is_cross_entropy_over_the_hardest_valid_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :3] = IGNORE_INDEX
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 3)
    flat_target = target.reshape(-1)
    valid = (flat_target != IGNORE_INDEX).nonzero().flatten()  # 37 pixels
    # the hardest pixels by their own loss, -log softmax of the true class, computed directly
    nll = -torch.log_softmax(flat_logits[valid], dim=1)[
        torch.arange(valid.numel()), flat_target[valid]
    ]
    k = math.floor(0.2 * valid.numel())
    chosen = valid[nll.argsort(descending=True)[:k]]
    expected = F.cross_entropy(flat_logits[chosen], flat_target[chosen])
    assert k == 7
    assert torch.allclose(hard_pixel_loss(logits, target, fraction=0.2), expected)
    assert hard_pixel_loss(logits, target) > F.cross_entropy(logits, target, ignore_index=255)


def test_ignored_pixels_are_never_chosen_however_wrong() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [IGNORE_INDEX, IGNORE_INDEX]]])
    logits[0, 1, 1, :] = 100.0  # ignored pixels: hugely confident in class 1
    logits[0, 0, 0, 0] = 2.0  # pixel (0, 0): right, loss log(1 + e^-2)
    logits[0, 0, 0, 1] = 3.0  # pixel (0, 1): wrong, loss log(1 + e^3)
    loss = hard_pixel_loss(logits, target, fraction=0.5, ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(3.0)), rel=1e-5)
    target[0, 1, :] = 0  # the same pixels counted would be far harder (loss ~100)
    assert hard_pixel_loss(logits, target, fraction=0.5).item() == pytest.approx(100.0, rel=1e-3)


def test_fraction_one_is_mean_cross_entropy_over_valid_pixels() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 6, 7)
    target = torch.randint(0, 5, (3, 6, 7))
    target[1] = IGNORE_INDEX
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert torch.allclose(hard_pixel_loss(logits, target, fraction=1.0), expected)


def test_tiny_fraction_keeps_one_pixel() -> None:
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 2] = 5.0
    target = torch.zeros(1, 1, 3, dtype=torch.int64)
    loss = hard_pixel_loss(logits, target, fraction=0.01)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(5.0)), rel=1e-5)


def test_all_ignored_gives_zero_with_a_gradient() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE_INDEX)
    loss = hard_pixel_loss(logits, target)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_unit_interval_raises(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        hard_pixel_loss(
            torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64), fraction=fraction
        )


# --- Sec 4.1: the model ------------------------------------------------------------------------


@pytest.mark.parametrize(("output_stride", "side"), [(8, 8), (16, 4)])
def test_resnet50_output_stride(output_stride: int, side: int) -> None:
    model = build_segmenter(num_classes=3, output_stride=output_stride)
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))["out"]
    assert features.shape == (1, 2048, side, side)
    assert model.aux_classifier is None
    assert model.classifier[-1].out_channels == 3


@pytest.mark.parametrize(("output_stride", "step"), [(8, 4), (16, 2)])
def test_dilated_resnet18_is_the_strided_one_computed_densely(
    output_stride: int, step: int
) -> None:
    """A trous: the dilated body at every `step`-th position equals the plain ResNet-18."""
    torch.manual_seed(2)
    model = build_segmenter(num_classes=3, backbone="resnet18", output_stride=output_stride)
    model.eval()
    reference = torchvision.models.resnet18(weights=None)
    reference.load_state_dict(model.backbone.state_dict(), strict=False)
    reference.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        dense = model.backbone(image)["out"]
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(image))))
        strided = reference.layer4(reference.layer3(reference.layer2(reference.layer1(x))))
    assert dense.shape == (1, 512, 64 // output_stride, 64 // output_stride)
    assert strided.shape == (1, 512, 2, 2)
    assert torch.allclose(dense[..., ::step, ::step], strided, atol=1e-4)


def test_stem_and_layer1_are_frozen_the_rest_trains() -> None:
    model = build_segmenter(num_classes=3, backbone="resnet18")
    body = model.backbone
    for name, param in model.named_parameters():
        assert param.requires_grad == (
            not name.startswith(tuple(f"backbone.{s}." for s in PAPER_FROZEN))
        ), name
    frozen_bns = [m for s in PAPER_FROZEN for m in getattr(body, s).modules()]
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen_bns) == 5  # bn1 + 2 blocks x 2
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.layer2.modules())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        build_segmenter(num_classes=3, output_stride=32)
    with pytest.raises(ValueError, match="backbone"):
        build_segmenter(num_classes=3, backbone="resnet34")
    with pytest.raises(ValueError, match="init_path"):
        build_segmenter(num_classes=3, init="moco")
    with pytest.raises(ValueError, match="num_classes"):
        build_segmenter(num_classes=1)


@pytest.fixture(scope="module")
def moco_state() -> dict[str, torch.Tensor]:
    return moco_release_state(3)


def test_moco_checkpoint_initialises_the_body(
    moco_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = save_moco(moco_state, tmp_path / "moco_v2.pth.tar")
    model = build_segmenter(num_classes=3, init="moco", init_path=path)
    loaded = model.backbone.state_dict()
    expected = {
        k[len(MOCO_PREFIX) :]: v
        for k, v in moco_state.items()
        if k.startswith(MOCO_PREFIX) and ".fc." not in k
    }
    frozen_counters = {
        k for k in expected if k.startswith(PAPER_FROZEN) and k.endswith("num_batches_tracked")
    }
    assert loaded.keys() == expected.keys() - frozen_counters
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key


def test_moco_checkpoint_that_does_not_fit_names_file_and_key(
    moco_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    broken = {k: v for k, v in moco_state.items() if k != f"{MOCO_PREFIX}layer3.0.conv1.weight"}
    path = save_moco(broken, tmp_path / "broken.pth.tar")
    with pytest.raises(ValueError, match="broken.pth.tar") as err:
        build_segmenter(num_classes=3, init="moco", init_path=path)
    assert "layer3.0.conv1.weight" in str(err.value)
    with pytest.raises(ValueError, match="moco_r50.pth"):  # a ResNet-50 file, ResNet-18 body
        build_segmenter(
            num_classes=3,
            init="moco",
            init_path=save_moco(moco_state, tmp_path / "moco_r50.pth"),
            backbone="resnet18",
        )


def test_sgd_steps_train_every_trainable_parameter_and_leave_frozen_ones(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    torch.manual_seed(4)
    samples = plain(rows, scenes, scale_range=(0.8, 1.2), rotation_degrees=5.0, hflip=True)
    images, targets = (torch.stack(t) for t in zip(*(samples[i] for i in range(4)), strict=True))
    model = build_segmenter(num_classes=NUM_CLASSES, backbone="resnet18")
    frozen_before = {
        k: v.clone() for k, v in model.backbone.state_dict().items() if k.startswith(PAPER_FROZEN)
    }
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = segmenter_losses(model, images, targets, fraction=0.2)["loss_seg"]
        loss.backward()
        for name, param in trainable.items():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    for key, value in model.backbone.state_dict().items():
        if key in frozen_before:
            assert torch.equal(value, frozen_before[key]), key
    assert all(not torch.equal(p, trainable_before[n]) for n, p in trainable.items())


def test_predict_segmentation_keeps_a_non_square_input_size() -> None:
    model = build_segmenter(num_classes=NUM_CLASSES, backbone="resnet18")
    prediction = predict_segmentation(model, torch.randn(3, 72, 96))
    assert prediction.shape == (72, 96) and prediction.dtype == torch.int64
    assert int(prediction.min()) >= 0 and int(prediction.max()) < NUM_CLASSES
    assert not model.training


# --- A.3: augmentations ------------------------------------------------------------------------


def test_samples_without_augmentation_are_the_inputs(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    samples = plain(rows, scenes)
    assert len(samples) == len(rows)
    for index, row in enumerate(rows):
        sample = scenes.load(row["image_id"])
        assert sample.semantic is not None
        image, target = samples[index]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert target.dtype == torch.int64
        assert torch.equal(target, torch.from_numpy(sample.semantic.astype(np.int64)))
        assert torch.allclose(image, normalised(sample.image), atol=1e-5)


def test_rotation_fills_the_corners_with_ignore(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    _, target = plain(rows, scenes, rotation_degrees=30.0).load(0)
    corners = target[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.equal(corners, torch.full((4,), IGNORE_INDEX))
    assert (target[SIZE // 4 : -SIZE // 4, SIZE // 4 : -SIZE // 4] != IGNORE_INDEX).all()


def test_flip_flips_image_and_label_together(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    flipping = plain(rows, scenes, hflip=True)
    plain_image, plain_target = plain(rows, scenes).load(1)
    flips = []
    for variant in range(8):
        image, target = flipping.load(1, variant=variant)
        flipped = torch.equal(target, plain_target.flip(-1))
        assert flipped or torch.equal(target, plain_target)
        assert torch.equal(image, plain_image.flip(-1) if flipped else plain_image)
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_crop_larger_than_the_image_pads_with_ignore_and_zero(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    image, target = plain(rows, scenes, crop_size=SIZE + 16).load(2)
    inside = target != IGNORE_INDEX
    rows_in, cols_in = inside.any(dim=1).nonzero().flatten(), inside.any(dim=0).nonzero().flatten()
    top, left = int(rows_in[0]), int(cols_in[0])
    window = (slice(top, top + SIZE), slice(left, left + SIZE))
    semantic = scenes.load(rows[2]["image_id"]).semantic
    assert semantic is not None
    assert torch.equal(target[window], torch.from_numpy(semantic.astype(np.int64)))
    assert int(inside.sum()) == SIZE * SIZE
    assert (image[:, ~inside] == 0).all()


def test_scaling_changes_the_canvas_and_random_crop_cuts_it(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    image, target = plain(rows, scenes, scale_range=(2.0, 2.0), crop_size=SIZE).load(0)
    assert image.shape == (3, SIZE, SIZE) and target.shape == (SIZE, SIZE)
    assert (target != IGNORE_INDEX).all()  # a 128-pixel canvas leaves no padding in a 64 crop
    _, small = plain(rows, scenes, scale_range=(0.5, 0.5), crop_size=SIZE).load(0)
    assert int((small != IGNORE_INDEX).sum()) == (SIZE // 2) ** 2


def test_augmentation_is_deterministic_per_seed_index_and_variant(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    def make(seed: int) -> SegmentationSamples:
        return SegmentationSamples(
            rows, scenes, crop_size=48, scale_range=(0.75, 1.25), rotation_degrees=10.0, seed=seed
        )

    first, again = make(0).load(1, variant=3), make(0).load(1, variant=3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [make(0).load(1, variant=4), make(1).load(1, variant=3)]
    assert all(not torch.equal(first[0], other[0]) for other in others)
    samples = make(0)
    samples.epoch = 3
    assert torch.equal(samples[1][1], first[1])


def test_label_map_of_another_size_names_the_image(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    bad = [
        {"image_id": rows[0]["image_id"], "label_png": encode_label_map(np.zeros((5, 7), np.uint8))}
    ]
    with pytest.raises(
        ValueError, match=f"{rows[0]['image_id']}: image is 64x64 but its label map is 5x7"
    ):
        plain(bad, scenes).load(0)


@pytest.mark.parametrize(
    ("frozen_stages", "frozen"),
    [
        (0, ()),
        (2, ("conv1", "bn1", "layer1")),  # Sec 4.1, the default
        (3, ("conv1", "bn1", "layer1", "layer2")),  # the release
        (5, ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
    ],
)
def test_frozen_stages_freeze_exactly_the_named_modules(
    frozen_stages: int, frozen: tuple[str, ...]
) -> None:
    model = build_segmenter(num_classes=3, backbone="resnet18", frozen_stages=frozen_stages)
    assert frozen_modules(frozen_stages) == frozen
    for name, param in model.named_parameters():
        module = name.split(".")[1] if name.startswith("backbone.") else None
        assert param.requires_grad == (module not in frozen), name
    body = model.backbone
    for module in ("bn1", "layer1", "layer2", "layer3", "layer4"):
        norms = [m for m in getattr(body, module).modules() if "Norm" in type(m).__name__]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == (module in frozen) for m in norms)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.classifier.modules())


def test_frozen_stages_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="frozen_stages=6: expected 0..5"):
        build_segmenter(num_classes=3, backbone="resnet18", frozen_stages=6)


def test_fixed_resize_gives_square_pairs_with_labels_resized_by_nearest() -> None:
    # a 16 x 32 label map, every 16 x 16 block's pixels distinct, resized to 48 x 48 without
    # scale, rotation or flip: output (i, j) is source (i * 16 // 48, j * 32 // 48)
    label = (np.arange(16 * 32).reshape(16, 32) % 256).astype(np.uint8)
    small = SyntheticScenes(num_images=1, image_size=(16, 32), num_classes=NUM_CLASSES - 1)
    rows = [{"image_id": small.image_ids()[0], "label_png": encode_label_map(label)}]
    samples = SegmentationSamples(
        rows,
        small,
        crop_size=48,
        scale_range=(1.0, 1.0),
        rotation_degrees=0.0,
        hflip=False,
        augment="fixed_resize",
    )
    image, target = samples.load(0)
    assert image.shape == (3, 48, 48) and target.shape == (48, 48)
    rows_, cols = np.meshgrid(np.arange(48) * 16 // 48, np.arange(48) * 32 // 48, indexing="ij")
    np.testing.assert_array_equal(target.numpy(), label[rows_, cols])


def test_fixed_resize_zoom_keeps_the_frame(
    rows: list[dict[str, Any]], scenes: SyntheticScenes
) -> None:
    semantic = scenes.load(scenes.image_ids()[0]).semantic
    assert semantic is not None
    zoom_in = plain(rows, scenes, scale_range=(2.0, 2.0), augment="fixed_resize")
    _, target = zoom_in.load(0)
    # x2 about the centre: output pixel i shows source 16 + i // 2, the middle half
    middle = semantic[16:48, 16:48].repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(target.numpy(), middle)
    _, shrunk = plain(rows, scenes, scale_range=(0.5, 0.5), augment="fixed_resize").load(0)
    assert shrunk.shape == (SIZE, SIZE)
    assert int((shrunk != IGNORE_INDEX).sum()) == (SIZE // 2) ** 2  # the image, half size
    with pytest.raises(ValueError, match="augment='crop'"):
        plain(rows, scenes, augment="crop")
