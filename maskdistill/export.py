"""A release of a trained run: safetensors weights, config, class names and a model card. Ray-free.

    maskdistill export RUN_DIR OUT [--onnx] [--torchscript] [--overwrite]

OUT (a local path or URI) mirrors the run directory's layout:

    segmenter/model.safetensors     DeepLab-v3 state dict (Sec 3.3), the keys of model.pt
    segmenter/model.onnx            --onnx: ImageNet-normalised float [N, 3, H, W] -> logits
                                    [N, C, H, W], N, H and W dynamic
    segmenter/model.torchscript.pt  --torchscript: the same function
    detector/...                    the same three for the distilled Mask R-CNN (Sec 3.2), when
                                    the run has one: float [3, H, W] in 0..1 -> boxes, labels,
                                    scores, masks (TorchScript: (losses, [detections]))
    config.json                     the run's whole config: the architecture is rebuilt from it
    class_names.json                {"names": [...]} one per segmenter label, background first,
                                    {"clusters": [...]} one per detector label (1 + cluster)
    README.md                       model card: YAML front matter, metrics, use, limits, license

Each ONNX and TorchScript file is run on a check image of another size than it was exported
with and compared with the eager model in fp32: the export fails (exit 1) when an output differs
by more than 1e-4 (detector mask probabilities: 1e-3, see `MASK_TOLERANCE`). OUT must be empty
or missing; `--overwrite` replaces an earlier export's files and leaves any others (e.g. a model
repository's .git). Bad input exits 2. `maskdistill.release.read_model` reads a model from a
run directory or an export folder.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from maskdistill import storage
from maskdistill.backbones import to_model_input
from maskdistill.config import ExperimentConfig
from maskdistill.inference import build_model
from maskdistill.names import NAMES_YAML, names_uri
from maskdistill.outputs import CLASS_NAMES_FILE, METRICS_FILE, read_metrics
from maskdistill.release import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    NAMES_FILE,
    RUN_CONFIG,
    STAGES,
    WEIGHTS_FILE,
    LoadedModel,
    has_model,
    join,
    model_file,
    read_model,
)
from maskdistill.rundir import RunDir, check_run_dir
from maskdistill.stages import DETECTOR, SEGMENTER

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
CARD_FILE = "README.md"
FORMAT_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
ARTIFACTS = (
    *(f"{stage}/{name}" for stage in STAGES for name in (WEIGHTS_FILE, *FORMAT_FILES.values())),
    CONFIG_FILE,
    NAMES_FILE,
    CARD_FILE,
)
TOLERANCE = 1e-4  # largest abs difference to the eager model: logits, scores, labels, boxes
# Mask R-CNN samples its masks at its predicted boxes, so box float noise moves RoIAlign's points
# and the mask head amplifies it: ONNX Runtime's masks differ by up to 5.3e-4 (untrained resnet50,
# 99.9% of pixels within 2e-5) where logits, boxes and scores stay within 3e-5.
MASK_TOLERANCE = 1e-3
DETECTIONS = ("boxes", "labels", "scores", "masks")
TRACE_SIZE = (64, 64)  # the example the exporters trace; small: every size works afterwards
CHECK_SIZE = (72, 104)  # the parity check's image, another size and aspect than the trace's
DETECTOR_OPSET = 17
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
KNOWN_DATASETS = {"voc": ("PASCAL VOC 2012", "pascal_voc"), "coco": ("COCO", "coco")}
Runner = Callable[[Tensor], dict[str, Tensor]]  # one check input -> named outputs


class ParityError(RuntimeError):
    """An exported file whose outputs differ from the eager model's."""


@dataclass
class ExportReport:
    """What `export_run` wrote: file paths relative to `out`, and per exported output the max
    abs difference to the eager model ("segmenter onnx logits" -> 3e-8)."""

    out: str
    files: list[str] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)


