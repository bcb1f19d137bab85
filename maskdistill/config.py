"""One typed, validated config tree for a whole experiment, loaded from YAML with overrides.

Defaults follow the paper (Sec 4.1, A.1-A.3); `configs/*.yaml` change only what differs.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Precision = Literal["fp32", "bf16"]
BackboneInit = Literal["moco", "imagenet", "none"]


RESOURCES = "resources"  # the part of a section that says how a stage runs, never what it makes


class ConfigError(ValueError):
    """A config that cannot run; the message names every bad key and what it allows."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class TrainingResources(Section):
    """How a training stage runs: none of it changes the result, so none of it is hashed.

    The global batch and the schedule stay the section's own: a run resumed on another number
    of workers continues the same run (each iteration's global batch is the same images).
    """

    num_workers: Positive = Field(1, description="Ray Train workers (one per GPU)")
    cpus_per_worker: Annotated[float, Field(gt=0.0)] = Field(
        1.0, description="CPUs per worker; torch runs ceil(cpus_per_worker) threads"
    )
    use_gpu: bool = True
    max_failures: NonNegative = Field(
        2, description="worker-group restarts (from the latest checkpoint) before giving up"
    )
    loader_workers: NonNegative = Field(
        4,
        description="processes preparing the next batches, within cpus_per_worker (one makes "
        "about 55 segmenter crops/s at 512 px); 0 prepares each batch in the training process",
    )
    prefetch: Positive = Field(2, description="batches each loader process prepares ahead")
    log_every: Positive = Field(
        20,
        description="iterations between reports to Ray Train and TensorBoard; keep it >= ~2 s "
        "of training (Ray Train V2 takes one report per rank every 2 s; faster ones wait)",
    )


class ActorResources(Section):
    """How a Ray Data map stage runs (an actor pool over shards); never hashed."""

    batch_size: Positive = Field(8, description="images per model forward on one actor")
    num_gpus: Annotated[float, Field(ge=0.0)] = Field(
        1.0, description="GPUs per actor; 0 runs on CPU"
    )
    num_cpus: Annotated[float, Field(gt=0.0)] = Field(
        1.0,
        description="CPUs reserved per actor; torch runs ceil(num_cpus) threads in it. "
        "Leave at least 0.5 CPU of the cluster free for the decode tasks.",
    )
    concurrency: Positive = Field(1, description="actors (one per GPU on a cluster)")


class TaskResources(Section):
    """How a one-task stage runs (the evaluation); never hashed."""

    batch_size: Positive = Field(8, description="images per model forward")
    num_gpus: Annotated[float, Field(ge=0.0)] = Field(
        1.0, description="GPUs of the task; 0 runs on CPU"
    )
    num_cpus: Annotated[float, Field(gt=0.0)] = Field(1.0, description="CPUs reserved for it")
    loader_workers: NonNegative = Field(
        2, description="processes decoding the next images (within num_cpus); 0 decodes in the task"
    )


class SyntheticConfig(Section):
    """Synthetic scenes: objects whose class is a shape and a pattern, colour jittered."""

    num_classes: Annotated[int, Field(ge=1, le=10)] = 6
    train_images: Positive = 512
    val_images: Positive = 128
    image_size: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] = (224, 224)
    min_objects: Annotated[int, Field(ge=1, le=10)] = 1
    max_objects: Annotated[int, Field(ge=1, le=10)] = 4
    scale_range: tuple[Fraction, Fraction] = (0.2, 0.5)
    min_visible: Fraction = Field(0.35, description="least visible share of an occluded object")
    class_weights: list[Annotated[float, Field(gt=0.0)]] | None = Field(
        None, description="relative class frequencies (uniform when None), one per class"
    )
    seed: NonNegative = 0

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"min_objects={self.min_objects} must be <= max_objects={self.max_objects}"
            )
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"scale_range={self.scale_range} must be (low, high) with low <= high")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(
                f"class_weights has {len(self.class_weights)} entries, "
                f"num_classes={self.num_classes} needs one per class"
            )
        return self


