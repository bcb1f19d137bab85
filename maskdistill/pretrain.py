"""DINO self-distillation of a timm ViT on the user's own images (Caron et al. 2021).

MaskDistill mines its masks from a self-supervised ViT (Sec 3.2) and leaves open which data
that ViT should learn from (Sec 5). This module trains one on the data set itself, so a run
needs no downloaded weights and fits a new domain. It is Ray-free: `engine.train` runs it in a
plain process or in a Ray Train worker.

One iteration (what `engine.train` does with the pieces built here):

1. `multi_crop_batch`: 2 global and N local views of every image, DINO's augmentations; the
   random choices drawn on the host (`draw_views`), the views rendered on any device.
2. `DINO.forward` (through `dino_losses`): the student sees every view, the teacher the two
   global ones; the loss is the cross-entropy between the centred, sharpened teacher and the
   student over every pair of different views; the centre moves towards the teacher's batch
   mean.
3. The optimizer from `build_optimizer` steps: this iteration's weight decay, per-parameter
   gradient clipping, the last layer's gradients dropped while it is frozen, the AdamW update,
   then the teacher moves towards the student (EMA with this iteration's momentum).

`export_teacher` writes the teacher's backbone as DINO releases it (a plain timm state dict),
which `backbones.build_backbone(arch, weights=<file>)` loads strictly. `attention_picture`
draws the last block's CLS attention, where the mining step looks for the object.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.ops import roi_align

from maskdistill.backbones import (
    ViTBackbone,
    build_backbone,
    imagenet_normalize,
    save_backbone,
    to_model_input,
)
from maskdistill.config import PretrainConfig
from maskdistill.data.base import Dataset
from maskdistill.engine import BatchPlan
from maskdistill.masks import pad_to_multiple
from maskdistill.visualize import image_grid

NUM_GLOBAL = 2  # DINO's two global views; the teacher sees only these
BLUR_SIGMA = (0.1, 2.0)  # DINO's Gaussian blur radius range, for 224 px crops
REFERENCE_CROP = 224


@dataclass(frozen=True)
class MultiCrop:
    """DINO's views of an image: 2 global crops and `local_crops` small ones.

    Every view: random resized crop (aspect ratio 3/4..4/3), horizontal flip (p 0.5), colour
    jitter (p 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue `hue` (DINO: 0.1) turns,
    in a random order), grayscale (p `grayscale`, DINO: 0.2), Gaussian blur (p 1.0 on global
    view 1, 0.1 on global view 2, 0.5 on local views; DINO's sigma range 0.1..2 px at 224 px,
    scaled to the crop size), solarize (p 0.2, global view 2 only), ImageNet normalisation.
    Differences from DINO's torchvision pipeline, for speed (all views of a batch are made by a
    few batched ops): crops are resampled by `roi_align` (bilinear, averaging ceil(box / size)
    samples per output pixel), and the hue change is a rotation of the chroma plane of YIQ
    rather than a shift of HSV hue.
    """

    global_size: int
    global_scale: tuple[float, float]
    local_crops: int
    local_size: int
    local_scale: tuple[float, float]
    hue: float = 0.1
    grayscale: float = 0.2

    @classmethod
    def from_config(cls, config: PretrainConfig) -> MultiCrop:
        return cls(
            global_size=config.global_crop_size,
            global_scale=config.global_crop_scale,
            local_crops=config.local_crops,
            local_size=config.local_crop_size,
            local_scale=config.local_crop_scale,
            hue=config.hue_jitter,
            grayscale=config.grayscale_probability,
        )

    def view_specs(self) -> list[_ViewSpec]:
        """Size, crop scale, blur and solarize probabilities of each view, global ones first."""
        colour = {"hue": self.hue, "grayscale": self.grayscale}
        first = _ViewSpec(self.global_size, self.global_scale, blur=1.0, solarize=0.0, **colour)
        second = _ViewSpec(self.global_size, self.global_scale, blur=0.1, solarize=0.2, **colour)
        local = _ViewSpec(self.local_size, self.local_scale, blur=0.5, solarize=0.0, **colour)
        return [first, second] + [local] * self.local_crops


@dataclass(frozen=True)
class _ViewSpec:
    size: int
    scale: tuple[float, float]
    blur: float
    solarize: float
    hue: float
    grayscale: float


@dataclass(frozen=True)
class _ViewDraw:
    """One image's random choices for one view."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    flip: bool
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation factors; hue
    order: tuple[int, ...]  # the jitter changes' order
    gray: bool
    sigma: float  # 0: no blur
    solarize: bool


