"""Sec 3.2: one object mask per image from the final self-attention block of a ViT.

`object_masks` is the paper's math on q and k; `mine_images` is the image-level step around it:
resize the shorter side, pad to the patch grid, mine, unpad, upsample to the original size, and
(optionally) each object's CLS feature, all batched on the device with one copy back per batch.
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
from maskdistill.clustering import ObjectFeatures, object_features
from maskdistill.masks import nearest_index, pad_to_multiple


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
    feature: np.ndarray | None = None  # float32 [D'], the object's CLS feature when asked for


def mined_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The size an image is mined at: shorter side `short_side`, aspect ratio kept (Sec 4.1)."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _normalised(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [H, W, 3] -> ImageNet-normalised float [1, 3, H, W] on `device`, without a sync."""
    # Ray Data hands out read-only arrays, which torch.from_numpy warns about: copy those
    pixels = torch.from_numpy(np.require(image, requirements=["C", "W"]))
    return to_model_input(pixels.to(device, non_blocking=True)[None])


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
    features: ObjectFeatures | None = None,
) -> list[MinedMask]:
    """Mine one mask per uint8 [H, W, 3] image; with `features`, each object's CLS feature too.

    Images of one mined size share a forward pass. Masks at the original sizes, their boxes and
    seed boxes, and the object features (`clustering.object_features`) are computed batched on
    `device`; everything comes back in ONE device->host copy per call (`_copy_to_host`), so
    nothing in here waits on the device per image (`features.crop == "native"` reads the boxes
    back once before that: its views differ in size). The masks are column-major bool views of
    that copy, ready for COCO RLE.
    """
    device = torch.device(device)
    if not images:
        return []
    originals = [(int(image.shape[0]), int(image.shape[1])) for image in images]
    sizes = [mined_size(height, width, short_side) for height, width in originals]
    pixels = [_normalised(image, device) for image in images]
    extent = (max(h for h, _ in originals), max(w for _, w in originals))
    order: list[int] = []
    grids: list[tuple[int, int]] = []
    parts = []
    for size in dict.fromkeys(sizes):
        members = [i for i, s in enumerate(sizes) if s == size]
        batch = torch.cat([_resize(pixels[i], size) for i in members])
        padded = pad_to_multiple(batch, backbone.patch_size)  # 0 = the mean colour once normalised
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = backbone(padded)
        grid_masks, seeds = masks_and_seeds(
            out.q, out.k, out.grid, top_k=top_k, cls_heads=cls_heads, seed_component=seed_component
        )
        scores = attention_share(out.q, out.k, grid_masks, cls_heads)
        masks_t, seed_boxes = original_masks(
            grid_masks, seeds, [originals[i] for i in members], size, backbone.patch_size, extent
        )
        order += members
        grids += [out.grid] * len(members)
        parts.append((masks_t, seed_boxes, seeds[:, None], scores[:, None], out.cls_token))
    masks_t, seed_boxes, seeds, scores, cls_tokens = (
        torch.cat(p) for p in zip(*parts, strict=True)
    )
    boxes = mask_boxes(masks_t)
    numbers = [boxes, seed_boxes, seeds, scores, cls_tokens]  # pixel indices < 2^24: exact as f32
    if features is not None:
        numbers.append(
            object_features(
                features,
                _stack_padded([pixels[i] for i in order], extent),
                masks_t.transpose(1, 2),
                boxes,
                torch.tensor([originals[i] for i in order]).to(device, non_blocking=True),
                bf16=bf16,
            )
        )
    values, masks = _copy_to_host(torch.cat([n.float() for n in numbers], 1), masks_t)
    dim = cls_tokens.shape[1]
    results: list[MinedMask | None] = [None] * len(images)
    for row, index in enumerate(order):
        height, width = originals[index]
        box, seed_box, seed = values[row, :4], values[row, 4:8], int(values[row, 8])
        results[index] = MinedMask(
            height=height,
            width=width,
            mask=masks[row, :width, :height].T,  # column-major, as COCO RLE reads it
            box=_ints(box),
            score=float(values[row, 9]),
            seed_patch=divmod(seed, grids[row][1]),
            seed_box=_ints(seed_box),
            grid=grids[row],
            cls_token=values[row, 10 : 10 + dim],
            feature=values[row, 10 + dim :] if features is not None else None,
        )
    return [r for r in results if r is not None]


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[1, 3, H, W] at `size` (bilinear, antialiased): the image as the ViT mines it."""
    if pixels.shape[-2:] == size:
        return pixels
    return F.interpolate(pixels, size=size, mode="bilinear", antialias=True)


def _stack_padded(pixels: list[torch.Tensor], extent: tuple[int, int]) -> torch.Tensor:
    """[1, 3, h, w] images -> one [B, 3, H, W] batch, zero (the mean colour) beyond each."""
    batch = pixels[0].new_zeros((len(pixels), 3, *extent))
    for row, image in enumerate(pixels):
        batch[row, :, : image.shape[-2], : image.shape[-1]] = image[0]
    return batch


def _ints(values: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in values)
    return x0, y0, x1, y1


def _copy_to_host(values: torch.Tensor, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float32 [B, K] and bool [B, W, H] -> numpy, in one device->host copy (one byte buffer)."""
    values, masks = values.contiguous(), masks.contiguous()
    packed = torch.cat([values.view(torch.uint8).flatten(), masks.view(torch.uint8).flatten()])
    host = packed.cpu().numpy()
    split = values.numel() * values.element_size()
    numbers = host[:split].view(np.float32).reshape(values.shape)
    return numbers, host[split:].view(bool).reshape(masks.shape)