class DataConfig(Section):
    """Where images come from. `root` is a local path or a URI (s3://, gs://, file://)."""

    kind: Literal["synthetic", "folder", "voc", "coco"] = "synthetic"
    root: str | None = None
    train_split: str = Field(
        "train",
        description="synthetic: train/val; voc: train_aug/train/val/trainval (VOC2007: "
        "voc07_trainval/voc07_test); "
        "folder: a subfolder of root ('' for root itself); coco: the annotations' image "
        "folder (train2014: every image of instances_train2014.json), any other name: the "
        "coco_image_ids list (COCO20k)",
    )
    val_split: str | None = "val"
    coco_annotations: str | None = Field(None, description="instances_*.json for kind=coco")
    coco_image_ids: str | None = Field(
        None,
        description="id list file (one COCO id or file name per line, e.g. COCO20k): every "
        "split not named like the annotations' image folder",
    )
    max_pixels: Positive = Field(
        89_478_485, description="larger images are skipped (decompression bombs)"
    )
    min_side: Positive = 16
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _root_when_needed(self) -> DataConfig:
        if self.kind != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for data.kind={self.kind!r}")
        if self.kind == "coco" and not self.coco_annotations:
            raise ValueError("data.coco_annotations is required for data.kind='coco'")
        return self


class BackboneConfig(Section):
    """Self-supervised ViT for mining: a timm architecture and where its weights come from."""

    arch: str = "vit_small_patch16_224"
    weights: str = Field(
        "random",
        description="'random', 'hub' (timm hub tag, e.g. arch vit_small_patch16_224.dino), "
        "'pretrain' (this run's DINO pretraining on its own train split: pretrain/backbone.pth), "
        "or a local path / URI to a DINO release .pth, timm state dict or .safetensors",
    )