@dataclass(frozen=True)
class ViewDraws:
    """A batch's views as drawn on the host, not yet rendered: what a loader thread makes."""

    pixels: np.ndarray  # uint8 [B, H, W, 3], each image at the top left, zero padded
    draws: tuple[tuple[_ViewDraw, ...], ...]  # per view, per image
    sizes: tuple[int, ...]  # per view

    def render(self, device: torch.device | str = "cpu") -> list[Tensor]:
        """The views [B, 3, S, S] on `device` (a GPU renders in milliseconds what takes a CPU
        core about a second per 256 images)."""
        pixels = torch.from_numpy(self.pixels).to(device).permute(0, 3, 1, 2).float().div(255)
        views = zip(self.draws, self.sizes, strict=True)
        return [_render(pixels, draws, size) for draws, size in views]


def draw_views(
    images: Sequence[np.ndarray],
    crops: MultiCrop,
    *,
    indices: Sequence[int],
    iteration: int,
    seed: int,
) -> ViewDraws:
    """Every random choice of a batch's views, view by view ([global 0, global 1, local 0, ...]).

    The choices for image `indices[i]` come from (seed, iteration, index) alone, so a resumed
    run sees the same views and loader threads need no shared state.
    """
    if len(images) != len(indices) or not images:
        raise ValueError(f"{len(images)} images for {len(indices)} indices; need as many, >= 1")
    rngs = [np.random.default_rng((seed, iteration, index)) for index in indices]
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    pixels = np.zeros((len(images), height, width, 3), dtype=np.uint8)
    for row, image in enumerate(images):
        pixels[row, : image.shape[0], : image.shape[1]] = image
    specs = crops.view_specs()
    draws = tuple(
        tuple(_draw(rng, image.shape[:2], spec) for rng, image in zip(rngs, images, strict=True))
        for spec in specs
    )
    return ViewDraws(pixels, draws, tuple(spec.size for spec in specs))


@dataclass(frozen=True)
class PretrainBatches:
    """iteration -> (iteration, this rank's views): drawn in a loader process; rendered there too
    when `render` (training on a CPU), else on the GPU by the step (`ViewDraws.render`)."""

    dataset: Dataset
    ids: Sequence[str]
    crops: MultiCrop
    plan: BatchPlan
    render: bool

    def __call__(self, iteration: int) -> tuple[int, ViewDraws | list[Tensor]]:
        indices = self.plan.indices(iteration)
        images = [self.dataset.load(self.ids[i]).image for i in indices]
        draws = draw_views(
            images, self.crops, indices=indices, iteration=iteration, seed=self.plan.seed
        )
        return iteration, draws.render() if self.render else draws

    def image_ids(self, iteration: int) -> list[str]:
        return [self.ids[i] for i in self.plan.indices(iteration)]


