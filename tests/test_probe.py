"""The linear probe (Sec 4.1 protocol (i), A.2) on a tiny segmenter and a toy data set."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from maskdistill.config import ConfigError, load_config
from maskdistill.evaluation import segmentation_scores
from maskdistill.probe import (
    _random_crop,
    fit_linear_probe,
    probe_confusion,
    probe_features,
    probe_prediction,
)
from maskdistill.segmenter import build_segmenter, normalize

SIZE = 32
COLOURS = np.array([[30, 30, 30], [220, 40, 40], [40, 60, 220]], dtype=np.uint8)
Samples = list[tuple[np.ndarray, np.ndarray]]


def _one_colour_images(count: int, seed: int, size: int = SIZE) -> Samples:
    """Image k is the colour of class k % 3, with noise: the class is linearly decodable."""
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(count):
        label = np.full((size, size), k % 3, dtype=np.int64)
        noisy = COLOURS[label].astype(np.int16) + rng.integers(-10, 11, (size, size, 3))
        samples.append((np.clip(noisy, 0, 255).astype(np.uint8), label))
    return samples


def _calibrated_segmenter(samples: Samples) -> nn.Module:
    """A random tiny segmenter whose BatchNorm statistics fit `samples`, as a trained one's do.

    Untouched, the random head's features are ~0.02 and A.2's learning rate barely moves the
    probe; with fitted statistics they are O(1), like a trained segmenter's.
    """
    torch.manual_seed(0)
    model = build_segmenter(num_classes=3, init="none", backbone="resnet18")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.stack([normalize(image) for image, _ in samples]))
    return model.eval()


@pytest.fixture(scope="module")
def train() -> Samples:
    return _one_colour_images(6, seed=0)


@pytest.fixture(scope="module")
def model(train: Samples) -> nn.Module:
    return _calibrated_segmenter(train)


@pytest.fixture(scope="module")
def fitted(
    model: nn.Module, train: Samples
) -> tuple[nn.Conv2d, dict, list[tuple[int, float, float]]]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    epochs: list[tuple[int, float, float]] = []
    probe = fit_linear_probe(
        model,
        train,
        num_classes=3,
        epochs=6,
        batch_size=3,
        milestones=(4,),
        progress=lambda *values: epochs.append(values),
    )
    return probe, before, epochs


def test_features_are_the_input_of_the_final_conv(model: nn.Module, train: Samples) -> None:
    images = torch.stack([normalize(image) for image, _ in train[:2]])
    features = probe_features(model, images)
    assert features.shape == (2, 256, SIZE // 8, SIZE // 8)
    assert not features.requires_grad
    with torch.no_grad():
        expected = model(images)["out"]
        logits = nn.functional.interpolate(
            model.classifier[-1](features), size=(SIZE, SIZE), mode="bilinear"
        )
    torch.testing.assert_close(logits, expected)


def test_prediction_with_the_final_conv_as_probe_is_the_segmenters(
    model: nn.Module, train: Samples
) -> None:
    image = train[1][0][:, :24]  # a size that is not a multiple of the output stride
    final = model.classifier[-1]
    predicted = probe_prediction(model, final, image, (SIZE, 24))
    with torch.no_grad():
        expected = model(normalize(image)[None])["out"].argmax(dim=1)[0].numpy()
    assert predicted.dtype == np.int64 and predicted.shape == (SIZE, 24)
    np.testing.assert_array_equal(predicted, expected)
    # Any size: the logits are upsampled to it, not to the image's.
    assert probe_prediction(model, final, image, (7, 5)).shape == (7, 5)


def test_confusion_counts_each_images_prediction(
    model: nn.Module, fitted: tuple[nn.Conv2d, dict, list[tuple[int, float, float]]]
) -> None:
    probe, _, _ = fitted
    samples = _one_colour_images(3, seed=2)
    predictions = [probe_prediction(model, probe, image, (SIZE, SIZE)) for image, _ in samples]
    expected = np.zeros((3, 3), dtype=np.int64)
    for predicted, (_, label) in zip(predictions, samples, strict=True):
        np.add.at(expected, (predicted.ravel(), label.ravel()), 1)
    np.testing.assert_array_equal(probe_confusion(model, probe, samples, num_classes=3), expected)


def test_probe_learns_a_linearly_decodable_class(
    model: nn.Module, fitted: tuple[nn.Conv2d, dict, list[tuple[int, float, float]]]
) -> None:
    probe, _, epochs = fitted
    assert isinstance(probe, nn.Conv2d)
    assert (probe.in_channels, probe.out_channels, probe.kernel_size) == (256, 3, (1, 1))
    validation = _one_colour_images(6, seed=1)
    validation[0][1][:4] = 255  # ignored pixels are not counted
    confusion = probe_confusion(model, probe, validation, num_classes=3)
    assert confusion.shape == (3, 3) and confusion.dtype == np.int64
    assert confusion.sum() == 6 * SIZE * SIZE - 4 * SIZE
    scores = segmentation_scores(confusion, matching="identity")
    assert scores["miou"] > 0.95
    # A.2's schedule: one report per epoch, lr divided by 10 after the milestone.
    assert [e[0] for e in epochs] == list(range(6))
    assert [e[2] for e in epochs] == pytest.approx([0.1] * 4 + [0.01] * 2)
    assert epochs[-1][1] < epochs[0][1] / 2


def test_probing_leaves_the_segmenter_unchanged(
    model: nn.Module, fitted: tuple[nn.Conv2d, dict, list[tuple[int, float, float]]]
) -> None:
    _, before, _ = fitted
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name  # running statistics included
    assert all(p.grad is None for p in model.parameters())


def test_a_stream_of_samples_trains_the_same_probe_and_is_read_once(
    model: nn.Module,
    train: Samples,
    fitted: tuple[nn.Conv2d, dict, list[tuple[int, float, float]]],
) -> None:
    # Without crops the pairs are consumed once, in batches, into the feature cache: a
    # generator gives the probe the fixture fitted from the list (same epochs, batches, seed).
    reads: list[int] = []

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index, pair in enumerate(train):
            reads.append(index)
            yield pair

    probe = fit_linear_probe(
        model, stream(), num_classes=3, epochs=6, batch_size=3, milestones=(4,)
    )
    assert reads == list(range(len(train)))
    torch.testing.assert_close(probe.weight, fitted[0].weight)
    torch.testing.assert_close(probe.bias, fitted[0].bias)


def test_random_crops_train_too(model: nn.Module, train: Samples) -> None:
    probe = fit_linear_probe(
        model, train, num_classes=3, epochs=4, batch_size=6, milestones=(3,), crop_size=24
    )
    # Evaluated at the crop size: the random network's features depend on the image size.
    crops = _one_colour_images(6, seed=1, size=24)
    confusion = probe_confusion(model, probe, crops, num_classes=3)
    assert segmentation_scores(confusion, matching="identity")["miou"] > 0.95


def test_random_crop_pads_with_mean_colour_and_ignore() -> None:
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 1
    label = torch.arange(12).reshape(3, 4)
    rng = np.random.default_rng(0)
    for _ in range(10):
        cropped, labels = _random_crop(image, label, 5, 255, rng)
        assert cropped.shape == (2, 5, 5) and labels.shape == (5, 5)
        inside = labels != 255
        assert int(inside.sum()) == 12  # the whole image, padded to 5 x 5
        assert torch.all(cropped[:, ~inside] == 0)
        # Image and labels move together: label = pixel index, channel 0 value = index + 1.
        torch.testing.assert_close(cropped[0][inside], labels[inside].float() + 1)


def test_bad_inputs_name_the_problem(model: nn.Module, train: Samples) -> None:
    image, label = train[0]
    fit = dict(num_classes=3, epochs=1)
    with pytest.raises(ValueError, match="sample 1: image must be uint8"):
        fit_linear_probe(model, [train[0], (image.astype(np.float32), label)], **fit)
    with pytest.raises(ValueError, match=r"sample 0: labels must be integers \[32, 32\]"):
        fit_linear_probe(model, [(image, label[:-1])], **fit)
    bad = label.copy()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match="sample 0: label 3 is neither a class in 0..2"):
        fit_linear_probe(model, [(image, bad)], **fit)
    with pytest.raises(ValueError, match="no samples"):
        fit_linear_probe(model, [], **fit)
    with pytest.raises(ValueError, match="milestones"):
        fit_linear_probe(model, train, num_classes=3, milestones=(30, 25))
    with pytest.raises(TypeError, match="not a DeepLab-v3 segmenter"):
        fit_linear_probe(nn.Conv2d(3, 3, 1), train, **fit)
    with pytest.raises(ValueError, match="probe has 4 outputs, num_classes=3"):
        probe_confusion(model, nn.Conv2d(256, 4, 1), train[:1], num_classes=3)


def test_config_defaults_are_the_papers_and_the_functions() -> None:
    evaluation = load_config(None).evaluation
    defaults = inspect.signature(fit_linear_probe).parameters
    # A.2: 45 epochs, batch 24, lr 0.1 divided by 10 after epoch 25.
    assert (evaluation.probe_epochs, evaluation.probe_batch_size) == (45, 24)
    assert (evaluation.probe_lr, evaluation.probe_milestones) == (0.1, [25])
    assert defaults["epochs"].default == evaluation.probe_epochs
    assert defaults["batch_size"].default == evaluation.probe_batch_size
    assert defaults["lr"].default == evaluation.probe_lr
    assert list(defaults["milestones"].default) == evaluation.probe_milestones
    with pytest.raises(ConfigError, match=r"probe_milestones=\[30, 25\] must be strictly"):
        load_config(None, ["evaluation.probe_milestones=[30,25]"])
    with pytest.raises(ConfigError, match="probe_max_images"):
        load_config(None, ["evaluation.probe_max_images=0"])