def export_run(
    run_dir: str,
    out: str,
    *,
    onnx: bool = False,
    torchscript: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Write the release of a trained run under `out` (see the module docstring); what was
    written and the parity figures. FileNotFoundError without a run or a trained segmenter,
    FileExistsError for a non-empty `out` without `overwrite`, ImportError for `onnx` without
    the `export` extra, ParityError when an exported file disagrees with the eager model."""
    _check_source(run_dir)
    if onnx:
        _require_onnx()
    _prepare_target(out, overwrite=overwrite)
    models = {s: read_model(run_dir, s) for s in STAGES if has_model(run_dir, s)}
    formats = [name for name, wanted in (("onnx", onnx), ("torchscript", torchscript)) if wanted]
    report = ExportReport(out)
    for stage, loaded in models.items():
        _export_stage(report, stage, loaded, formats)
    segmenter = models[SEGMENTER]
    _write(report, json.dumps(segmenter.config.model_dump(mode="json"), indent=2), CONFIG_FILE)
    names = {"names": segmenter.class_names}
    if DETECTOR in models:
        names["clusters"] = models[DETECTOR].class_names
    _write(report, json.dumps(names, indent=2), NAMES_FILE)
    metrics = _run_metrics(run_dir)
    card = model_card(segmenter, list(models), metrics, report, named=_names_source(run_dir))
    _write(report, card, CARD_FILE)
    return report


def _check_source(run_dir: str) -> None:
    """FileNotFoundError unless `run_dir` is a run directory with a trained segmenter."""
    check_run_dir(run_dir)
    weights = model_file(run_dir, SEGMENTER)
    if not has_model(run_dir, SEGMENTER):
        raise FileNotFoundError(f"{weights}: no trained segmenter (run train-segmenter first)")


def _require_onnx() -> None:
    """ImportError naming the missing packages unless ONNX export and its check can run."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"--onnx needs {', '.join(missing)}: pip install 'maskdistill[export]'")


def _prepare_target(out: str, *, overwrite: bool) -> None:
    """Make sure `out` may be written: empty, or an earlier export whose files are then deleted
    (only those: other files stay). Never a run directory."""
    existing = storage.list_tree(out)
    if RUN_CONFIG in existing:
        raise FileExistsError(f"{out}: a run directory; export into another folder")
    if existing and not overwrite:
        raise FileExistsError(
            f"{out}: not empty ({len(existing)} files); choose an empty folder, or --overwrite "
            "(overwrite=True) to replace an earlier export's files"
        )
    for name in sorted(existing.intersection(ARTIFACTS)):
        storage.delete_file(join(out, name))


def _export_stage(
    report: ExportReport, stage: str, loaded: LoadedModel, formats: Sequence[str]
) -> None:
    """Safetensors weights of one stage, then each format, each checked before it is written."""
    _write(report, weights_bytes(loaded, stage), stage, WEIGHTS_FILE)
    if not formats:
        return
    model = build_model(loaded, stage)
    for name in formats:
        with warnings.catch_warnings():
            # tracer, exporter and TorchScript deprecation notes: the parity check judges instead
            warnings.simplefilter("ignore")
            data = _serialise(model, stage, name)
            _check_parity(report, model, stage, name, data)
        _write(report, data, stage, FORMAT_FILES[name])


def weights_bytes(loaded: LoadedModel, stage: str) -> bytes:
    """A safetensors file of the state dict (contiguous copies, keys unchanged) with string
    metadata: format, format_version, stage, arch, num_classes."""
    tensors = {
        key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for key, value in loaded.state.items()
    }
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "arch": arch_name(loaded.config, stage),
        "num_classes": str(loaded.num_classes),
    }
    data: bytes = save_safetensors(tensors, metadata=metadata)
    return data


def arch_name(config: ExperimentConfig, stage: str) -> str:
    """The stage's architecture in a word: "deeplabv3_resnet50_os8", "maskrcnn_resnet50_fpn"."""
    if stage == DETECTOR:
        return config.detector.arch
    seg = config.segmenter
    return f"deeplabv3_{seg.backbone}_os{seg.output_stride}"


class SegmenterLogits(nn.Module):
    """DeepLab-v3 as one tensor function: normalised float [N, 3, H, W] -> logits [N, C, H, W]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        logits: Tensor = self.model(image)["out"]
        return logits


def check_pixels(batch: int, size: tuple[int, int], seed: int) -> Tensor:
    """Seeded uint8 RGB noise [batch, H, W, 3]: the exporters' example and the check image."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, generator=generator)