def original_masks(
    grid_masks: torch.Tensor,
    seeds: torch.Tensor,
    originals: Sequence[tuple[int, int]],
    mined: tuple[int, int],
    patch_size: int,
    extent: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch masks [B, gh, gw] of images mined at `mined` -> masks at their `originals` sizes.

    Sec 3.2: "upsampled to the original image size using nearest neighbor interpolation".
    Original pixel y takes mined pixel `nearest_index(mined, original)[y]` of the unpadded
    input, whose patch row is that // patch_size, so the upsampling is two index gathers on the
    device. Returns bool [B, W, H] (transposed: column-major per image, as COCO RLE reads
    masks), zero beyond each image's size within `extent` = (H, W), and the seed patch's box on
    each original image, long [B, 4] (x0, y0, x1, y1; `patch_box`). A mask that no original
    pixel sees (an image far smaller than its mined size) gets its seed box's top-left pixel.
    """
    batch, gh, gw = grid_masks.shape
    height, width = extent
    rows = np.full((batch, height), -1, dtype=np.int64)  # -1: beyond the image
    cols = np.full((batch, width), -1, dtype=np.int64)
    spans = np.zeros((batch, gh + gw, 2), dtype=np.int64)
    for b, (h, w) in enumerate(originals):
        rows[b, :h] = nearest_index(mined[0], h) // patch_size
        cols[b, :w] = nearest_index(mined[1], w) // patch_size
        spans[b] = np.concatenate(
            [patch_spans(patch_size, mined[0], h), patch_spans(patch_size, mined[1], w)]
        )
    device = grid_masks.device
    rows_t, cols_t, spans_t = (
        torch.from_numpy(a).to(device, non_blocking=True) for a in (rows, cols, spans)
    )
    by_col = grid_masks.transpose(1, 2).gather(
        1, cols_t.clamp(min=0)[:, :, None].expand(-1, -1, gh)
    )
    masks = by_col.gather(2, rows_t.clamp(min=0)[:, None, :].expand(-1, width, -1))
    masks &= (cols_t >= 0)[:, :, None] & (rows_t >= 0)[:, None, :]
    index = torch.arange(batch, device=device)
    y_span, x_span = spans_t[index, seeds // gw], spans_t[index, gh + seeds % gw]
    seed_boxes = torch.stack([x_span[:, 0], y_span[:, 0], x_span[:, 1], y_span[:, 1]], 1)
    empty = ~masks.flatten(1).any(1)
    masks[index, x_span[:, 0], y_span[:, 0]] |= empty
    return masks, seed_boxes


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) in pixel edges, long [B, 4], of non-empty bool masks [B, W, H]."""
    xs, ys = masks.any(2), masks.any(1)
    x0, y0 = xs.byte().argmax(1), ys.byte().argmax(1)  # argmax: the first maximal index
    x1 = xs.shape[1] - xs.flip(1).byte().argmax(1)
    y1 = ys.shape[1] - ys.flip(1).byte().argmax(1)
    return torch.stack([x0, y0, x1, y1], 1)


def attention_share(
    q: torch.Tensor, k: torch.Tensor, masks: torch.Tensor, cls_heads: Sequence[int] | None
) -> torch.Tensor:
    """[B] share of the CLS token's softmax attention over patches that falls inside the mask."""
    heads = list(range(q.shape[1])) if cls_heads is None else list(cls_heads)
    logits = q[:, heads, :1].float() @ k[:, heads, 1:].float().transpose(-1, -2)
    attention = (logits * q.shape[-1] ** -0.5).softmax(-1).mean(1).squeeze(1)  # [B, N]
    return (attention * masks.flatten(1)).sum(1).clamp(0.0, 1.0)  # float sums can pass 1


def patch_box(
    patch: tuple[int, int], patch_size: int, original: tuple[int, int], mined: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) of the original pixels that nearest upsampling takes from a patch."""
    y0, y1 = patch_spans(patch_size, mined[0], original[0])[patch[0]]
    x0, x1 = patch_spans(patch_size, mined[1], original[1])[patch[1]]
    return int(x0), int(y0), int(x1), int(y1)


def patch_spans(patch_size: int, mined: int, original: int) -> np.ndarray:
    """int64 [patches, 2] along one axis: the original pixels [start, stop) whose nearest mined
    pixel lies in each patch of the padded grid; a patch that falls between pixels gets the
    pixel nearest to its centre."""
    source_patch = nearest_index(mined, original) // patch_size  # non-decreasing
    patches = np.arange(-(-mined // patch_size))
    start = np.searchsorted(source_patch, patches, side="left")
    stop = np.searchsorted(source_patch, patches, side="right")
    centre = np.minimum(
        ((patches + 0.5) * patch_size * original / mined).astype(np.int64), original - 1
    )
    missing = start == stop
    return np.stack([np.where(missing, centre, start), np.where(missing, centre + 1, stop)], 1)