class PretrainConfig(Section):
    """DINO self-distillation of `backbone.arch` on the train split (stage `pretrain`).

    Runs only when backbone.weights is 'pretrain'. Defaults are DINO's ViT-S/16 recipe (Caron et
    al. 2021); `lr` is for 256 images per step and scales linearly with `batch_size`. Epoch
    counts become iterations at train_images // batch_size per epoch.
    Tuning knowledge (synthetic scenes, timm test_vit, a few hundred iterations): DINO needs
    far more iterations than a CPU demo affords. Within ~400 iterations the teacher drifts to a
    near-uniform output (loss close to ln out_dim) and the last block's CLS attention stays
    flat, so mined masks are no better than a random init's; lr, out_dim (256..16384), teacher
    temperature (0.02..0.07), teacher momentum (0.99..0.999), crop scales, crop counts and
    batch size changed the mined-mask IoU by a few hundredths only. `head_batch_norm` stops the
    uniform drift (the teacher keeps telling images apart) but did not make attention find
    objects in that budget either. Higher lr than ~2.5e-4 per step (after scaling) hurt.
    Within ~1000 iterations DINO either learns or collapses, and neither finds the objects
    (`benchmarks/pretrain_curve.py` prints the teacher's entropy and where the seed lands):
    with DINO's colour jitter it learns what is unique to each image (background colours,
    clutter lines), the CLS attention settles there and the seed almost never lies on an
    object; hue_jitter 0.5 with grayscale_probability 0.5 removes that cue and the teacher
    turns uniform, even with lr 1e-3 per step, teacher_temp 0.02, out_dim 16..256 or small
    local crops. 16384 train images instead of 256 (no image seen twice) did not change this.
    On one H100 (vit_small_patch8_224, batch 256, 8192 train images, 96/48 px crops, out_dim
    65536, lr 5e-4; three runs sharing the GPU at 0.59 s per iteration each), 256 iterations
    showed the same: the teacher stayed near uniform (entropy 10.8..11.0 of ln 65536 = 11.09),
    the seed on an object fell from 36% at init to 2..4%, with DINO's or the strong colour
    jitter alike, and the mined IoU stayed the random init's (0.083).
    """

    epochs: Positive = 100
    batch_size: Positive = Field(64, description="global batch, split evenly over the workers")
    lr: Annotated[float, Field(gt=0.0)] = Field(5e-4, description="peak lr for 256 images/step")
    min_lr: Annotated[float, Field(ge=0.0)] = 1e-6
    warmup_epochs: NonNegative = Field(10, description="linear lr warm-up from 0")
    weight_decay: Annotated[float, Field(ge=0.0)] = Field(
        0.04, description="AdamW weight decay at the start, cosine to weight_decay_end"
    )
    weight_decay_end: Annotated[float, Field(ge=0.0)] = 0.4
    momentum_teacher: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.996, description="EMA momentum of the teacher, cosine to 1"
    )
    teacher_temp: Annotated[float, Field(gt=0.0)] = 0.04
    warmup_teacher_temp: Annotated[float, Field(gt=0.0)] = Field(
        0.04, description="teacher temperature at iteration 0, linear to teacher_temp"
    )
    warmup_teacher_temp_epochs: NonNegative = 0
    student_temp: Annotated[float, Field(gt=0.0)] = 0.1
    center_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    out_dim: Positive = Field(65536, description="prototypes of the DINO head")
    hidden_dim: Positive = 2048
    bottleneck_dim: Positive = 256
    norm_last_layer: bool = Field(True, description="weight-normed last layer with g fixed to 1")
    head_batch_norm: bool = Field(False, description="BatchNorm in the head MLP (use_bn_in_head)")
    freeze_last_layer_epochs: NonNegative = 1
    clip_grad: Annotated[float, Field(ge=0.0)] = Field(
        3.0, description="per-parameter gradient norm cap; 0 turns clipping off"
    )
    global_crop_size: Positive = 224
    global_crop_scale: tuple[Fraction, Fraction] = (0.4, 1.0)
    local_crops: NonNegative = Field(8, description="small crops seen by the student only")
    local_crop_size: Positive = 96
    local_crop_scale: tuple[Fraction, Fraction] = (0.05, 0.4)
    hue_jitter: Annotated[float, Field(ge=0.0, le=0.5)] = Field(
        0.1, description="largest hue change of the colour jitter, in turns (0.5: any hue)"
    )
    grayscale_probability: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    checkpoint_every_epochs: Positive = Field(
        10, description="a checkpoint holds student, teacher and AdamW state: 4x the backbone"
    )
    precision: Precision = "bf16"
    resources: TrainingResources = TrainingResources()
    attention_images: NonNegative = Field(
        6, description="val images in pretrain/attention.png (last block's CLS attention)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        _batch_splits(self.batch_size, self.resources.num_workers)
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}=({low}, {high}) must be (low, high) with low <= high")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if getattr(self, name) > self.epochs:
                raise ValueError(f"{name}={getattr(self, name)} must be <= epochs={self.epochs}")
        return self


class MiningConfig(Section):
    """Sec 3.2: one object mask per image from the last attention block."""

    source: Literal["vit", "ground_truth"] = Field(
        "vit",
        description="'vit': Sec 3.2's mask; 'ground_truth': an upper-bound diagnostic, not "
        "unsupervised: each image's largest labelled object (score 1) and a one-hot of its true "
        "class as feature, so K-means recovers the classes and stages 2-3 are measured alone",
    )
    top_k: Fraction = Field(0.4, description="share of patches kept as proposals (Fig 4: 40%)")
    cls_heads: list[NonNegative] | None = Field(
        None,
        description="heads averaged into a_CLS (Eq 1); null: every head (the paper's text); "
        "the release: [0, 1, 2, 3, 4], the first 5 of ViT-S's 6",
    )
    seed_component: bool = Field(
        True, description="keep the 4-connected component holding the seed (authors' release)"
    )
    short_side: Positive = Field(640, description="shorter image side when mining (Sec 4.1)")
    shard_size: Positive = Field(
        1000,
        description="images per Parquet part; a rerun redoes only unfinished parts (hashed: "
        "parts are found by shard number)",
    )
    precision: Precision = "bf16"
    resources: ActorResources = ActorResources(batch_size=32)