def model_input(stage: str, pixels: Tensor) -> Tensor:
    """What the exported `stage` takes for uint8 images [B, H, W, 3]: the segmenter normalised
    [B, 3, H, W], the detector the first image as float [3, H, W] in 0..1."""
    if stage == SEGMENTER:
        return to_model_input(pixels)
    return pixels[0].permute(2, 0, 1).float().div(255)


def _serialise(model: nn.Module, stage: str, fmt: str) -> bytes:
    """The bytes of `model` in format `fmt` ("onnx" or "torchscript")."""
    module = SegmenterLogits(model) if stage == SEGMENTER else model
    if fmt == "torchscript":
        return _torchscript(module)
    example = model_input(stage, check_pixels(2, TRACE_SIZE, seed=0))
    if stage == SEGMENTER:
        return _segmenter_onnx(module, example)
    return _detector_onnx(module, example)


def _torchscript(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def _segmenter_onnx(module: nn.Module, example: Tensor) -> bytes:
    """torch.export-based ONNX with dynamic batch, height and width."""
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height"),
        3: torch.export.Dim("width"),
    }
    program = torch.onnx.export(
        module,
        (example,),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"image": dims},
        dynamo=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    data: bytes = program.model_proto.SerializeToString()
    return data


def _detector_onnx(model: nn.Module, example: Tensor) -> bytes:
    """The TorchScript-based ONNX exporter, one image of dynamic height and width.

    The torch.export-based exporter cannot take torchvision's Mask R-CNN (torch 2.14,
    torchvision 0.29): GuardOnDataDependentSymNode "Could not guard on data-dependent expression
    4*u1 > 4000" in batched_nms (torchvision/ops/boxes.py), a branch on the box count.
    """
    per_detection = {0: "detections"}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, ONNX_FILE)
        torch.onnx.export(
            model,
            ([example],),
            path,
            dynamo=False,
            opset_version=DETECTOR_OPSET,
            input_names=["image"],
            output_names=list(DETECTIONS),
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                "boxes": per_detection,
                "labels": per_detection,
                "scores": per_detection,
                "masks": {0: "detections", 2: "height", 3: "width"},
            },
        )
        with open(path, "rb") as f:
            return f.read()


def _check_parity(
    report: ExportReport, model: nn.Module, stage: str, fmt: str, data: bytes
) -> None:
    """Run the serialised model and the eager one on the check image; record each output's max
    abs difference (boxes in units of the image's longer side) or raise ParityError."""
    image = model_input(stage, check_pixels(1, CHECK_SIZE, seed=1))
    with torch.no_grad():
        expected = _eager_runner(model, stage)(image)
        got = _runner(data, stage, fmt)(image)
    for key, want in expected.items():
        label = f"{stage} {fmt} {key}"
        if got[key].shape != want.shape:
            raise ParityError(f"{label}: shape {tuple(got[key].shape)}, eager {tuple(want.shape)}")
        diff = (got[key].double() - want.double()).abs().max().item() if want.numel() else 0.0
        if key == "boxes":
            diff /= max(CHECK_SIZE)
        report.parity[label] = diff
        tolerance = MASK_TOLERANCE if key == "masks" else TOLERANCE
        if not diff <= tolerance:
            raise ParityError(f"{label}: max abs diff {diff:.3g} to the eager model > {tolerance}")


def _eager_runner(model: nn.Module, stage: str) -> Runner:
    if stage == SEGMENTER:
        return lambda image: {"logits": model(image)["out"]}
    return lambda image: dict(model([image])[0])


def _runner(data: bytes, stage: str, fmt: str) -> Runner:
    """The serialised model as a function of one check input, outputs named as the eager's."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        feed = session.get_inputs()[0].name
        return lambda image: {
            name: torch.from_numpy(value)
            for name, value in zip(names, session.run(None, {feed: image.numpy()}), strict=True)
        }
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    if stage == SEGMENTER:
        return lambda image: {"logits": module(image)}
    return lambda image: dict(module([image])[1][0])  # scripted: (losses, detections)


def _run_metrics(run_dir: str) -> dict[str, Any]:
    """The evaluate stage's metrics.json, {} when the run was not evaluated."""
    if not storage.is_file(join(run_dir, *METRICS_FILE)):
        return {}
    return read_metrics(RunDir(run_dir))


