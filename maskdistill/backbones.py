"""Self-supervised ViT backbones (timm) exposing the last block's per-head queries and keys.

MaskDistill mines object masks from the affinities of the final attention block (Sec 3.2). A
`ViTBackbone` wraps a timm `VisionTransformer` with one CLS token and no registers; its forward
pass returns that block's q and k for every head together with the model's CLS feature.

Weights come from `build_backbone(arch, weights=...)`:

- ``"random"``: timm's initialisation; nothing is downloaded.
- ``"hub"``: timm ``pretrained=True`` for the hub tag in `arch` (e.g.
  ``vit_small_patch16_224.dino``). This is the only path that touches the network.
- ``"pretrain"`` in a config: the teacher backbone this run's DINO pretraining wrote
  (`maskdistill.pretrain`, ``run_dir/pretrain/backbone.pth``); `outputs.backbone_weights(config)`
  turns it into that file for `build_backbone`.
- a local path or URI (``s3://...``; read through `maskdistill.storage.resolve`): an official
  DINO release ``.pth`` (plain, or a training checkpoint with ``teacher``/``student`` entries),
  a timm state dict (``.pth``/``.pt``/``.bin``) or ``.safetensors``. Loading is strict.
"""

from __future__ import annotations

import argparse
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import timm
import torch
from timm.layers import Attention
from timm.models import is_model_in_modules, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer

from maskdistill.stages import PRETRAINED
from maskdistill.storage import read_bytes, write_bytes
from maskdistill.weights import key_listing, load_strict

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Checkpoint wrappers holding the state dict, in order of preference: DINO's teacher is the
# released backbone; timm training checkpoints use `state_dict` / `model`.
_WRAPPER_KEYS = ("teacher", "state_dict", "model", "student")
# DDP (`module.`), DINO's MultiCropWrapper (`backbone.`) and torch.compile (`_orig_mod.`).
_STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.")
# DINO's projection head and timm's classifier: the backbone is built without a head.
_DROP_PREFIX = "head."
_KEYS_NOTE = f"after stripping {', '.join(_STRIP_PREFIXES)} prefixes and dropping {_DROP_PREFIX}*"
RANDOM_SEED = 0  # weights="random": timm's initialisation under this seed by default


@dataclass(frozen=True)
class LastBlockFeatures:
    """The final block's per-head q, k (token 0 = CLS, then patches row-major) and CLS output."""

    q: torch.Tensor  # [B, heads, 1 + gh * gw, head_dim]
    k: torch.Tensor  # [B, heads, 1 + gh * gw, head_dim]
    cls_token: torch.Tensor  # [B, embed_dim], after the final norm
    grid: tuple[int, int]  # (gh, gw) patches


class ViTBackbone(torch.nn.Module):
    """A timm ViT with one CLS token; `forward` also returns the last block's q and k."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        _check_supported(model)
        self.model = model
        self.patch_size: int = model.patch_embed.patch_size[0]
        self.embed_dim: int = model.embed_dim
        self.num_heads: int = _last_attention(model).num_heads

    def forward(self, images: torch.Tensor) -> LastBlockFeatures:
        """q, k of the final block and the CLS feature for normalised images [B, 3, H, W]."""
        grid = self._grid(images)
        attn = _last_attention(self.model)
        captured: list[torch.Tensor] = []
        # Sec 3.2: q(h), k(h) of the final MSA block, read from its fused qkv projection.
        handle = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            tokens = self.model.forward_features(images)
        finally:
            handle.remove()
        q, k = _split_qk(captured[0], attn)
        return LastBlockFeatures(q=q, k=k, cls_token=tokens[:, 0], grid=grid)

    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final normed CLS output [B, embed_dim] for normalised images [B, 3, H, W]."""
        self._grid(images)
        return self.model.forward_features(images)[:, 0]

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        """The patch grid (gh, gw); raises ValueError for a bad shape or size."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"expected normalised float images [B, 3, H, W], got {images.dtype} "
                f"{tuple(images.shape)} (see to_model_input)"
            )
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} (HxW) is not a multiple of the patch size "
                f"{self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images [B, H, W, 3] -> ImageNet-normalised float [B, 3, H, W]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}"
        )
    return imagenet_normalize(images.permute(0, 3, 1, 2).float().div(255))


def imagenet_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """float RGB [B, 3, H, W] in [0, 1] -> ImageNet-normalised, on the pixels' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def build_backbone(
    arch: str = "vit_small_patch16_224", *, weights: str = "random", seed: int = RANDOM_SEED
) -> ViTBackbone:
    """A frozen, eval-mode backbone; `weights` is "random", "hub" or a checkpoint path/URI.

    "random" is timm's initialisation under `seed`, whatever the global RNG state."""
    if weights == PRETRAINED:
        raise ValueError(
            f"weights={PRETRAINED!r} names a run's own pretrained backbone; pass "
            "outputs.backbone_weights(config), the file the run's pretrain stage writes"
        )
    name, tag = split_model_name_tag(arch)
    if not timm.is_model(name):
        raise ValueError(f"unknown timm architecture {arch!r}")
    if not is_model_in_modules(name, ["vision_transformer"]):
        raise ValueError(f"{arch!r} is not a timm VisionTransformer architecture")
    if weights == "hub" and not tag:
        raise ValueError(
            f"weights='hub' needs a hub tag in arch (e.g. 'vit_small_patch16_224.dino'), "
            f"got {arch!r}"
        )
    state = None if weights in ("random", "hub") else _read_state_dict(weights)
    # "random" is one fixed network: every actor, rerun and resumed shard mines with the same one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(
            arch,
            pretrained=weights == "hub",
            num_classes=0,
            dynamic_img_size=True,  # any multiple of the patch size; pos_embed is interpolated
            use_naflex=False,
        )
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{arch!r} built a {type(model).__name__}, not a VisionTransformer")
    if state is not None:
        load_strict(model, state, source=weights, what=repr(arch), note=_KEYS_NOTE)
    backbone = ViTBackbone(model)
    backbone.requires_grad_(False)
    return backbone.eval()