class ClusteringConfig(Section):
    """Sec 3.2: CLS features of the mined objects, K-means into pseudo classes."""

    feature: Literal["crop", "masked"] = Field(
        "crop", description="'crop': CLS of the box crop (release); 'masked': masked image (text)"
    )
    num_clusters: Positive | Literal["auto"] | None = Field(
        None,
        description="None: the data set's class count (auto when it has none); 'auto': the K "
        "in k_range with the highest silhouette (`maskdistill clusters RUN --k` shows the curve)",
    )
    k_range: tuple[Annotated[int, Field(ge=2)], Positive] = Field(
        (2, 30), description="K tried by 'auto', both ends included"
    )
    k_sample: Annotated[int, Field(ge=100)] = Field(
        4000, description="points the silhouette is measured on (its cost grows as the square)"
    )
    overclustering: Annotated[float, Field(ge=1.0)] = 1.0
    whiten: Literal["none", "pca", "std"] = Field(
        "none",
        description="before L2: 'pca' whitening (zero mean, identity covariance), 'std' each "
        "dimension divided by its std over the support set (the release), 'none'; old "
        "configs' true/false read as pca/none",
    )
    l2_normalize: bool = True
    backbone: BackboneConfig | None = Field(
        None,
        description="a ViT of its own for the objects' CLS features (the release: "
        "vit_small_patch8_224.dino, weights hub); null: the mining ViT (`backbone`)",
    )
    crop: Literal["resize", "native"] = Field(
        "resize",
        description="'resize': the view resized to view_size x view_size (batched); 'native': "
        "at its own resolution, padded with the mean colour to a multiple of the patch size, "
        "one forward per object (the release)",
    )
    view_size: Annotated[int, Field(ge=16)] = Field(
        224, description="side of the square object view fed to the ViT for its CLS feature"
    )
    n_init: Positive = 10
    iterations: Positive = 100
    seed: NonNegative = 0
    support_split: str | None = None
    fit_samples: Positive | None = Field(
        200_000,
        description="transform, K sweep and K-means fit on a seeded uniform sample of at most "
        "this many support features, then every feature is assigned; null: all (the paper). "
        "200k keeps PASCAL (~10k) and COCO20k (82783 train2014) exact, 2x headroom; faiss "
        "alone would take 256 per centroid; costs fit_samples x feature dim x 4 bytes",
    )

    @field_validator("whiten", mode="before")
    @classmethod
    def _whiten_from_bool(cls, value: Any) -> Any:
        """Configs from before the `std` option said whiten: true (PCA) or false."""
        if isinstance(value, bool):
            return "pca" if value else "none"
        return value

    @model_validator(mode="after")
    def _k_range_ordered(self) -> ClusteringConfig:
        if self.backbone is not None and self.backbone.weights == "pretrain":
            raise ValueError(
                "clustering.backbone.weights='pretrain' is not supported: the run pretrains "
                "only the mining ViT; set clustering.backbone: null to use it"
            )
        low, high = self.k_range
        if low > high:
            raise ValueError(
                f"clustering.k_range={list(self.k_range)}: expected [low, high], low <= high"
            )
        return self


def _batch_splits(batch_size: int, num_workers: int) -> None:
    """The global batch is split evenly over the workers."""
    if batch_size % num_workers:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of resources.num_workers={num_workers}"
        )


class LRSchedule(Section):
    """Step schedule with linear warm-up; `base_lr` is for `reference_batch` images per step."""

    base_lr: Annotated[float, Field(gt=0.0)]
    reference_batch: Positive = 16
    warmup_iters: NonNegative = 0
    milestones: list[NonNegative] = []
    gamma: Fraction = 0.1


def _shuffle_window() -> Any:
    return Field(
        16_384,
        description="an epoch visits windows of this many consecutive rows (sorted ids) in a "
        "random order, each shuffled; a loader process caches one window's rows (segmenter: "
        "~5 KB each at VOC size). At or above the split's size (PASCAL): one full shuffle; 0: "
        "always one",
    )


