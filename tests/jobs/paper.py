"""configs/pascal.yaml and configs/coco20k.yaml made tiny, for their end-to-end tests: the test
ViT, the small models from scratch (not the configs' MoCo files), fp32, one worker per training
stage, CPU only."""

from tests.jobs.test_train_detector import DETECTOR
from tests.jobs.test_train_segmenter import SEGMENTER

TINY_PAPER = (
    "backbone.arch=test_vit",
    "backbone.weights=random",
    "mining.short_side=48",
    "mining.precision=fp32",
    "mining.resources={batch_size: 4, num_cpus: 1, num_gpus: 0}",
    "clustering.view_size=32",
    "clustering.n_init=2",
    *DETECTOR,
    *SEGMENTER,
    "detector.init_path=null",
    "segmenter.init_path=null",
    "detector.precision=fp32",
    "segmenter.precision=fp32",
    "segmenter.epochs=1",
    "detector.resources.num_workers=1",
    "segmenter.resources.num_workers=1",
    "pseudo_labels.resources.num_cpus=1",
    "evaluation.resources={num_gpus: 0, num_cpus: 1, batch_size: 4}",
    "evaluation.num_overlays=1",
)
