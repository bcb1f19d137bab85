"""Golden tests of maskdistill.weights: strict loading, the key listing, MoCo, frozen BatchNorm."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskdistill.weights import (
    MOCO_PREFIX,
    freeze_batchnorm,
    key_listing,
    load_moco,
    load_strict,
    moco_state_dict,
)


def _toy(seed: int) -> nn.Sequential:
    """Linear(3, 4) + BatchNorm1d(4) with seeded weights and non-default running statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 2.0)
    return model


def _failure(state: dict[str, torch.Tensor], note: str = "a note") -> str:
    with pytest.raises(ValueError) as error:
        load_strict(_toy(1), state, source="toy.pth", what="the toy", note=note)
    return str(error.value)


def test_matching_state_loads_every_tensor() -> None:
    source, target = _toy(0), _toy(1)
    load_strict(target, source.state_dict(), source="toy.pth", what="the toy")
    loaded, expected = target.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_missing_key_report_golden() -> None:
    state = _toy(0).state_dict()
    del state["0.bias"]
    assert _failure(state) == (
        "toy.pth: weights do not match the toy (a note)\n"
        "  missing keys: 1: 0.bias\n"
        "  unexpected keys: 0\n"
        "  shape mismatches: 0"
    )


def test_unexpected_keys_are_named_and_counted() -> None:
    state = {**_toy(0).state_dict(), "2.weight": torch.zeros(2), "2.bias": torch.zeros(2)}
    message = _failure(state, note="")
    assert message.splitlines()[0] == "toy.pth: weights do not match the toy"
    assert "  missing keys: 0\n" in message
    assert "  unexpected keys: 2: 2.weight, 2.bias\n" in message


def test_mis_shaped_key_is_a_mismatch_not_a_missing_key() -> None:
    state = {**_toy(0).state_dict(), "0.weight": torch.zeros(5, 3)}
    message = _failure(state)
    assert "  missing keys: 0\n" in message
    assert "  unexpected keys: 0\n" in message
    assert message.endswith("  shape mismatches: 1: 0.weight: file (5, 3) vs model (4, 3)")


def test_report_truncates_each_listing_after_ten_names() -> None:
    extra = {f"extra{i}": torch.zeros(1) for i in range(13)}
    message = _failure({**_toy(0).state_dict(), **extra})
    shown = ", ".join(f"extra{i}" for i in range(10))
    assert f"  unexpected keys: 13: {shown}, ... (3 more)\n" in message


def test_key_listing_golden() -> None:
    assert key_listing([]) == "0"
    assert key_listing(["a", "b"]) == "2: a, b"
    ten = [str(i) for i in range(10)]
    assert key_listing(ten) == "10: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    assert key_listing([*ten, "10", "11"]) == "12: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (2 more)"


def test_frozen_batchnorm_takes_a_checkpoint_with_batch_counters() -> None:
    """A FrozenBatchNorm2d drops `num_batches_tracked` (as in MoCo files): not unexpected."""
    batchnorm = nn.BatchNorm2d(2)
    frozen = nn.Sequential(FrozenBatchNorm2d(2))
    load_strict(
        frozen, {f"0.{k}": v for k, v in batchnorm.state_dict().items()}, source="s", what="w"
    )
    assert torch.equal(frozen.state_dict()["0.running_var"], batchnorm.state_dict()["running_var"])


def _bn_net() -> nn.Sequential:
    """conv, BN (frozen), [BN (frozen), ReLU], BN (trainable), BN without affine parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, eps=1e-3),
        nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()),
        nn.BatchNorm2d(4),
        nn.BatchNorm2d(4, affine=False),
    )
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith(("weight", "bias", "running_mean", "running_var")):
                tensor.uniform_(0.5, 2.0)
    net[1].requires_grad_(False)
    net[2].requires_grad_(False)
    return net


def test_freeze_batchnorm_replaces_exactly_the_frozen_ones_keeping_their_state() -> None:
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainable, without_affine = net.get_submodule("3"), net.get_submodule("4")
    freeze_batchnorm(net)
    stem, inner = net.get_submodule("1"), net.get_submodule("2.0")
    assert isinstance(stem, FrozenBatchNorm2d) and isinstance(inner, FrozenBatchNorm2d)
    assert stem.eps == 1e-3 and inner.eps == 1e-5
    assert net.get_submodule("3") is trainable and net.get_submodule("4") is without_affine
    assert isinstance(net.get_submodule("2.1"), nn.ReLU)
    after = net.state_dict()
    # FrozenBatchNorm2d has no batch counter; every other tensor is kept as it was
    assert after.keys() == before.keys() - {"1.num_batches_tracked", "2.0.num_batches_tracked"}
    for key, value in after.items():
        assert torch.equal(value, before[key]), key


def test_frozen_batchnorm_statistics_stay_fixed_in_training() -> None:
    net = _bn_net()
    freeze_batchnorm(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net(torch.randn(2, 3, 5, 5))
    after = net.state_dict()
    for key in ("1.running_mean", "1.running_var", "2.0.running_mean", "2.0.running_var"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["3.running_mean"], before["3.running_mean"])


def _save(obj: object, path: Path) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())
    return str(path)


def test_moco_state_dict_keeps_the_query_encoder_without_prefix_or_fc(tmp_path: Path) -> None:
    conv, bn = torch.randn(2, 3, 1, 1), torch.randn(2)
    state = {
        f"{MOCO_PREFIX}conv1.weight": conv,
        f"{MOCO_PREFIX}bn1.weight": bn,
        f"{MOCO_PREFIX}fc.0.weight": torch.randn(4, 2),
        f"{MOCO_PREFIX}fc.2.bias": torch.randn(4),
        "module.encoder_k.conv1.weight": torch.randn(2, 3, 1, 1),
        "module.queue": torch.randn(4, 8),
    }
    loaded = moco_state_dict(_save({"epoch": 1, "state_dict": state}, tmp_path / "moco.pth.tar"))
    assert loaded.keys() == {"conv1.weight", "bn1.weight"}
    assert torch.equal(loaded["conv1.weight"], conv) and torch.equal(loaded["bn1.weight"], bn)


def test_moco_state_dict_rejects_other_files(tmp_path: Path) -> None:
    plain = _save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="plain.pth: not a MoCo checkpoint"):
        moco_state_dict(plain)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth: not a readable torch checkpoint"):
        moco_state_dict(str(garbage))


def test_load_moco_loads_the_body_and_reports_against_the_converted_keys(tmp_path: Path) -> None:
    source = _toy(0)
    state = {MOCO_PREFIX + k: v for k, v in source.state_dict().items()}
    body = _toy(1)
    load_moco(body, _save({"state_dict": state}, tmp_path / "moco.pth.tar"))
    for key, value in source.state_dict().items():
        assert torch.equal(body.state_dict()[key], value), key
    del state[f"{MOCO_PREFIX}1.running_var"]
    broken = _save({"state_dict": state}, tmp_path / "broken.pth.tar")
    with pytest.raises(ValueError) as error:
        load_moco(_toy(1), broken)
    assert str(error.value).startswith(
        f"{broken}: weights do not match the ResNet body (after keeping {MOCO_PREFIX}* without "
        "the prefix and dropping fc.*)\n  missing keys: 1: 1.running_var\n"
    )