def multi_crop_batch(
    images: Sequence[np.ndarray],
    crops: MultiCrop,
    *,
    indices: Sequence[int],
    iteration: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """The views of a batch ([global 0, global 1, local 0, ...], each [B, 3, S, S]) on `device`:
    `draw_views`, then `ViewDraws.render`."""
    draws = draw_views(images, crops, indices=indices, iteration=iteration, seed=seed)
    return draws.render(device)


def _draw(rng: np.random.Generator, shape: tuple[int, ...], spec: _ViewSpec) -> _ViewDraw:
    top, left, height, width = _crop_box(rng, shape, spec.scale)
    flip = bool(rng.random() < 0.5)
    jitter = bool(rng.random() < 0.8)
    factors = (rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2))
    hue = rng.uniform(-spec.hue, spec.hue)
    order = tuple(int(i) for i in rng.permutation(4))
    gray = bool(rng.random() < spec.grayscale)
    blur = bool(rng.random() < spec.blur)
    sigma = rng.uniform(*BLUR_SIGMA) * spec.size / REFERENCE_CROP
    solarize = bool(rng.random() < spec.solarize)
    return _ViewDraw(
        box=(left, top, left + width, top + height),
        flip=flip,
        jitter=(*factors, hue) if jitter else (1.0, 1.0, 1.0, 0.0),
        order=order,
        gray=gray,
        sigma=sigma if blur else 0.0,
        solarize=solarize,
    )