def _names_source(run_dir: str) -> str | None:
    """Where the run's label names come from: names.yaml, the evaluation, or nowhere."""
    if storage.is_file(names_uri(run_dir)):
        return NAMES_YAML
    return "evaluation" if storage.is_file(join(run_dir, *CLASS_NAMES_FILE)) else None


def card_license(config: ExperimentConfig) -> tuple[str, str]:
    """The model card's license id and why, from the inits the detector and segmenter used."""
    inits = {config.segmenter.init, config.detector.init}
    if "moco" in inits:
        return "cc-by-nc-4.0", (
            "the detector and/or segmenter start from MoCo v2 ResNet weights; MoCo's released "
            "weights are CC-BY-NC 4.0, so these derived weights are for non-commercial use "
            "(if you trained the MoCo checkpoint yourself, its data's terms decide instead)"
        )
    if "imagenet" in inits:
        return "other", (
            "the detector and/or segmenter start from torchvision's ImageNet-supervised ResNet "
            "weights, which carry ImageNet's terms of access (non-commercial research)"
        )
    return "apache-2.0", (
        "the detector and segmenter were trained from random init, so no released weights are "
        "part of them; the mining ViT (DINO's release is Apache-2.0) only made their pseudo "
        "labels, and this code is Apache-2.0 too. The training images' own terms still apply"
    )


def metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(metric type, name, value in %) of each finite evaluation figure: mIoU per Table 1 row,
    AP, AP50, AP75 per mask AP setting."""
    rows = [
        ("mean_iou", f"mIoU {name}", 100 * float(scores["miou"]))
        for name, scores in metrics.items()
        if isinstance(scores, Mapping) and "miou" in scores
    ]
    for name, ap in metrics.get("mask AP", {}).items():
        rows += [(f"mask_{k.lower()}", f"mask {k} {name}", 100 * float(ap[k])) for k in ap]
    return [(kind, name, round(value, 2)) for kind, name, value in rows if math.isfinite(value)]


def front_matter(
    loaded: LoadedModel, stages: Sequence[str], metrics: Mapping[str, Any], onnx: bool
) -> dict[str, Any]:
    """The model card's YAML metadata (Hugging Face model card fields)."""
    config = loaded.config
    tags = ["maskdistill", "unsupervised-semantic-segmentation", "semantic-segmentation"]
    tags += ["deeplabv3", *(["mask-rcnn"] if DETECTOR in stages else []), "pytorch", "safetensors"]
    tags += ["onnx"] if onnx else []
    meta: dict[str, Any] = {
        "library_name": "maskdistill",
        "pipeline_tag": "image-segmentation",
        "license": card_license(config)[0],
        "tags": tags,
    }
    if meta["license"] == "other":
        meta["license_name"] = "imagenet-terms-of-access"
        meta["license_link"] = "https://image-net.org/download"
    known = KNOWN_DATASETS.get(config.data.kind)
    if known:
        meta["datasets"] = [known[1]]
    rows = metric_rows(metrics)
    if rows:
        name, kind = known or (f"{config.data.kind} images", config.data.kind)
        result = {
            "task": {"type": "image-segmentation", "name": "Unsupervised semantic segmentation"},
            "dataset": {"name": name, "type": kind, "split": config.data.val_split},
            "metrics": [{"type": k, "name": n, "value": v} for k, n, v in rows],
        }
        meta["model-index"] = [{"name": config.name, "results": [result]}]
    return meta


