"""ViT backbones: last-block q/k, any image size, weight formats and strict loading."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from maskdistill.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LastBlockFeatures,
    ViTBackbone,
    build_backbone,
    save_backbone,
    to_model_input,
)

# timm's tiny test ViT: patch 16, embed 64, 2 heads, 6 blocks, pos_embed for a 14x14 grid.
ARCH = "test_vit"
PATCH, DIM, HEADS = 16, 64, 2


def _images(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _vit(arch: str = ARCH, **kwargs: Any) -> VisionTransformer:
    model = timm.create_model(arch, **kwargs)
    assert isinstance(model, VisionTransformer)
    return model


def _last_block(backbone: ViTBackbone) -> tuple[Block, Attention]:
    block = backbone.model.blocks[-1]
    assert isinstance(block, Block)
    assert isinstance(block.attn, Attention)
    return block, block.attn


def _outputs(backbone: ViTBackbone, images: torch.Tensor) -> LastBlockFeatures:
    with torch.no_grad():
        return backbone(images)


def _assert_same(a: LastBlockFeatures, b: LastBlockFeatures) -> None:
    assert torch.equal(a.q, b.q)
    assert torch.equal(a.k, b.k)
    assert torch.equal(a.cls_token, b.cls_token)


@pytest.fixture(scope="module")
def backbone() -> ViTBackbone:
    torch.manual_seed(0)
    model = build_backbone(ARCH)
    # Peaked attention, so that swapping q and k changes the attention output noticeably.
    torch.nn.init.normal_(_last_block(model)[1].qkv.weight, std=0.5)
    return model


def test_attributes_and_frozen_eval_mode(backbone: ViTBackbone) -> None:
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_heads) == (PATCH, DIM, HEADS)
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_shapes_for_non_square_input(backbone: ViTBackbone) -> None:
    out = _outputs(backbone, _images(48, 80))
    head_dim = DIM // HEADS
    assert out.grid == (3, 5)
    assert out.q.shape == (2, HEADS, 1 + 15, head_dim)
    assert out.k.shape == (2, HEADS, 1 + 15, head_dim)
    assert out.cls_token.shape == (2, DIM)
    assert out.q.shape[1] * out.q.shape[3] == backbone.embed_dim


def test_q_k_are_those_of_the_last_block(backbone: ViTBackbone) -> None:
    images = _images(48, 80)
    block, attention = _last_block(backbone)
    seen: dict[str, torch.Tensor] = {}
    pre = block.register_forward_pre_hook(lambda _m, args: seen.update(block_in=args[0]))
    post = attention.register_forward_hook(lambda _m, _i, out: seen.update(attn_out=out))
    try:
        out = _outputs(backbone, images)
    finally:
        pre.remove()
        post.remove()

    # Independent derivation: slice the fused projection into its q, k, v thirds.
    with torch.no_grad():
        x = block.norm1(seen["block_in"])
        weight, bias = attention.qkv.weight, attention.qkv.bias
        q, k, v = (
            torch.nn.functional.linear(
                x, weight[i * DIM : (i + 1) * DIM], bias[i * DIM : (i + 1) * DIM]
            )
            .unflatten(-1, (HEADS, DIM // HEADS))
            .transpose(1, 2)
            for i in range(3)
        )
        torch.testing.assert_close(out.q, q)
        torch.testing.assert_close(out.k, k)

        # softmax(q k^T / sqrt(d)) v through the output projection is the block's attention output.
        attn = torch.softmax(out.q @ out.k.transpose(-2, -1) * attention.scale, dim=-1)
        mixed = attention.proj((attn @ v).transpose(1, 2).flatten(2))
        torch.testing.assert_close(mixed, seen["attn_out"], atol=1e-5, rtol=1e-4)
        swapped = torch.softmax(out.k @ out.q.transpose(-2, -1) * attention.scale, dim=-1)
        assert not torch.allclose(attention.proj((swapped @ v).transpose(1, 2).flatten(2)), mixed)

        features = backbone.model.forward_features(images)
    torch.testing.assert_close(out.cls_token, features[:, 0])


def test_cls_features_match_forward(backbone: ViTBackbone) -> None:
    images = _images(32, 64)
    with torch.no_grad():
        assert torch.equal(backbone.cls_features(images), backbone(images).cls_token)


def test_any_multiple_of_the_patch_size(backbone: ViTBackbone) -> None:
    for (height, width), grid in {(32, 32): (2, 2), (64, 96): (4, 6)}.items():
        out = _outputs(backbone, _images(height, width, batch=1))
        assert out.grid == grid
        assert out.q.shape[2] == 1 + grid[0] * grid[1]
        assert torch.isfinite(out.cls_token).all()


def test_size_not_multiple_of_patch_raises(backbone: ViTBackbone) -> None:
    with pytest.raises(ValueError, match="50x64"):
        backbone(_images(50, 64))
    with pytest.raises(ValueError, match="51x48"):
        backbone.cls_features(_images(51, 48))


def test_rejects_uint8_images(backbone: ViTBackbone) -> None:
    with pytest.raises(ValueError, match="to_model_input"):
        backbone(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_autocast_returns_autocast_dtype(backbone: ViTBackbone) -> None:
    images = _images(32, 48)
    reference = _outputs(backbone, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _outputs(backbone, images)
    assert out.q.dtype == out.k.dtype == torch.bfloat16
    torch.testing.assert_close(out.k.float(), reference.k, atol=0.1, rtol=0.05)


def test_to_model_input() -> None:
    images = torch.zeros(2, 4, 6, 3, dtype=torch.uint8)
    images[1] = 255
    x = to_model_input(images)
    assert x.shape == (2, 3, 4, 6)
    assert x.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(x[0, c], torch.full((4, 6), -IMAGENET_MEAN[c] / IMAGENET_STD[c]))
        expected = (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(x[1, c], torch.full((4, 6), expected))
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(images.float())


@pytest.mark.parametrize("name", ["vit.pth", "vit.safetensors"])
def test_save_load_round_trip(backbone: ViTBackbone, tmp_path: Path, name: str) -> None:
    path = str(tmp_path / "sub" / name)
    save_backbone(backbone, path)
    loaded = build_backbone(ARCH, weights=path)
    images = _images(48, 32)
    _assert_same(_outputs(loaded, images), _outputs(backbone, images))
    assert not torch.equal(_outputs(build_backbone(ARCH), images).q, _outputs(loaded, images).q)


def test_load_through_file_uri(backbone: ViTBackbone, tmp_path: Path) -> None:
    uri = (tmp_path / "vit.safetensors").as_uri()
    save_backbone(backbone, uri)
    images = _images(32, 32)
    _assert_same(_outputs(build_backbone(ARCH, weights=uri), images), _outputs(backbone, images))


def test_dino_release_plain(tmp_path: Path) -> None:
    source = build_backbone(ARCH)
    state = dict(source.model.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= state.keys()
    assert "blocks.0.attn.qkv.weight" in state
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, path)
    images = _images(32, 48)
    _assert_same(
        _outputs(build_backbone(ARCH, weights=str(path)), images), _outputs(source, images)
    )


def test_dino_training_checkpoint_takes_teacher(tmp_path: Path) -> None:
    teacher, student = build_backbone(ARCH), build_backbone(ARCH)
    for parameter in student.parameters():  # "random" is one fixed network: make them differ
        parameter.data.add_(0.1 * torch.randn_like(parameter))

    def wrapped(model: ViTBackbone, prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}backbone.{k}": v for k, v in model.model.state_dict().items()}
        state[f"{prefix}head.mlp.0.weight"] = torch.randn(32, DIM)
        state[f"{prefix}head.last_layer.weight_g"] = torch.randn(128, 1)
        return state

    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": wrapped(student, "module."),
            "teacher": wrapped(teacher, "module."),
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
        },
        path,
    )
    images = _images(32, 32)
    loaded = _outputs(build_backbone(ARCH, weights=str(path)), images)
    _assert_same(loaded, _outputs(teacher, images))
    assert not torch.equal(loaded.q, _outputs(student, images).q)


def test_timm_state_dict_with_classifier_head(tmp_path: Path) -> None:
    model = _vit(num_classes=10)
    path = tmp_path / "timm.bin"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = build_backbone(ARCH, weights=str(path))
    images = _images(32, 32)
    with torch.no_grad():
        expected = model.forward_features(images)[:, 0]
    torch.testing.assert_close(loaded.cls_features(images), expected)


def test_missing_and_unexpected_keys_raise(backbone: ViTBackbone, tmp_path: Path) -> None:
    state = dict(backbone.model.state_dict())
    del state["blocks.3.norm2.weight"]
    state["blocks.3.extra_gate"] = torch.zeros(3)
    path = tmp_path / "broken_keys.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        build_backbone(ARCH, weights=str(path))
    message = str(error.value)
    assert "broken_keys.pth" in message
    assert "missing keys: 1: blocks.3.norm2.weight" in message
    assert "unexpected keys: 1: blocks.3.extra_gate" in message


def test_shape_mismatch_raises(tmp_path: Path) -> None:
    wider = _vit(num_classes=0, embed_dim=96, num_heads=3)
    path = tmp_path / "wider.safetensors"
    save_backbone(ViTBackbone(wider), str(path))
    with pytest.raises(ValueError) as error:
        build_backbone(ARCH, weights=str(path))
    message = str(error.value)
    assert "wider.safetensors" in message
    assert "cls_token: file (1, 1, 96) vs model (1, 1, 64)" in message
    assert "missing keys: 0" in message
    assert "more)" in message  # every tensor mismatches; the listing is truncated


def test_unknown_weights_value_raises(tmp_path: Path) -> None:
    missing = str(tmp_path / "pretrained")
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build_backbone(ARCH, weights=missing)
    with pytest.raises(FileNotFoundError, match="'imagenet'"):
        build_backbone(ARCH, weights="imagenet")


def test_hub_needs_a_tag_and_unknown_arch_raises() -> None:
    with pytest.raises(ValueError, match="hub tag"):
        build_backbone("vit_small_patch16_224", weights="hub")
    with pytest.raises(ValueError, match="unknown timm architecture"):
        build_backbone("vit_nonexistent_patch16")
    with pytest.raises(ValueError, match="VisionTransformer"):
        build_backbone("resnet18")


def test_rejects_registers_and_missing_cls_token() -> None:
    with pytest.raises(ValueError, match="num_prefix_tokens=5"):
        ViTBackbone(_vit(num_classes=0, reg_tokens=4))
    with pytest.raises(ValueError, match="cls_token=False"):
        ViTBackbone(_vit("test_vit2", num_classes=0))


def test_random_weights_are_one_fixed_network_whatever_the_global_seed() -> None:
    torch.manual_seed(1)
    first = build_backbone("test_vit", weights="random").state_dict()
    torch.manual_seed(2)
    second = build_backbone("test_vit", weights="random").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    after = torch.rand(1)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(1))  # the caller's random stream is left alone


def test_random_weights_follow_the_seed_given() -> None:
    first = build_backbone("test_vit", seed=1).state_dict()
    second = build_backbone("test_vit", seed=2).state_dict()
    assert not all(torch.equal(first[k], second[k]) for k in first)