def _crop_box(
    rng: np.random.Generator, shape: Sequence[int], scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width), aspect ratio 3/4..4/3."""
    height, width = int(shape[0]), int(shape[1])
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)  # the fallback: a centred square crop
    return (height - side) // 2, (width - side) // 2, side, side


def _render(pixels: Tensor, draws: Sequence[_ViewDraw], size: int) -> Tensor:
    """Normalised views [B, 3, size, size] of images [B, 3, H, W] in [0, 1], as drawn."""
    device = pixels.device
    boxes = torch.tensor(
        [[row, *draw.box] for row, draw in enumerate(draws)], dtype=torch.float32, device=device
    )
    views = roi_align(pixels, boxes, output_size=size, aligned=True)
    flip = torch.tensor([d.flip for d in draws], device=device)
    views = torch.where(flip.view(-1, 1, 1, 1), views.flip(-1), views)
    jitter = torch.tensor([d.jitter for d in draws], device=device)
    views = _colour_jitter(views, jitter, [d.order for d in draws])
    gray = torch.tensor([d.gray for d in draws], device=device).view(-1, 1, 1, 1)
    views = torch.where(gray, _grayscale(views).expand_as(views), views)
    views = _gaussian_blur(views, [d.sigma for d in draws])
    solarize = torch.tensor([d.solarize for d in draws], device=device).view(-1, 1, 1, 1)
    return imagenet_normalize(torch.where(solarize & (views >= 0.5), 1 - views, views))


def _grayscale(views: Tensor) -> Tensor:
    """ITU-R 601 luma [B, 1, H, W], as torchvision computes it."""
    weights = torch.tensor([0.2989, 0.587, 0.114], device=views.device).view(1, 3, 1, 1)
    return (views * weights).sum(1, keepdim=True)


def _colour_jitter(views: Tensor, jitter: Tensor, orders: Sequence[tuple[int, ...]]) -> Tensor:
    """Brightness, contrast and saturation factors and hue turns [B, 4], each image's changes
    in its own order (slot by slot, each change applied to the images that have it there)."""
    order = torch.tensor(orders)
    for slot in range(order.shape[1]):
        for change in range(4):
            rows = (order[:, slot] == change).nonzero().flatten().to(views.device)
            if len(rows):
                views[rows] = _JITTER[change](views[rows], jitter[rows, change].view(-1, 1, 1, 1))
    return views


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor).clamp(0, 1)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = _grayscale(x).mean((-2, -1), keepdim=True)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return (factor * x + (1 - factor) * _grayscale(x)).clamp(0, 1)


def _hue(x: Tensor, turn: Tensor) -> Tensor:
    """Rotate the chroma (I, Q) of YIQ by `turn` full turns; luma stays."""
    yiq = torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ.to(x.device), x)
    angle = 2 * math.pi * turn.view(-1)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    rotated = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("ij,bjhw->bihw", _YIQ_TO_RGB.to(x.device), rotated).clamp(0, 1)


_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]]
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_JITTER: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    _brightness,
    _contrast,
    _saturation,
    _hue,
)


def _gaussian_blur(views: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Separable Gaussian blur with each image's own sigma (0: unchanged), reflect padding."""
    if max(sigmas) <= 0:
        return views
    batch, channels, height, width = views.shape
    radius = min(math.ceil(3 * max(sigmas)), min(height, width) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=views.device)
    sigma = torch.tensor(sigmas, dtype=torch.float32, device=views.device).view(-1, 1)
    kernel = torch.where(
        sigma > 0, torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-6)) ** 2), (offsets == 0).float()
    )
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    flat = views.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation, w = g * v / |v| row by row."""

    def __init__(self, in_dim: int, out_dim: int, *, train_norm: bool) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.direction, std=0.02)
        self.norm = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.norm * F.normalize(self.direction, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer GELU MLP to a bottleneck (BatchNorm after the hidden
    layers when `batch_norm`, DINO's use_bn_in_head), L2 normalisation, then the weight-normed
    last layer onto `out_dim` prototypes."""

    def __init__(
        self,
        in_dim: int,
        *,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        norm_last_layer: bool,
        batch_norm: bool,
    ) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_norm=not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropNet(nn.Module):
    """Backbone CLS feature of each view, then the head; views of one size share a forward."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        """[sum of view batches, out_dim] for views [B, 3, S, S], in the order given."""
        features = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            tokens = self.backbone.forward_features(torch.cat(list(views[start:end])))
            features.append(tokens[:, 0])  # the CLS token after the final norm
            start = end
        return self.head(torch.cat(features))


def dino_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """DINO's loss: mean over pairs (teacher global view a, student view b != a) of
    H(softmax((t_a - c) / teacher_temp), softmax(s_b / student_temp)).

    student_out [V * B, K] view by view; teacher_out [2 * B, K], the two global views.
    """
    batch = teacher_out.shape[0] // NUM_GLOBAL
    if teacher_out.shape[0] != NUM_GLOBAL * batch or student_out.shape[0] % batch:
        raise ValueError(
            f"teacher_out {tuple(teacher_out.shape)} must hold {NUM_GLOBAL} global views of one "
            f"batch and student_out {tuple(student_out.shape)} whole views of it"
        )
    student = (student_out / student_temp).log_softmax(-1).split(batch)
    teacher = ((teacher_out - center) / teacher_temp).softmax(-1).split(batch)  # centre, sharpen
    pairs = [
        -(t * s).sum(-1).mean()
        for a, t in enumerate(teacher)
        for b, s in enumerate(student)
        if b != a
    ]
    return torch.stack(pairs).mean()


class DINO(nn.Module):
    """Student and teacher (same architecture; the teacher gets no gradients) and the centre."""

    center: Tensor

    def __init__(
        self,
        student: MultiCropNet,
        *,
        student_temp: float,
        center_momentum: float,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        out_dim = student.head.last_layer.direction.shape[0]
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp = student_temp
        self.center_momentum = center_momentum

    def forward(self, views: Sequence[Tensor], teacher_temp: float) -> Tensor:
        """The DINO loss of one batch of views; moves the centre (after the loss uses it)."""
        student_out = self.student(views).float()
        with torch.no_grad():
            teacher_out = self.teacher(views[:NUM_GLOBAL]).float()
        loss = dino_loss(
            student_out,
            teacher_out,
            self.center,
            student_temp=self.student_temp,
            teacher_temp=teacher_temp,
        )
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """c <- m c + (1 - m) mean(teacher outputs of the whole batch, over every rank)."""
        total = teacher_out.sum(0, keepdim=True)
        count = teacher_out.shape[0]
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            count *= torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """Teacher <- momentum * teacher + (1 - momentum) * student, as one fused update."""
        teacher: list[Tensor] = list(self.teacher.parameters())
        student: list[Tensor] = list(self.student.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)


def build_dino(*, arch: str, config: PretrainConfig, seed: int = 0) -> DINO:
    """A student on `arch`, timm's initialisation under `seed` (built as `build_backbone` builds
    it, so the teacher's backbone loads strictly there), with a DINO head; the teacher starts as
    its copy."""
    backbone = build_backbone(arch, seed=seed).model.requires_grad_(True).train()
    head = DINOHead(
        backbone.embed_dim,
        out_dim=config.out_dim,
        hidden_dim=config.hidden_dim,
        bottleneck_dim=config.bottleneck_dim,
        norm_last_layer=config.norm_last_layer,
        batch_norm=config.head_batch_norm,
    )
    return DINO(
        MultiCropNet(backbone, head),
        student_temp=config.student_temp,
        center_momentum=config.center_momentum,
    )


def cosine_schedule(
    base: float, final: float, iterations: int, *, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """One value per iteration: linear warm-up from `warmup_start` to `base` (both included),
    then a half cosine from `base` down (or up) towards `final` (DINO's cosine_scheduler)."""
    if not 0 <= warmup_iters <= iterations:
        raise ValueError(f"warmup_iters={warmup_iters} must be in 0..iterations={iterations}")
    warmup = np.linspace(warmup_start, base, warmup_iters)
    steps = np.arange(iterations - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warmup, cosine])


