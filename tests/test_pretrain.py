"""DINO pretraining: schedules, loss, centre, EMA teacher, frozen last layer, views, export."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdistill.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from maskdistill.config import ConfigError, PretrainConfig, load_config
from maskdistill.data.synthetic import SyntheticScenes
from maskdistill.engine import Checkpointer, MetricsLog, TrainSpec, batch_indices, train
from maskdistill.outputs import backbone_weights
from maskdistill.pretrain import (
    DINO,
    MultiCrop,
    _gaussian_blur,
    _hue,
    attention_picture,
    build_dino,
    build_optimizer,
    clip_gradients,
    cls_attention,
    cosine_schedule,
    dino_loss,
    dino_losses,
    dino_schedules,
    draw_views,
    export_teacher,
    multi_crop_batch,
    teacher_backbone,
)
from maskdistill.stages import PRETRAINED

ARCH = "test_vit"  # timm's tiny ViT: patch 16, 64 wide, 2 heads, 6 blocks
TINY = PretrainConfig(
    epochs=2,
    batch_size=4,
    lr=0.5,
    warmup_epochs=1,
    out_dim=32,
    hidden_dim=16,
    bottleneck_dim=8,
    global_crop_size=32,
    local_crops=2,
    local_crop_size=16,
    freeze_last_layer_epochs=1,
    momentum_teacher=0.9,
)


def _views(batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [32, 32, 16, 16]
    return [torch.randn(batch, 3, s, s, generator=generator) for s in sizes]


def _dino(config: PretrainConfig = TINY) -> DINO:
    torch.manual_seed(0)
    return build_dino(arch=ARCH, config=config)


def _scenes(count: int = 6) -> list[np.ndarray]:
    scenes = SyntheticScenes(num_images=count, image_size=(48, 64), seed=3)
    return [scenes.load(i).image for i in scenes.image_ids()]


def test_cosine_schedule_golden_values() -> None:
    # warm-up 0 -> 1 over 2 iterations, then cos from 1 towards 0 over the other 2
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 4, warmup_iters=2), [0, 1, 1, 0.5])
    np.testing.assert_allclose(cosine_schedule(0.04, 0.4, 3), [0.04, 0.13, 0.31], rtol=1e-6)
    with pytest.raises(ValueError, match="warmup_iters=5"):
        cosine_schedule(1.0, 0.0, 4, warmup_iters=5)


def test_dino_schedules_scale_lr_and_warm_the_teacher_temperature() -> None:
    config = TINY.model_copy(
        update={"teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 1}
    )
    schedules = dino_schedules(config, iters_per_epoch=3)
    assert schedules.iterations == 6
    peak = 0.5 * 4 / 256  # lr * batch_size / 256
    expected_lr = [0, peak / 2, peak, peak, peak * 0.75 + 1e-6 * 0.25, peak * 0.25 + 1e-6 * 0.75]
    np.testing.assert_allclose(schedules.lr, expected_lr, rtol=1e-6)
    np.testing.assert_allclose(schedules.teacher_temp, [0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    assert schedules.momentum[0] == pytest.approx(0.9)
    assert schedules.momentum[-1] == pytest.approx(1 - 0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert schedules.freeze_last_layer_iters == 3
    assert schedules.at("lr", 100) == schedules.lr[-1], "past the end: the last value"


def test_dino_loss_golden_values() -> None:
    # One image, K = 2, views: 2 global + 1 local.
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # softmax: (3/4, 1/4), (1/2, 1/2)
    student = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    loss = dino_loss(student, teacher, torch.zeros(1, 2), student_temp=1.0, teacher_temp=1.0)

    def cross_entropy(p: tuple[float, float], q: tuple[float, float]) -> float:
        return -(p[0] * math.log(q[0]) + p[1] * math.log(q[1]))

    p = [(0.75, 0.25), (0.5, 0.5)]
    q = [(0.5, 0.5), (0.25, 0.75), (0.75, 0.25)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # a teacher view never meets the same student view
    expected = sum(cross_entropy(p[a], q[b]) for a, b in pairs) / 4
    assert float(loss) == pytest.approx(expected)
    # the centre is subtracted before the teacher softmax: centring view 0's logits evens it out
    centred = dino_loss(
        student, teacher, torch.tensor([[math.log(3.0), 0.0]]), student_temp=1.0, teacher_temp=1.0
    )
    assert float(centred) != pytest.approx(expected)
    with pytest.raises(ValueError, match="global views"):
        dino_loss(student, teacher[:1], torch.zeros(1, 2), student_temp=1.0, teacher_temp=1.0)


def test_sharpening_a_uniform_student_costs_log_k() -> None:
    student = torch.zeros(8, 5)
    teacher = torch.randn(4, 5)
    loss = dino_loss(student, teacher, torch.zeros(1, 5), student_temp=0.1, teacher_temp=0.04)
    assert float(loss) == pytest.approx(math.log(5))


def test_forward_moves_the_centre_towards_the_teacher_batch_mean() -> None:
    dino = _dino()
    dino.center.fill_(0.5)
    views = _views()
    with torch.no_grad():
        teacher_out = dino.teacher(views[:2])
    dino(views, 0.04)
    expected = 0.9 * 0.5 + 0.1 * teacher_out.mean(0, keepdim=True)
    torch.testing.assert_close(dino.center, expected)


def test_teacher_is_an_ema_of_the_student_and_gets_no_gradients() -> None:
    config = TINY.model_copy(update={"freeze_last_layer_epochs": 0, "warmup_epochs": 0})
    dino = _dino(config)
    schedules = dino_schedules(config, iters_per_epoch=3)
    optimizer, _ = build_optimizer(dino, schedules, clip_grad=0.0)
    before = [p.detach().clone() for p in dino.teacher.parameters()]
    loss = dino(_views(), 0.04)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in dino.teacher.parameters())
    optimizer.step()
    momentum = 0.9  # momentum_teacher, iteration 0
    moved = 0
    for teacher, old, student in zip(
        dino.teacher.parameters(), before, dino.student.parameters(), strict=True
    ):
        torch.testing.assert_close(teacher, momentum * old + (1 - momentum) * student)
        moved += int(not torch.equal(teacher, old))
    assert moved > 0, "the student did change, so the teacher moved"


def test_last_layer_is_frozen_for_the_first_epochs_and_decay_follows_its_schedule() -> None:
    dino = _dino()
    schedules = dino_schedules(TINY, iters_per_epoch=2)  # frozen for iterations 0 and 1
    optimizer, scheduler = build_optimizer(dino, schedules, clip_grad=3.0)
    last_layer = dino.student.head.last_layer.direction
    changes = []
    for iteration in range(4):
        before = last_layer.detach().clone()
        loss = dino(_views(seed=iteration), 0.04)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert optimizer.param_groups[0]["weight_decay"] == schedules.weight_decay[iteration]
        assert optimizer.param_groups[1]["weight_decay"] == 0.0  # biases and norms
        scheduler.step()
        changes.append(not torch.equal(last_layer, before))
    assert changes == [False, False, True, True]
    assert not dino.student.head.last_layer.norm.requires_grad, "g fixed to 1 (norm_last_layer)"


def test_clip_gradients_caps_each_parameter_on_its_own() -> None:
    small, large = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 1))
    unused = torch.nn.Parameter(torch.zeros(3))
    small.grad, large.grad = torch.tensor([0.3, 0.4]), torch.tensor([[30.0], [40.0]])
    clip_gradients([small, unused, large], 1.0)
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(large.grad, torch.tensor([[0.6], [0.8]]), atol=1e-5, rtol=0)
    assert unused.grad is None


def test_multi_crop_views_are_shaped_normalised_and_reproducible() -> None:
    images = _scenes(3)
    crops = MultiCrop.from_config(TINY)
    views = multi_crop_batch(images, crops, indices=[5, 6, 7], iteration=2, seed=0)
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert all(torch.isfinite(v).all() and v.abs().max() < 3 for v in views)  # (x - mean) / std
    again = multi_crop_batch(images, crops, indices=[5, 6, 7], iteration=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    alone = multi_crop_batch(images[1:2], crops, indices=[6], iteration=2, seed=0)
    assert all(torch.allclose(a[1], b[0], atol=1e-5) for a, b in zip(views, alone, strict=True))
    later = multi_crop_batch(images, crops, indices=[5, 6, 7], iteration=3, seed=0)
    assert not torch.equal(views[0], later[0])


def test_drawn_views_pad_mixed_sizes_and_render_where_the_loss_runs() -> None:
    images = _scenes(2)
    small = images[1][:40, :50]
    crops = MultiCrop.from_config(TINY)
    draws = draw_views([images[0], small], crops, indices=[0, 1], iteration=1, seed=0)
    assert draws.pixels.shape == (2, 48, 64, 3) and draws.sizes == (32, 32, 16, 16)
    assert np.array_equal(draws.pixels[1, :40, :50], small) and not draws.pixels[1, 40:].any()
    assert all(d.box[2] <= 50 and d.box[3] <= 40 for view in draws.draws for d in view[1:])
    # the stage hands a GPU step the draws; the loss renders them and scores as rendered views
    schedules = dino_schedules(TINY, iters_per_epoch=2)
    losses = dino_losses(schedules, torch.device("cpu"))
    dino = _dino()
    from_draws = losses(copy.deepcopy(dino), (1, draws))["loss_dino"]
    from_views = losses(copy.deepcopy(dino), (1, draws.render()))["loss_dino"]
    torch.testing.assert_close(from_draws, from_views)


def test_grayscale_probability_one_gives_gray_views() -> None:
    crops = MultiCrop.from_config(TINY.model_copy(update={"grayscale_probability": 1.0}))
    views = multi_crop_batch(_scenes(2), crops, indices=[0, 1], iteration=0, seed=0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for view in views:
        pixels = view * std + mean
        torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-5, rtol=0)


def test_hue_turn_keeps_luma_and_blur_keeps_flat_images() -> None:
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    same = _hue(pixels, torch.zeros(3))
    torch.testing.assert_close(same, pixels, atol=1e-5, rtol=0)
    turned = _hue(pixels, torch.tensor([0.1, 0.25, 0.5]))
    assert not torch.allclose(turned, pixels, atol=1e-3)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((turned * luma).sum(1), (pixels * luma).sum(1), atol=1e-4, rtol=0)
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(_gaussian_blur(flat, [1.5, 0.0]), flat)
    blurred = _gaussian_blur(pixels[:2], [0.0, 1.0])
    assert torch.equal(blurred[0], pixels[0]) and blurred[1].std() < pixels[1].std()


def test_a_few_pretraining_steps_under_engine_train(tmp_path: Path) -> None:
    dino = _dino()
    images = _scenes(8)
    schedules = dino_schedules(TINY, iters_per_epoch=2)
    optimizer, scheduler = build_optimizer(dino, schedules, clip_grad=3.0)
    crops = MultiCrop.from_config(TINY)

    def batch_at(iteration: int) -> tuple[int, list[torch.Tensor]]:
        indices = batch_indices(
            iteration, rank=0, world_size=1, batch_size=4, num_samples=len(images), seed=0
        )
        views = multi_crop_batch(
            [images[i] for i in indices], crops, indices=indices, iteration=iteration, seed=0
        )
        return iteration, views

    log = MetricsLog(str(tmp_path / "log.jsonl"))
    spec = TrainSpec(
        max_iters=schedules.iterations,
        checkpoint_every=2,
        checkpoints=Checkpointer(str(tmp_path / "checkpoints")),
        log=log,
        batch_at=batch_at,
        losses=dino_losses(schedules, torch.device("cpu")),
    )
    last = train(dino, optimizer, scheduler, spec)
    assert math.isfinite(last["loss_dino"])
    records = log.read()
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert [r["lr"] for r in records] == pytest.approx(list(schedules.lr))
    assert all(math.isfinite(r["loss"]) for r in records)
    state = Checkpointer.load(str(spec.checkpoints.latest()))
    assert state["iteration"] == 4 and "center" in state["model"]


def test_exported_teacher_loads_strictly_with_the_teachers_q_and_k(tmp_path: Path) -> None:
    dino = _dino()
    with torch.no_grad():  # a teacher unlike the freshly built student
        for parameter in dino.teacher.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    path = str(tmp_path / "backbone.pth")
    export_teacher(dino, path)
    loaded = build_backbone(ARCH, weights=path)
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = teacher_backbone(dino)(images)
        got = loaded(images)
        student = build_backbone(ARCH)
        student.model.load_state_dict(dino.student.backbone.state_dict())
        other = student(images)
    torch.testing.assert_close(got.q, expected.q, rtol=0, atol=0)
    torch.testing.assert_close(got.k, expected.k, rtol=0, atol=0)
    assert not torch.equal(got.q, other.q), "the teacher, not the student, is exported"


def test_attention_picture_has_a_map_per_head_and_their_mean() -> None:
    backbone = teacher_backbone(_dino())
    images = _scenes(2)
    attention = cls_attention(backbone, torch.randn(2, 3, 48, 64))
    assert attention.shape == (2, 2, 3, 4)  # heads, grid
    torch.testing.assert_close(attention.sum((-2, -1)), torch.ones(2, 2))
    picture = attention_picture(backbone, images)
    assert picture.dtype == np.uint8 and picture.ndim == 3
    # image_grid: 2 rows of 160 px tiles, 4 px gaps; each row: the image and 2 + 1 maps
    assert picture.shape[0] == 2 * 164 + 4
    assert picture.shape[1] == 4 * round(64 * 160 / 48) + 5 * 4


def test_pretrain_weights_resolve_to_the_runs_own_backbone(tmp_path: Path) -> None:
    config = load_config(None, [f"run_dir={tmp_path}", f"backbone.weights={PRETRAINED}"])
    assert backbone_weights(config) == f"{tmp_path}/pretrain/backbone.pth"
    other = config.model_copy(
        update={"backbone": config.backbone.model_copy(update={"weights": "hub"})}
    )
    assert backbone_weights(other) == "hub"
    with pytest.raises(ValueError, match="backbone_weights"):
        build_backbone(ARCH, weights=PRETRAINED)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.warmup_epochs=20", "warmup_epochs=20 must be <= epochs=10"),
        ("pretrain.local_crop_scale=[0.5, 0.1]", "local_crop_scale"),
        ("pretrain.batch_size=6", "multiple of resources.num_workers=4"),
    ],
)
def test_bad_pretrain_settings_are_named(override: str, message: str) -> None:
    base = ["pretrain.epochs=10", "pretrain.resources.num_workers=4", "pretrain.batch_size=8"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [*base, override])