def config_summary(config: ExperimentConfig, num_classes: int) -> list[tuple[str, str]]:
    """(setting, value) rows of the pipeline config that describe the model."""
    seg, det = config.segmenter, config.detector
    return [
        ("data", f"{config.data.kind} {config.data.root or ''}".strip()),
        ("train / val split", f"{config.data.train_split} / {config.data.val_split}"),
        ("mining ViT (Sec 3.2)", f"{config.backbone.arch}, weights {config.backbone.weights}"),
        ("top-k patches", f"{config.mining.top_k:.0%}"),
        ("clusters C (K-means)", str(num_classes - 1)),
        ("detector (Sec 3.2)", f"{det.arch}, init {det.init}"),
        ("confidence tau (Sec 3.3)", str(config.pseudo_labels.tau)),
        ("segmenter (Sec 3.3)", f"DeepLab-v3 {seg.backbone}, output stride {seg.output_stride}"),
        ("segmenter init", seg.init),
        (
            "segmenter training",
            f"{seg.epochs} epochs, batch {seg.batch_size}, crop {seg.crop_size}",
        ),
        ("hard pixels (Eq 4)", f"{seg.hard_pixel_fraction:.0%}"),
        ("seed", str(config.seed)),
    ]


def model_card(
    loaded: LoadedModel,
    stages: Sequence[str],
    metrics: Mapping[str, Any],
    report: ExportReport,
    *,
    named: str | None,
) -> str:
    """README.md of the export: YAML front matter, then what the model is, its config, metrics,
    how to use it, its intended use and limits, and its license. `named`: the class names come
    from the evaluation's Hungarian matching."""
    config = loaded.config
    onnx = any(f.endswith(ONNX_FILE) for f in report.files)
    meta = yaml.safe_dump(front_matter(loaded, stages, metrics, onnx), sort_keys=False)
    license_id, why = card_license(config)
    lines = [f"---\n{meta}---", "", f"# {config.name} (MaskDistill)", ""]
    lines += _about(config, stages, loaded.num_classes)
    lines += ["## Files", "", *(f"- `{name}`" for name in report.files), ""]
    lines += ["## Pipeline config", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in config_summary(config, loaded.num_classes)]
    lines += ["", *_metrics_section(metrics, config), *_parity_section(report)]
    lines += _usage(report)
    lines += _limits(config, loaded, named)
    lines += ["## License", "", f"`{license_id}`: {why}."]
    return "\n".join(lines) + "\n"


def _about(config: ExperimentConfig, stages: Sequence[str], num_classes: int) -> list[str]:
    seg = config.segmenter
    detector = (
        f" The distilled Mask R-CNN (`{config.detector.arch}`) is included under `detector/`."
        if DETECTOR in stages
        else ""
    )
    return [
        "Unsupervised semantic segmentation with MaskDistill (Van Gansbeke et al.): a "
        "self-supervised ViT's attention mines one object mask per image, K-means groups the "
        "masks into pseudo classes, a Mask R-CNN is distilled on them (Sec 3.2), and its "
        f"confident masks (score > tau = {config.pseudo_labels.tau}) are the pseudo labels of "
        f"the final segmenter (Sec 3.3): DeepLab-v3 on a dilated {seg.backbone} (output stride "
        f"{seg.output_stride}) predicting {num_classes} labels, 0 background and 1 + k "
        f"cluster k, trained without human labels.{detector}",
        "",
    ]


def _metrics_section(metrics: Mapping[str, Any], config: ExperimentConfig) -> list[str]:
    rows = metric_rows(metrics)
    if not rows:
        return ["## Evaluation", "", "The run was not evaluated (no evaluate/metrics.json).", ""]
    matching = config.evaluation.matching
    return [
        "## Evaluation",
        "",
        f"On the `{config.data.val_split}` split, clusters matched to classes by {matching} "
        "matching (Sec 4.1; the linear probe row uses a trained probe, A.2).",
        "",
        "| metric | value (%) |",
        "| --- | ---: |",
        *(f"| {name} | {value:.1f} |" for _, name, value in rows),
        "",
    ]


def _parity_section(report: ExportReport) -> list[str]:
    if not report.parity:
        return []
    return [
        "## Export check",
        "",
        f"Each exported file was run on a {CHECK_SIZE[0]}x{CHECK_SIZE[1]} check image and "
        "compared with the eager PyTorch model in fp32 (max abs difference, at most "
        f"{TOLERANCE:g}, detector masks {MASK_TOLERANCE:g}; boxes as a fraction of the image's "
        "longer side):",
        "",
        *(f"- {name}: {diff:.2e}" for name, diff in report.parity.items()),
        "",
    ]