@dataclass(frozen=True)
class DINOSchedules:
    """Per-iteration values: lr, weight decay, teacher momentum and teacher temperature."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_iters: int

    @property
    def iterations(self) -> int:
        return len(self.lr)

    def at(self, name: str, iteration: int) -> float:
        """The named schedule's value at `iteration` (the last value after the end)."""
        values: np.ndarray = getattr(self, name)
        return float(values[min(iteration, len(values) - 1)])


def dino_schedules(config: PretrainConfig, *, iters_per_epoch: int) -> DINOSchedules:
    """DINO's schedules for `config.epochs` epochs of `iters_per_epoch` iterations; the peak lr
    follows the linear scaling rule, lr * batch_size / 256."""
    total = config.epochs * iters_per_epoch
    warmup_temp = config.warmup_teacher_temp_epochs * iters_per_epoch
    return DINOSchedules(
        lr=cosine_schedule(
            config.lr * config.batch_size / 256,
            config.min_lr,
            total,
            warmup_iters=config.warmup_epochs * iters_per_epoch,
        ),
        weight_decay=cosine_schedule(config.weight_decay, config.weight_decay_end, total),
        momentum=cosine_schedule(config.momentum_teacher, 1.0, total),
        teacher_temp=np.concatenate(
            [
                np.linspace(config.warmup_teacher_temp, config.teacher_temp, warmup_temp),
                np.full(total - warmup_temp, config.teacher_temp),
            ]
        ),
        freeze_last_layer_iters=config.freeze_last_layer_epochs * iters_per_epoch,
    )