class DetectorConfig(Section):
    """Mask R-CNN distilled on the clustered masks (Sec 3.2 Eq 3, A.1)."""

    arch: Literal[
        "maskrcnn_resnet50_fpn",
        "maskrcnn_resnet50_fpn_v2",
        "maskrcnn_resnet18_fpn",
        "maskrcnn_resnet50_c4",
    ] = Field(
        "maskrcnn_resnet50_fpn",
        description="resnet50_c4: the paper's R50-C4 (Detectron2), built from torchvision parts; "
        "resnet18_fpn: a small one for CPU demos",
    )
    init: BackboneInit = Field(
        "moco", description="'moco': MoCo v2 file at init_path; 'imagenet': torchvision (online)"
    )
    init_path: str | None = None
    trainable_backbone_layers: Annotated[int, Field(ge=0, le=5)] = Field(
        3, description="3 freezes the stem and res2, the first two stages (A.1)"
    )
    train_batch_norm: bool = Field(
        False,
        description="false: every backbone BatchNorm frozen at the init's statistics; true: the "
        "trainable stages' BatchNorm trains after the MoCo init (the release; SyncBatchNorm "
        "across several workers, so keep >= 2 images per worker)",
    )
    train_short_side: tuple[Positive, Positive] = Field(
        (480, 800), description="shorter side drawn from [low, high] in steps of 32 (A.1)"
    )
    test_short_side: Positive = 800
    max_size: Positive = Field(1333, description="cap on the longer side")
    proposals_per_image: Positive = Field(
        2000, description="RPN proposals kept per image in training (torchvision default)"
    )
    test_proposals_per_image: Positive = Field(
        1000,
        description="RPN proposals kept per image at inference (torchvision default); the box "
        "head's cost is linear in it: most of the distill stage's time on a CPU",
    )
    roi_batch_size: Positive = Field(512, description="sampled RoIs per image for the heads")
    detections_per_image: Positive = Field(100, description="candidates kept per image")
    train_splits: Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="splits whose mined, clustered masks train it (each is mined); null: "
        "[data.train_split]; PASCAL (A.4, after LOST): [train_aug, voc07_trainval], VOC07+12",
    )
    batch_size: Positive = Field(16, description="global batch, split evenly over the workers")
    max_iters: Positive = 24_000
    schedule: LRSchedule = LRSchedule(base_lr=0.02, warmup_iters=100, milestones=[20_000, 22_000])
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    checkpoint_every: Positive = 1000
    shuffle_window: NonNegative = _shuffle_window()
    precision: Precision = "bf16"
    resources: TrainingResources = TrainingResources()

    @model_validator(mode="after")
    def _batch_splits(self) -> DetectorConfig:
        _batch_splits(self.batch_size, self.resources.num_workers)
        return self


class PseudoLabelConfig(Section):
    """Sec 3.3, 4.1: keep Mask R-CNN candidates with score > tau; fall back to the best one."""

    tau: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.9, description="confidence threshold; Fig 5: mIoU plateaus around 0.9"
    )
    keep_best_when_none: bool = True
    shard_size: Positive = Field(1000, description="images per Parquet part (hashed)")
    resources: ActorResources = ActorResources()


