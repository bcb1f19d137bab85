"""Sec 3.2: one object mask per image from the final self-attention block of a ViT.

`object_masks` is the paper's math on q and k; `mine_images` is the image-level step around it:
resize the shorter side, pad to the patch grid, mine, unpad, upsample to the original size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from maskdistill.backbones import to_model_input
from maskdistill.masks import mask_to_box, nearest_index, pad_to_multiple, resize_nearest, unpad


def object_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int],
    *,
    top_k: float = 0.4,
    cls_heads: Sequence[int] | None = None,
    seed_component: bool = True,
) -> torch.Tensor:
    """Bool [B, gh, gw] object masks from per-head q, k [B, heads, 1 + N, d] (token 0 = CLS)."""
    masks, _ = masks_and_seeds(
        q, k, grid, top_k=top_k, cls_heads=cls_heads, seed_component=seed_component
    )
    return masks


def masks_and_seeds(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int],
    *,
    top_k: float,
    cls_heads: Sequence[int] | None,
    seed_component: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`object_masks` and the flat index of each image's seed patch [B].

    A_I (Eq 2) is never formed: sum_{i in P'} A_I[i, j] = (sum_{i in P'} k_i) . k_j over the
    concatenated heads (the 1/|H| factor does not change a sign), so this is O(N) per image.
    """
    a_cls = cls_affinity(q, k, grid, cls_heads)
    keys = _patch_keys(k)  # [B, N, heads * d]
    seeds, proposals = seed_patch_and_proposals(a_cls, top_k)
    seed_keys = keys.gather(1, seeds[:, None, None].expand(-1, 1, keys.shape[-1]))
    similar_to_seed = (keys @ seed_keys.transpose(1, 2)).squeeze(-1) > 0  # A_I[s, j] > 0
    kept = (proposals & similar_to_seed).to(keys.dtype)  # P'
    summed = keys @ (kept[:, None, :] @ keys).transpose(1, 2)  # sum_{i in P'} A_I[i, j]
    masks = (summed.squeeze(-1) > 0).view(-1, *grid)
    if seed_component:
        masks = component_of(masks, seeds)
    return masks, seeds


def cls_affinity(
    q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], cls_heads: Sequence[int] | None
) -> torch.Tensor:
    """Eq 1: a_CLS [B, N], the mean over heads of q_CLS(h) . k_I(h)^T, in float32."""
    if q.shape != k.shape or q.ndim != 4:
        raise ValueError(f"q and k must both be [B, heads, 1 + N, d]; got {q.shape}, {k.shape}")
    if q.shape[2] != 1 + grid[0] * grid[1]:
        raise ValueError(f"{q.shape[2]} tokens do not match 1 + {grid[0]}x{grid[1]} patches")
    heads = list(range(q.shape[1])) if cls_heads is None else list(cls_heads)
    if not heads or not all(0 <= h < q.shape[1] for h in heads):
        raise ValueError(f"cls_heads={cls_heads} must be indices in 0..{q.shape[1] - 1}")
    q_cls = q[:, heads, :1].float()  # [B, h, 1, d]
    k_patches = k[:, heads, 1:].float()  # [B, h, N, d]
    return (q_cls @ k_patches.transpose(-1, -2)).squeeze(2).mean(1)


def _patch_keys(k: torch.Tensor) -> torch.Tensor:
    """k_I of every head side by side, [B, N, heads * d], so A_I = keys keys^T / |H| (Eq 2)."""
    batch, heads, tokens, dim = k.shape
    return k[:, :, 1:].float().permute(0, 2, 1, 3).reshape(batch, tokens - 1, heads * dim)


def seed_patch_and_proposals(
    a_cls: torch.Tensor, top_k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec 3.2: the seed s = argmax a_CLS [B], and the top-k proposals P as a bool [B, N]."""
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k={top_k} must be in (0, 1]")
    count = max(1, math.floor(top_k * a_cls.shape[1]))
    order = a_cls.topk(count, dim=1).indices
    proposals = torch.zeros_like(a_cls, dtype=torch.bool).scatter_(1, order, True)
    return order[:, 0], proposals


def component_of(masks: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of each [gh, gw] mask that holds its seed (flat index)."""
    batch, height, width = masks.shape
    grown = torch.zeros_like(masks).view(batch, -1)
    grown[torch.arange(batch, device=masks.device), seeds] = True
    grown = grown.view(batch, 1, height, width) & masks[:, None]
    inside = masks[:, None].to(torch.float32)
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=masks.device)
    for _ in range(height * width):
        spread = F.conv2d(grown.to(torch.float32), cross.view(1, 1, 3, 3), padding=1) * inside > 0
        if torch.equal(spread, grown):
            break
        grown = spread
    return grown[:, 0]


class QKBackbone(Protocol):
    """What mining needs from a ViT: its patch size and the last block's q, k and CLS output."""

    patch_size: int

    def __call__(self, images: torch.Tensor) -> LastBlock: ...


class LastBlock(Protocol):
    q: torch.Tensor
    k: torch.Tensor
    cls_token: torch.Tensor
    grid: tuple[int, int]