def build_optimizer(
    dino: DINO, schedules: DINOSchedules, *, clip_grad: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the student (no weight decay on biases and norms) and its lr scheduler.

    The optimizer's step is the rest of a DINO iteration around the AdamW update. Before it:
    this iteration's weight decay, each gradient's norm capped at `clip_grad` (0: no cap), the
    last layer's gradients dropped during the first `freeze_last_layer_iters` (which keeps the
    prototypes from collapsing early). After it: the EMA teacher update. "This iteration" is
    the scheduler's `last_epoch`: engine.train steps the scheduler after the optimizer.
    """
    decayed: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, parameter in dino.student.named_parameters():
        if parameter.requires_grad:
            (plain if name.endswith(".bias") or parameter.ndim == 1 else decayed).append(parameter)
    peak = float(schedules.lr.max())
    groups: list[dict[str, Any]] = [{"params": decayed}, {"params": plain, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: schedules.at("lr", it) / peak
    )
    last_layer = list(dino.student.head.last_layer.parameters())

    def before_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
        iteration = scheduler.last_epoch
        optimizer.param_groups[0]["weight_decay"] = schedules.at("weight_decay", iteration)
        if clip_grad > 0:
            clip_gradients(dino.student.parameters(), clip_grad)
        if iteration < schedules.freeze_last_layer_iters:
            for parameter in last_layer:
                parameter.grad = None

    def after_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
        dino.update_teacher(schedules.at("momentum", scheduler.last_epoch))

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    return optimizer, scheduler


def clip_gradients(parameters: Any, max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient scaled down to norm `max_norm` on its own
    (by max_norm / (norm + 1e-6) when its norm passes max_norm), without a host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = torch.where(norms > max_norm, max_norm / (norms + 1e-6), torch.ones_like(norms))
    torch._foreach_mul_(grads, list(scales.to(grads[0].dtype).unbind()))


def dino_losses(
    schedules: DINOSchedules, device: torch.device
) -> Callable[[nn.Module, Any], Mapping[str, Tensor]]:
    """`engine.TrainSpec.losses` for batches (iteration, views): views rendered by
    `multi_crop_batch`, or `ViewDraws` to render on `device`."""

    def losses(model: nn.Module, batch: Any) -> Mapping[str, Tensor]:
        iteration, views = batch
        if isinstance(views, ViewDraws):
            views = views.render(device)
        views = [view.to(device, non_blocking=True) for view in views]
        return {"loss_dino": model(views, schedules.at("teacher_temp", iteration))}

    return losses


def teacher_backbone(dino: DINO) -> ViTBackbone:
    """The teacher's ViT, frozen, in eval mode: what DINO releases and mining uses."""
    backbone = ViTBackbone(copy.deepcopy(dino.teacher.backbone))
    backbone.requires_grad_(False)
    return backbone.eval()


def export_teacher(dino: DINO, uri: str) -> None:
    """Write the teacher backbone as a plain timm state dict (DINO's release format)."""
    save_backbone(teacher_backbone(dino), uri)


@torch.no_grad()
def cls_attention(backbone: ViTBackbone, images: Tensor) -> Tensor:
    """The last block's CLS attention over the patches, per head: [B, heads, gh, gw]."""
    out = backbone(images)
    logits = out.q[:, :, :1].float() @ out.k[:, :, 1:].float().transpose(-1, -2)
    attention = (logits * out.q.shape[-1] ** -0.5).softmax(-1)  # [B, heads, 1, N]
    return attention.view(*attention.shape[:2], *out.grid)


def attention_picture(backbone: ViTBackbone, images: Sequence[np.ndarray]) -> np.ndarray:
    """One row per uint8 [H, W, 3] image: the image, the CLS attention of each head of the
    last block, then their mean; each map stretched from its minimum (black) through red and
    yellow to its maximum (white). A map of one flat colour: attention that picks nothing."""
    device = next(backbone.parameters()).device
    rows = []
    for image in images:
        pixels = to_model_input(torch.from_numpy(np.ascontiguousarray(image))[None])
        padded = pad_to_multiple(pixels, backbone.patch_size).to(device)
        maps = cls_attention(backbone, padded)[0]
        maps = torch.cat([maps, maps.mean(0, keepdim=True)])
        size = backbone.patch_size
        full = maps.repeat_interleave(size, 1).repeat_interleave(size, 2)
        full = full[:, : image.shape[0], : image.shape[1]].cpu()
        rows.append([image, *(_heat(_stretch(m)) for m in full)])
    return image_grid(rows)


def _stretch(values: Tensor) -> Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low).clamp_min(1e-12)


def _heat(values: Tensor) -> np.ndarray:
    """uint8 [H, W, 3] 'hot' colours of values in [0, 1]."""
    v = values.clamp(0, 1)
    rgb = torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], -1)
    return (rgb * 255).round().to(torch.uint8).numpy()