class SegmenterConfig(Section):
    """DeepLab-v3, dilated ResNet, trained with hard pixel mining (Eq 4, Sec 4.1, A.3)."""

    backbone: Literal["resnet50", "resnet18"] = Field(
        "resnet50", description="resnet18: a small one for CPU demos"
    )
    init: BackboneInit = "moco"
    init_path: str | None = None
    frozen_stages: Annotated[int, Field(ge=0, le=5)] = Field(
        2,
        description="leading ResNet stages frozen, in the order stem, layer1, layer2, layer3, "
        "layer4: 2 freezes stem + layer1 (Sec 4.1, 'the first two ResNet blocks'), 3 also "
        "layer2 (the release), 0 trains everything",
    )
    output_stride: Literal[8, 16] = 8
    hard_pixel_fraction: Fraction = Field(0.2, description="Eq 4: the top 20% hardest pixels")
    epochs: Positive = 45
    batch_size: Positive = Field(16, description="global batch, split evenly over the workers")
    schedule: LRSchedule = Field(
        LRSchedule(base_lr=2e-3, milestones=[40]),
        description="milestones in epochs here; lr for `reference_batch` images",
    )
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    crop_size: Positive = 512
    scale_range: tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]] = (
        0.75,
        1.25,
    )
    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)] = 5.0
    augment: Literal["scale_rotate_crop", "fixed_resize"] = Field(
        "scale_rotate_crop",
        description="after the flip and the scale/rotation: 'scale_rotate_crop' a random "
        "crop_size crop (A.3); 'fixed_resize' the whole image resized to crop_size x crop_size, "
        "scaling zooming in the image's own frame (the release's 512x512 FixedResize)",
    )
    select: Literal["last", "best_on_val"] = Field(
        "last",
        description="the weights kept: 'last' iteration, or 'best_on_val': the checkpoint epoch "
        "with the highest Hungarian-matched val mIoU (the release). best_on_val selects on the "
        "evaluation set, i.e. on the test set: the evaluation marks its rows so",
    )
    checkpoint_every_epochs: Positive = 1
    shuffle_window: NonNegative = _shuffle_window()
    precision: Precision = "bf16"
    resources: TrainingResources = TrainingResources()

    @model_validator(mode="after")
    def _batch_splits(self) -> SegmenterConfig:
        workers = self.resources.num_workers
        if self.batch_size % workers or self.batch_size // workers < 2:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of resources.num_workers="
                f"{workers} with at least 2 images per worker (BatchNorm in the head)"
            )
        return self


class EvaluationConfig(Section):
    """Sec 4.1 protocols: Hungarian-matched mIoU, linear probe, mask AP (A.4)."""

    matching: Literal["hungarian", "majority"] = "hungarian"
    linear_probe: bool = True
    probe_epochs: Positive = Field(45, description="A.2: linear probe training epochs")
    probe_batch_size: Positive = Field(24, description="A.2: images per linear probe step")
    probe_lr: Annotated[float, Field(gt=0.0)] = Field(
        0.1, description="A.2: the probe's initial SGD learning rate (momentum 0.9, wd 1e-4)"
    )
    probe_milestones: list[Positive] = Field(
        [25], description="A.2: epochs after which the probe's lr is divided by 10, increasing"
    )
    probe_max_images: Positive | None = Field(
        None,
        description="train images the probe uses at most (None: all); their features are "
        "cached, 4 MiB per 512 x 512 image at output stride 8",
    )
    mask_ap: bool = True
    mask_ap_split: str | None = Field(
        None,
        description="split of Table 3's mask AP (mined and distilled too); null: data.val_split; "
        "PASCAL (A.4): trainval, the 2913 VOC12 segmentation images. Table 1 stays on val",
    )
    mined_score: Literal["attention", "one"] = Field(
        "attention",
        description="score of a mined mask in mask AP: its CLS attention share, or 1 (the "
        "paper treats the initial masks as given, so AP ranks them in image order)",
    )
    crf: bool = Field(
        False, description="Table 2 +CRF: also score the segmenter after the dense CRF (`crf:`)"
    )
    num_overlays: NonNegative = 8
    resources: TaskResources = TaskResources()

    @model_validator(mode="after")
    def _increasing_milestones(self) -> EvaluationConfig:
        steps = self.probe_milestones
        if any(later <= earlier for earlier, later in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"probe_milestones={steps} must be strictly increasing")
        return self