def _usage(report: ExportReport) -> list[str]:
    lines = [
        "## How to use",
        "",
        "```bash",
        "# with the maskdistill package installed",
        "maskdistill predict THIS_FOLDER images/ labels/   # one label PNG per image",
        "maskdistill serve THIS_FOLDER                     # HTTP segmentation service",
        "```",
        "",
        "```python",
        "from maskdistill.inference import build_model",
        "from maskdistill.release import read_model",
        "",
        'loaded = read_model("THIS_FOLDER", "segmenter")  # config, state dict, class names',
        'model = build_model(loaded, "segmenter")  # torchvision DeepLabV3, eval mode',
        "```",
        "",
    ]
    if any(f.endswith(ONNX_FILE) for f in report.files):
        lines += [
            "`segmenter/model.onnx` takes `image`: float32 [N, 3, H, W], RGB scaled to 0..1 "
            "then normalised with ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, "
            "0.225); it returns `logits` [N, C, H, W] (argmax over C: the label map).",
            "",
        ]
    if any(f.endswith(TORCHSCRIPT_FILE) for f in report.files):
        lines += [
            "`*/model.torchscript.pt` load with `torch.jit.load` (`import torchvision` first for "
            "the detector's ops); the segmenter's takes and returns what the ONNX file does.",
            "",
        ]
    return lines


def _limits(config: ExperimentConfig, loaded: LoadedModel, named: str | None) -> list[str]:
    names = {
        NAMES_YAML: "Label names were given by a person (the run's names.yaml), from looking at "
        "the clusters' masks; merged clusters are one label.",
        "evaluation": "Label names come from the evaluation: Hungarian matching of clusters to "
        f"the ground-truth classes of the `{config.data.val_split}` split; unmatched labels stay "
        "`cluster k`.",
        None: "The run was not evaluated against ground truth, so labels are named `cluster k` "
        "only: which object class a cluster stands for is not known.",
    }[named]
    return [
        "## Intended use and limits",
        "",
        "- Research on unsupervised segmentation. Labels are clusters found without annotation, "
        "not a fixed taxonomy: a cluster may merge classes or split one. " + names,
        "- Object classes only: mining finds one salient object per image, so stuff classes "
        "(sky, road) and small or crowded objects are segmented poorly.",
        f"- The evaluation ran the segmenter at each image's own resolution (A.3); it was "
        f"trained on {config.segmenter.crop_size} px crops, and at output stride "
        f"{config.segmenter.output_stride} its memory grows with the pixel count, so `predict "
        f"--max-side` and `serve.max_side` (640 by default) bound the forward pass and upsample "
        f"the answer. The detector resizes images to a shorter side of "
        f"{config.detector.test_short_side} px.",
        f"- Trained on `{config.data.kind}` data: other domains are untested.",
        "",
    ]


def _write(report: ExportReport, data: bytes | str, *parts: str) -> None:
    """Write one file under the report's folder and list it."""
    payload = data.encode() if isinstance(data, str) else data
    storage.write_bytes(join(report.out, *parts), payload)
    report.files.append("/".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    """`maskdistill export`: 0 when written, 2 for bad input, 1 when a parity check fails."""
    parser = argparse.ArgumentParser(
        prog="maskdistill export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory with a trained segmenter")
    parser.add_argument("out", help="empty or new folder / URI for the release")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx files")
    parser.add_argument(
        "--torchscript", action="store_true", help="also write model.torchscript.pt files"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export's files in OUT"
    )
    args = parser.parse_args(argv)
    try:
        report = export_run(
            args.run_dir,
            args.out,
            onnx=args.onnx,
            torchscript=args.torchscript,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ParityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


def summary(report: ExportReport) -> str:
    """What was written and the parity figures, as `main` prints them."""
    lines = [f"export: {len(report.files)} files -> {report.out}"]
    lines += [f"  {name}" for name in report.files]
    if report.parity:
        lines.append("parity with the eager model (max abs diff, fp32):")
        lines += [f"  {name}: {diff:.2e}" for name, diff in report.parity.items()]
    return "\n".join(lines)