@dataclass
class MinedMask:
    """One image's object mask at its original size, with what the later stages need."""

    height: int
    width: int
    mask: np.ndarray  # bool [H, W]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, pixel edges
    score: float  # share of the CLS attention inside the mask
    seed_patch: tuple[int, int]  # (row, col) on the patch grid
    seed_box: tuple[int, int, int, int]  # that patch on the original image, x0, y0, x1, y1
    grid: tuple[int, int]
    cls_token: np.ndarray  # float32 [D], the image's CLS output


def mined_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The size an image is mined at: shorter side `short_side`, aspect ratio kept (Sec 4.1)."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resized_input(image: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float [3, h, w] at `size` (antialiased), on `device`."""
    # Ray Data hands out read-only arrays, which torch.from_numpy warns about: copy those
    pixels = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device)[None]
    normalised = to_model_input(pixels)
    if normalised.shape[-2:] != size:
        normalised = F.interpolate(normalised, size=size, mode="bilinear", antialias=True)
    return normalised[0]


@torch.no_grad()
def mine_images(
    backbone: QKBackbone,
    images: Sequence[np.ndarray],
    *,
    short_side: int = 640,
    top_k: float = 0.4,
    cls_heads: Sequence[int] | None = None,
    seed_component: bool = True,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> list[MinedMask]:
    """Mine one mask per uint8 [H, W, 3] image; images of one mined size share a forward pass."""
    device = torch.device(device)
    sizes = [mined_size(im.shape[0], im.shape[1], short_side) for im in images]
    results: list[MinedMask | None] = [None] * len(images)
    for size in dict.fromkeys(sizes):
        members = [i for i, s in enumerate(sizes) if s == size]
        batch = torch.stack([resized_input(images[i], size, device) for i in members])
        padded = pad_to_multiple(batch, backbone.patch_size)  # 0 = the mean colour once normalised
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = backbone(padded)
        grid_masks, seeds = masks_and_seeds(
            out.q, out.k, out.grid, top_k=top_k, cls_heads=cls_heads, seed_component=seed_component
        )
        scores = attention_share(out.q, out.k, grid_masks, cls_heads)
        for row, index in enumerate(members):
            results[index] = _to_original(
                grid_masks[row],
                images[index].shape[:2],
                size,
                backbone.patch_size,
                score=float(scores[row]),
                seed=int(seeds[row]),
                cls_token=out.cls_token[row].float().cpu().numpy(),
            )
    return [r for r in results if r is not None]


def attention_share(
    q: torch.Tensor, k: torch.Tensor, masks: torch.Tensor, cls_heads: Sequence[int] | None
) -> torch.Tensor:
    """[B] share of the CLS token's softmax attention over patches that falls inside the mask."""
    heads = list(range(q.shape[1])) if cls_heads is None else list(cls_heads)
    logits = q[:, heads, :1].float() @ k[:, heads, 1:].float().transpose(-1, -2)
    attention = (logits * q.shape[-1] ** -0.5).softmax(-1).mean(1).squeeze(1)  # [B, N]
    return (attention * masks.flatten(1)).sum(1).clamp(0.0, 1.0)  # float sums can pass 1


def _to_original(
    grid_mask: torch.Tensor,
    original: tuple[int, int],
    mined: tuple[int, int],
    patch_size: int,
    *,
    score: float,
    seed: int,
    cls_token: np.ndarray,
) -> MinedMask:
    """Patch mask -> pixels of the padded input -> unpadded mined size -> original size."""
    grid = (int(grid_mask.shape[0]), int(grid_mask.shape[1]))
    seed_patch = divmod(seed, grid[1])
    pixels = grid_mask.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    mask = resize_nearest(unpad(pixels, mined), original).cpu().numpy()
    seed_box = patch_box(seed_patch, patch_size, original, mined)
    if not mask.any():  # a patch can fall between pixels when the image is far smaller
        mask[seed_box[1], seed_box[0]] = True
    return MinedMask(
        height=original[0],
        width=original[1],
        mask=mask,
        box=mask_to_box(mask),
        score=score,
        seed_patch=seed_patch,
        seed_box=seed_box,
        grid=grid,
        cls_token=cls_token,
    )


def patch_box(
    patch: tuple[int, int], patch_size: int, original: tuple[int, int], mined: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) of the original pixels that `resize_nearest` takes from a patch."""
    y0, y1 = _patch_span(patch[0], patch_size, mined[0], original[0])
    x0, x1 = _patch_span(patch[1], patch_size, mined[1], original[1])
    return x0, y0, x1, y1


def _patch_span(index: int, patch_size: int, mined: int, original: int) -> tuple[int, int]:
    """Original pixels along one axis whose nearest mined pixel lies in patch `index`."""
    source_patch = nearest_index(mined, original) // patch_size
    hits = np.flatnonzero(source_patch == index)
    if hits.size == 0:  # the patch falls between pixels: take the pixel nearest to its centre
        centre = min(int((index + 0.5) * patch_size * original / mined), original - 1)
        return centre, centre + 1
    return int(hits[0]), int(hits[-1]) + 1