class CRFConfig(Section):
    """[46] dense CRF (DeepLab-v2's PASCAL values): the evaluation's +CRF rows and the
    self-training's label refinement (S1). Kernel weights are best set on a small annotated
    set (S1); `min_probability` and `max_side` only trade exactness for speed
    (benchmarks/crf_speed.py measures both)."""

    iterations: NonNegative = Field(10, description="mean-field updates; 0 gives the argmax")
    w_appearance: Annotated[float, Field(ge=0.0)] = Field(
        4.0, description="appearance (bilateral) kernel weight: snaps labels to colour edges"
    )
    theta_alpha: Annotated[float, Field(gt=0.0)] = Field(
        67.0, description="appearance kernel's spatial std in pixels"
    )
    theta_beta: Annotated[float, Field(gt=0.0)] = Field(
        3.0, description="appearance kernel's colour std (0..255); larger spreads across colours"
    )
    w_smoothness: Annotated[float, Field(ge=0.0)] = Field(
        3.0, description="smoothness kernel weight: removes isolated pixels"
    )
    theta_gamma: Annotated[float, Field(gt=0.0)] = Field(
        1.0, description="smoothness kernel's spatial std in pixels"
    )
    min_probability: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        1e-3,
        description="classes below this probability at every pixel of an image are left out of "
        "its CRF (cost is linear in classes; 0 keeps all); their marginals stay tiny anyway",
    )
    max_side: Annotated[int, Field(ge=32)] | None = Field(
        None,
        description="run the CRF with the longer side at most this (kernels in pixels scaled "
        "alike), labels upsampled nearest; None: full resolution, the paper's",
    )


class CRFResources(Section):
    """How the self-training runs: a GPU actor pool predicts, CPU tasks run the CRF; never
    hashed."""

    num_cpus: Annotated[float, Field(gt=0.0)] = Field(
        1.0, description="CPUs per CRF task; the CRF is single-threaded, so 1"
    )
    concurrency: Positive | None = Field(
        None, description="CRF tasks at once (None: as many as the cluster's CPUs allow)"
    )
    batch_size: Positive = Field(4, description="images per CRF task")
    predictor: ActorResources = Field(
        ActorResources(batch_size=8),
        description="the segmenter's actors predicting the softmax (one per GPU)",
    )


class SelfTrainingConfig(Section):
    """S1, Table 2 +CRF: rounds of (dense CRF over the segmenter's train predictions -> new
    pseudo labels -> segmenter retrained on them with its own recipe)."""

    rounds: NonNegative = Field(
        0, description="CRF self-training rounds after the segmenter stage; 0: off"
    )
    epochs: Positive | None = Field(
        None, description="segmenter epochs per round (None: segmenter.epochs, the same recipe)"
    )
    shard_size: Positive = Field(1000, description="images per Parquet part of refined labels")
    resources: CRFResources = CRFResources()


class ServeConfig(Section):
    """HTTP segmentation service (`serve/`): limits, batching, replicas.

    Tuning: one replica holds one segmenter; up to `max_batch_size` concurrent requests share a
    call (images of one padded size one forward pass). That amortises per-call overhead even on a
    CPU: under 8 concurrent clients of 64x64 images on 2 cores, batch 8 served 1.6-1.8x the
    requests/s of batch 1 at 0.5-0.65x its p50 latency (benchmarks/serve.py). Each replica accepts
    2 x max_batch_size requests at once (one batch running, the next filling) and the autoscaler
    aims at max_batch_size requests in flight per replica. `batch_wait_timeout_s` is the most a
    lone request waits for company; keep it well under one forward pass. min_replicas 0 scales
    to zero when idle (the next request then waits for a replica to load the model).
    """

    host: str = Field("127.0.0.1", description="0.0.0.0 to listen on every interface")
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_body_bytes: Positive = Field(20 * 1024 * 1024, description="larger bodies get 413")
    max_pixels: Positive = Field(
        40_000_000, description="larger images get 413, checked from the header before decoding"
    )
    max_side: Annotated[int, Field(ge=32)] | None = Field(
        640,
        description="the forward runs with the longer side at most this, logits upsampled to the "
        "upload's size; the segmenter learnt objects at long sides 375-625 (VOC's <= 500 px "
        "scaled 0.75-1.25, A.3), so larger only costs time (a 12 MP photo: resnet50 ~8 s on 2 "
        "cores at 640); null: full resolution, the evaluation's protocol",
    )
    pad_multiple: Positive = Field(
        128,
        description="uploads are padded to multiples of this: sizes that round alike share a "
        "forward pass, and an answer never depends on the other requests in its batch",
    )
    min_replicas: NonNegative = 1
    max_replicas: Positive = 4
    max_batch_size: Positive = 8
    batch_wait_timeout_s: Annotated[float, Field(ge=0.0)] = 0.01
    num_gpus: Annotated[float, Field(ge=0.0)] = Field(0.0, description="GPUs per replica")
    auth_token_env: str | None = Field(
        None,
        description="env var holding a bearer token, set where the replicas run; None: no auth",
    )

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} must be <= max_replicas={self.max_replicas}"
            )
        return self


