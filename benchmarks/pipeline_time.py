"""Projected wall time of a recipe from per-stage rates (issue 15): what a user pays in GPU hours.

    python benchmarks/pipeline_time.py                          # PASCAL on 1 and 8 GPUs, demo here
    python benchmarks/pipeline_time.py --rates OUT/rates.json  # rates benchmarks/gpu.sh measured
    python benchmarks/pipeline_time.py --defaults anchor        # at the issue's plain-loop anchors
    python benchmarks/pipeline_time.py --rate segmenter_train=120 --no-cpu

Work per stage comes from the configs (`load_config`): images mined (`outputs.mined_splits`),
detector iterations x batch, images the detector labels (`distilled_splits`), segmenter epochs x
(train images // batch) x batch, each CRF self-training round (predict train, CRF on the CPU
cores, retrain), and the evaluation's predictions (val, plus the linear probe's train features).
Split sizes: the synthetic config's, VOC's published sizes (`VOC_SPLIT_IMAGES`), or
`--split-images NAME=N`. Each stage's time is images / (rate x GPUs) (CRF: rate per core x
cores) plus `--startup` seconds; GPUs scale ideally, so the multi-GPU figures are lower bounds.
The data and cluster stages (CPU, minutes) are not modelled. Every rate is printed with where it
came from: `--rates JSON` (gpu.sh), `--rate NAME=V`, or the built-in table (`--defaults`:
`stage`, the issue's "stage as measured" column on one H100; `anchor`, its plain-loop anchors).
The demo (configs/demo.yaml) is projected for this CPU with rates timed here in about a minute
(`measure_cpu`: training steps and forwards on random inputs, no data loading, per core in CPU
time x `--cpu-cores`, so ideal scaling over the cores), or `--cpu-rates`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from maskdistill.config import ExperimentConfig, load_config
from maskdistill.outputs import distilled_splits, mined_splits
from maskdistill.stages import PRETRAINED

REPO = Path(__file__).resolve().parent.parent
# VOC2012 devkit and SBD train_aug (Hariharan et al.), VOC2007 devkit: images per split
VOC_SPLIT_IMAGES = {
    "train_aug": 10582,
    "train": 1464,
    "val": 1449,
    "trainval": 2913,
    "voc07_trainval": 5011,
    "voc07_test": 4952,
}
RATES = {  # name: what it times, in images/s (per GPU; crf: per CPU core)
    "mine": "mining end to end (decode, ViT, masks, object features)",
    "detector_train": "the detector stage's training, images/s",
    "detector_predict": "the detector on whole images (distill)",
    "segmenter_train": "the segmenter stage's training, images/s",
    "segmenter_predict": "the segmenter on whole images (refine, evaluate, probe features)",
    "pretrain_train": "DINO pretraining, images/s",
    "crf": "dense CRF per CPU core",
}
_ISSUE = "issue 15 table, H100"
_GUESS = "estimate: 3x the training step anchor (forward only), not measured"
STARTUP_S = 30.0  # estimate: Ray workers, model build and weights per stage


@dataclass(frozen=True)
class Rate:
    value: float  # images/s
    source: str


_CRF_RATE = Rate(1 / 1.39, "benchmarks/crf_speed.py: 1.39 CPU-s per 512x512 image, 2-core box")
DEFAULTS: dict[str, dict[str, Rate]] = {
    "stage": {
        "mine": Rate(211, f"{_ISSUE}, mining end to end bf16"),
        "detector_train/fp32": Rate(9.7, f"{_ISSUE}, Mask R-CNN stage fp32 (batch 8)"),
        "detector_train/bf16": Rate(8.6, f"{_ISSUE}, Mask R-CNN stage bf16 (batch 8)"),
        "segmenter_train": Rate(26, f"{_ISSUE}, DeepLab-v3 stage 24-28 (12 loader threads)"),
        "detector_predict": Rate(114, _GUESS),
        "segmenter_predict": Rate(267, _GUESS),
        "crf": _CRF_RATE,
    },
    "anchor": {
        "mine": Rate(1185, f"{_ISSUE}, mining masks-only anchor bf16"),
        "detector_train/fp32": Rate(38, f"{_ISSUE}, Mask R-CNN plain-loop anchor fp32"),
        "detector_train/bf16": Rate(46, f"{_ISSUE}, Mask R-CNN plain-loop anchor bf16"),
        "segmenter_train/fp32": Rate(89, f"{_ISSUE}, DeepLab-v3 plain-loop anchor fp32"),
        "segmenter_train/bf16": Rate(128, f"{_ISSUE}, DeepLab-v3 plain-loop anchor bf16"),
        "detector_predict": Rate(114, _GUESS),
        "segmenter_predict": Rate(267, _GUESS),
        "crf": _CRF_RATE,
    },
}


@dataclass(frozen=True)
class Work:
    """`images` through one rate (`rate`, optionally `rate/precision`) within a stage."""

    stage: str
    what: str
    images: float
    rate: str
    precision: str | None = None


@dataclass(frozen=True)
class Row:
    work: Work
    rate: Rate
    seconds: float


def split_images(config: ExperimentConfig, split: str, given: Mapping[str, int]) -> int:
    """Images in `split`: `given` first, then the synthetic config's, then VOC's sizes."""
    if split in given:
        return given[split]
    if config.data.kind == "synthetic":
        syn = config.data.synthetic
        return syn.train_images if split == config.data.train_split else syn.val_images
    if config.data.kind == "voc" and split in VOC_SPLIT_IMAGES:
        return VOC_SPLIT_IMAGES[split]
    raise ValueError(f"split {split!r}: size unknown; pass --split-images {split}=N")


def recipe_work(config: ExperimentConfig, given: Mapping[str, int] | None = None) -> list[Work]:
    """The images each modelled stage of `config` processes, in pipeline order."""
    sizes = {s: split_images(config, s, given or {}) for s in mined_splits(config)}
    train = sizes[config.data.train_split]
    work: list[Work] = []
    if config.backbone.weights == PRETRAINED:
        pre = config.pretrain
        images = pre.epochs * max(1, train // pre.batch_size) * pre.batch_size
        work.append(Work("pretrain", f"{pre.epochs} epochs", images, "pretrain_train"))
    work.append(Work("mine", "+".join(sizes), sum(sizes.values()), "mine"))
    det = config.detector
    what = f"{det.max_iters} it x {det.batch_size}"
    work.append(
        Work("detector", what, det.max_iters * det.batch_size, "detector_train", det.precision)
    )
    labelled = distilled_splits(config)
    what = "+".join(labelled)
    work.append(Work("distill", what, sum(sizes[s] for s in labelled), "detector_predict"))
    seg = config.segmenter
    work.append(_segmenter_training("segmenter", config, seg.epochs, train))
    epochs = config.self_training.epochs or seg.epochs
    for round_ in range(1, config.self_training.rounds + 1):
        stage = f"refine {round_}"
        work.append(Work(stage, "predict train", train, "segmenter_predict"))
        work.append(Work(stage, "CRF train", train, "crf"))
        work.append(_segmenter_training(stage, config, epochs, train))
    val = sizes.get(config.data.val_split or "", 0)
    if val:
        work.append(Work("evaluate", "predict val", val, "segmenter_predict"))
    ev = config.evaluation
    if ev.linear_probe:
        probe = min(train, ev.probe_max_images or train)
        work.append(Work("evaluate", "probe features", probe, "segmenter_predict"))
    if ev.crf and val:
        work.append(Work("evaluate", "CRF val", val, "crf"))
    return work


def _segmenter_training(stage: str, config: ExperimentConfig, epochs: int, train: int) -> Work:
    """Sec 4.1: `epochs` of train // batch iterations (jobs/segmenter_training.py) x batch."""
    batch = config.segmenter.batch_size
    images = epochs * max(1, train // batch) * batch
    precision = config.segmenter.precision
    return Work(stage, f"{epochs} epochs x {batch}", images, "segmenter_train", precision)


def lookup(rates: Mapping[str, Rate], work: Work) -> Rate:
    """`rate/precision` if given, else `rate`; KeyError naming both when neither is."""
    names = ([f"{work.rate}/{work.precision}"] if work.precision else []) + [work.rate]
    for name in names:
        if name in rates:
            return rates[name]
    raise KeyError(f"no rate {' or '.join(names)} for {work.stage} ({RATES[work.rate]})")


def project(
    work: list[Work], rates: Mapping[str, Rate], *, gpus: int, cores: int, startup_s: float
) -> list[Row]:
    """Seconds of each work item: images / (rate x gpus), CRF / (rate x cores); each stage's
    first item also pays `startup_s`."""
    rows, seen = [], set()
    for item in work:
        rate = lookup(rates, item)
        units = cores if item.rate == "crf" else gpus
        seconds = item.images / (rate.value * units)
        if item.stage not in seen:
            seen.add(item.stage)
            seconds += startup_s
        rows.append(Row(item, rate, seconds))
    return rows


def table(title: str, rows: list[Row]) -> str:
    lines = [title, f"{'stage':<10} {'work':<38} {'images':>9} {'img/s':>8} {'hours':>7}  source"]
    for row in rows:
        w = row.work
        lines.append(
            f"{w.stage:<10} {w.what:<38} {w.images:>9.0f} {row.rate.value:>8.2f} "
            f"{row.seconds / 3600:>7.2f}  {row.rate.source}"
        )
    total = sum(r.seconds for r in rows)
    lines.append(
        f"{'total':<10} {'':<38} {'':>9} {'':>8} {total / 3600:>7.2f}  ({total / 60:.0f} min)"
    )
    return "\n".join(lines)


def read_rates(path: Path) -> dict[str, Rate]:
    """gpu.sh's rates.json: {"device": ..., "rates": {name: {"value": v, "source": s}}}."""
    data = json.loads(path.read_text())
    device = data.get("device", "?")
    rates = {}
    for name, entry in data["rates"].items():
        if name.split("/")[0] not in RATES:
            raise ValueError(f"{path}: unknown rate {name!r}; known: {', '.join(RATES)}")
        rates[name] = Rate(float(entry["value"]), f"{path.name} ({device}): {entry['source']}")
    return rates


def measure_cpu(config: ExperimentConfig, *, cores: int, repeats: int = 3) -> dict[str, Rate]:
    """The demo's rates on this CPU: training steps and forwards of its models on random
    inputs at its sizes (no data loading, no Ray), `repeats` timed calls after one warm-up, on
    one torch thread in CPU time (other jobs on the machine change it little), times `cores`."""
    import numpy as np
    import torch

    from maskdistill.backbones import build_backbone
    from maskdistill.detector import detector_losses, total_loss
    from maskdistill.engine import trainable
    from maskdistill.inference import detector_from_config, segmenter_from_config
    from maskdistill.mining import mine_images
    from maskdistill.segmenter import segmenter_losses

    classes = config.data.synthetic.num_classes + 1  # the demo's clusters + background
    source = f"measured here: images per CPU-s on 1 thread x {cores} cores, random inputs"
    torch.set_num_threads(1)
    seg, det = config.segmenter, config.detector
    side = seg.crop_size
    images = torch.rand(seg.batch_size, 3, side, side)
    targets = torch.randint(0, classes, (seg.batch_size, side, side))
    segmenter = segmenter_from_config(seg, num_classes=classes)
    optimizer = torch.optim.SGD(trainable(segmenter.parameters()), lr=1e-4)

    def seg_step() -> None:
        optimizer.zero_grad()
        segmenter_losses(segmenter, images, targets)["loss_seg"].backward()
        optimizer.step()

    def seg_predict() -> None:
        with torch.no_grad():
            segmenter.eval()(images)
        segmenter.train()

    height = det.test_short_side
    det_images = [torch.rand(3, height, height) for _ in range(det.batch_size)]
    box = torch.tensor([[height * 0.25, height * 0.25, height * 0.75, height * 0.75]])
    mask = torch.zeros(1, height, height, dtype=torch.uint8)
    mask[:, height // 4 : 3 * height // 4, height // 4 : 3 * height // 4] = 1
    det_targets = [{"boxes": box, "labels": torch.tensor([1]), "masks": mask}] * det.batch_size
    detector = detector_from_config(det, num_classes=classes, load_init=False)
    det_optimizer = torch.optim.SGD(trainable(detector.parameters()), lr=1e-4)

    def det_step() -> None:
        det_optimizer.zero_grad()
        total_loss(detector_losses(detector, det_images, det_targets)).backward()
        det_optimizer.step()

    def det_predict() -> None:
        with torch.no_grad():
            detector.eval()(det_images)
        detector.train()

    backbone = build_backbone(config.backbone.arch)
    rng = np.random.default_rng(0)
    short = config.mining.short_side
    pictures = [rng.integers(0, 256, (short, short, 3), dtype=np.uint8)] * 16

    def mine() -> None:
        mine_images(backbone, pictures, short_side=short)

    timers: dict[str, tuple[Callable[[], None], int]] = {
        "segmenter_train": (seg_step, seg.batch_size),
        "segmenter_predict": (seg_predict, seg.batch_size),
        "detector_train": (det_step, det.batch_size),
        "detector_predict": (det_predict, det.batch_size),
        "mine": (mine, len(pictures)),
    }
    rates = {"crf": _CRF_RATE}
    for name, (call, images_per_call) in timers.items():
        call()
        start = time.process_time()
        for _ in range(repeats):
            call()
        per_core = repeats * images_per_call / (time.process_time() - start)
        rates[name] = Rate(per_core * cores, source)
    return rates


def override(rates: Mapping[str, Rate], new: Mapping[str, Rate]) -> dict[str, Rate]:
    """`rates` updated with `new`; a name without a precision (`detector_train`) also replaces
    the per-precision ones (`detector_train/bf16`) it would otherwise lose to in `lookup`."""
    kept = {k: v for k, v in rates.items() if k.split("/")[0] not in new}
    return {**kept, **new}


def _pairs(values: list[str], kind: Callable[[str], float | int]) -> dict[str, float | int]:
    pairs = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep:
            raise ValueError(f"{value!r}: expected NAME=NUMBER")
        pairs[name] = kind(number)
    return pairs


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "pascal.yaml")
    parser.add_argument("--demo-config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--defaults", choices=tuple(DEFAULTS), default="stage")
    parser.add_argument("--rates", type=Path, help="rates.json of benchmarks/gpu.sh")
    parser.add_argument("--rate", action="append", default=[], metavar="NAME=IMG_S")
    parser.add_argument("--split-images", action="append", default=[], metavar="SPLIT=N")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cores-per-gpu", type=int, default=16, help="CPU cores for the CRF")
    parser.add_argument("--startup", type=float, default=STARTUP_S, help="seconds per stage")
    parser.add_argument("--cpu-rates", type=Path, help="rates.json for the demo on this CPU")
    parser.add_argument("--cpu-cores", type=int, default=2)
    parser.add_argument("--no-cpu", action="store_true", help="skip the demo on this CPU")
    return parser.parse_args()


def main() -> None:
    args = parse()
    rates = dict(DEFAULTS[args.defaults])
    if args.rates:
        rates = override(rates, read_rates(args.rates))
    given_rates = {k: Rate(float(v), "--rate") for k, v in _pairs(args.rate, float).items()}
    rates = override(rates, given_rates)
    given = {k: int(v) for k, v in _pairs(args.split_images, int).items()}
    config = load_config(str(args.config), [])
    work = recipe_work(config, given)
    for gpus in args.gpus:
        cores = gpus * args.cores_per_gpu
        rows = project(work, rates, gpus=gpus, cores=cores, startup_s=args.startup)
        gpu_word = "GPU" if gpus == 1 else "GPUs"
        title = f"\n{config.name} ({args.config.name}) on {gpus} {gpu_word}, {cores} CPU cores"
        print(table(title, rows))
    if args.no_cpu:
        return
    demo = load_config(str(args.demo_config), [])
    cpu = read_rates(args.cpu_rates) if args.cpu_rates else measure_cpu(demo, cores=args.cpu_cores)
    rows = project(recipe_work(demo), cpu, gpus=1, cores=args.cpu_cores, startup_s=args.startup)
    title = f"\n{demo.name} ({args.demo_config.name}) on this CPU, {args.cpu_cores} cores"
    print(table(title, rows))


if __name__ == "__main__":
    main()