def _read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with wrappers unwrapped, prefixes stripped and heads dropped."""
    data = _read_bytes(uri)
    if uri.endswith(".safetensors"):
        raw: Any = safetensors.torch.load(data)
    else:
        raw = _torch_load(data, uri)
    return _normalise_keys(_unwrap(raw, uri))


def save_backbone(backbone: ViTBackbone, path: str) -> None:
    """Write the plain timm state dict (safetensors for *.safetensors, else torch.save)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    if path.endswith(".safetensors"):
        data = safetensors.torch.save(tensors)
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        data = buffer.getvalue()
    write_bytes(path, data)


def _check_supported(model: VisionTransformer) -> None:
    """Reject models whose token 0 is not a lone CLS token or whose last block is not MSA."""
    if model.cls_token is None or model.num_prefix_tokens != 1:
        raise ValueError(
            "backbone must have exactly one prefix token, the CLS token (no registers); got "
            f"cls_token={model.cls_token is not None}, num_prefix_tokens={model.num_prefix_tokens}"
        )
    _last_attention(model)
    patch = tuple(model.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"square patches required, got {patch}")


def _last_attention(model: VisionTransformer) -> Attention:
    """The final block's attention; ValueError unless it is timm's fused-qkv `Attention`."""
    attn = model.blocks[-1].attn
    if not isinstance(attn, Attention):
        raise ValueError(
            f"last block's attention is {type(attn).__name__}, "
            "expected timm.layers.Attention with a fused qkv projection"
        )
    return attn


def _split_qk(qkv: torch.Tensor, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q, k [B, heads, N, d] from a qkv projection [B, N, 3 * heads * d], as timm does."""
    batch, tokens, _ = qkv.shape
    parts = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(parts[0]), attn.k_norm(parts[1])


def _read_bytes(uri: str) -> bytes:
    """The file's bytes; FileNotFoundError saying what `weights` may be when it is not a file."""
    try:
        return read_bytes(uri)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"backbone weights {uri!r}: no such file (weights must be 'random', 'hub', or a path "
            "or URI to a DINO .pth, timm state dict or .safetensors file)"
        ) from err


def _torch_load(data: bytes, uri: str) -> Any:
    """Weights-only torch.load; DINO training checkpoints also hold an argparse Namespace."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(f"{uri}: not a readable torch checkpoint: {error}") from error


def _unwrap(raw: Any, uri: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (DINO `teacher`, timm `state_dict`, ...) or itself."""
    if isinstance(raw, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{uri}: not a state dict (got {type(raw).__name__})")
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{uri}: not a state dict; non-tensor entries {key_listing(not_tensors)}")
    return {str(k): v for k, v in raw.items()}


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from every key and drop head weights."""
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith(_STRIP_PREFIXES):
            name = name.split(".", 1)[1]
        if not name.startswith(_DROP_PREFIX):
            out[name] = value
    return out