class ExperimentConfig(Section):
    """A whole MaskDistill experiment."""

    name: str = "maskdistill"
    run_dir: str = Field("runs/maskdistill", description="local path or URI of the run directory")
    seed: NonNegative = 0
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    pretrain: PretrainConfig = PretrainConfig()
    mining: MiningConfig = MiningConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    detector: DetectorConfig = DetectorConfig()
    pseudo_labels: PseudoLabelConfig = PseudoLabelConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    crf: CRFConfig = CRFConfig()
    self_training: SelfTrainingConfig = SelfTrainingConfig()
    serve: ServeConfig = ServeConfig()

    def science(self, *keys: str) -> dict[str, Any]:
        """Dotted key -> value of every leaf under the named sections or keys, their `resources`
        parts left out: what decides a stage's result (`maskdistill.stages` hashes it)."""
        dumped = self.model_dump(mode="json")
        flat: dict[str, Any] = {}
        for key in keys:
            _flatten(_lookup(dumped, key), key, flat)
        return flat

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if not isinstance(node, dict):
        out[prefix] = node
        return
    for name, child in node.items():
        if name != RESOURCES:
            _flatten(child, f"{prefix}.{name}", out)


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE`, as every command takes them."""
    parser.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    add_set_arg(parser, "one key, e.g. --set mining.top_k=0.3")


def add_set_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """Repeatable `--set KEY=VALUE` into `args.overrides`; `what` it overrides, for the help."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} (repeatable; the value is parsed as YAML)",
    )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read YAML (defaults when None), apply `a.b=c` overrides, validate the whole tree."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=source)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`0.5`, `[1, 2]`, `null`)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key.path=value")
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err


def validate_config(raw: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(error) for error in err.errors()]
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


def _describe(error: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        if not close and loc[-1] in _allowed_keys([*loc[:-1], RESOURCES]):
            close = [f"{RESOURCES}.{loc[-1]}"]  # resources moved out of the hashed section
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key}: unknown key{hint}; allowed keys: {', '.join(allowed)}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    allowed_values = _allowed_values(loc)
    suffix = f"; allowed: {allowed_values}" if allowed_values else ""
    return f"{key}{shown}: {error['msg']}{suffix}"


def _field_at(loc: Iterable[str]) -> tuple[type[BaseModel] | None, Any]:
    """The model owning the last key of `loc` and that key's field info (None when not found)."""
    model: type[BaseModel] = ExperimentConfig
    info = None
    for part in loc:
        info = model.model_fields.get(part)
        if info is None:
            return None, None
        if _is_model(info.annotation):
            model = info.annotation
    return model, info


def _allowed_keys(section: list[str]) -> list[str]:
    """Keys of the section at `section` (the root when empty)."""
    model, info = _field_at(section)
    if model is None or (section and not _is_model(info.annotation)):
        return []
    return list(model.model_fields)


def _is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _allowed_values(loc: list[str]) -> str:
    _, info = _field_at(loc)
    if info is None:
        return ""
    literals = _literal_values(info.annotation)
    if literals:
        return ", ".join(repr(v) for v in literals)
    bounds = [
        f"{symbol} {getattr(meta, name)}"
        for meta in info.metadata
        for name, symbol in _BOUND_SYMBOLS.items()
        if getattr(meta, name, None) is not None
    ]
    return " and ".join(bounds)


_BOUND_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(v for arg in get_args(annotation) for v in _literal_values(arg))
