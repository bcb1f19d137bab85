from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from maskdistill.backbones import build_backbone, to_model_input
from maskdistill.clustering import ObjectFeatures
from maskdistill.masks import (
    encode_rle,
    mask_to_box,
    nearest_index,
    pad_to_multiple,
    resize_nearest,
)
from maskdistill.mining import (
    attention_share,
    component_of,
    mask_boxes,
    masks_and_seeds,
    mine_images,
    mined_size,
    object_masks,
    original_masks,
)

FEATURE_ATOL = 1e-4  # the stated tolerance of batched object features (clustering.object_views)


def _qk(*patch_keys: list[float], cls_query: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, one head: q has the CLS query at token 0, k the patch keys at tokens 1..N."""
    dim = len(cls_query)
    k = torch.tensor([[0.0] * dim, *patch_keys])[None, None]
    q = torch.zeros_like(k)
    q[0, 0, 0] = torch.tensor(cls_query)
    return q, k


def test_golden_mask_on_hand_built_keys() -> None:
    # 2x3 grid. a_CLS = k . (1, 0) = first coordinate: 0.9, 0.8, -0.5, 0.7, 0.1, -0.9.
    q, k = _qk(
        [0.9, 0.1], [0.8, 0.3], [-0.5, 1.0], [0.7, -0.2], [0.1, -1.0], [-0.9, 0.2], cls_query=[1, 0]
    )
    # top_k 0.5 -> P = {0, 1, 3}, seed 0; A[0, j] > 0 for all of P, so P' = P.
    # sum_{i in P'} k_i = (2.4, 0.2); its dot with each k_j: 2.18, 1.98, -1.0, 1.64, 0.04, -2.12.
    mask = object_masks(q, k, (2, 3), top_k=0.5, seed_component=False)
    assert mask.tolist() == [[[True, True, False], [True, True, False]]]


def test_proposals_dissimilar_to_the_seed_are_dropped() -> None:
    # a_CLS = 1, 0.9, 0.63, -1: P = {0, 1}, seed 0; A[0, 1] = -0.2 < 0, so P' = {0} and the
    # mask is {j : k_0 . k_j > 0}.
    q, k = _qk([1.0, 0.0], [-0.2, 1.0], [0.3, 0.3], [-1.0, 0.0], cls_query=[1, 1.1])
    mask = object_masks(q, k, (2, 2), top_k=0.5, seed_component=False)
    assert mask.tolist() == [[[True, False], [True, False]]]
    # With patch 1 kept in P' the sum (0.8, 1.0) would also reach patch 1.


def test_top_k_keeps_at_least_one_proposal() -> None:
    q, k = _qk([1.0, 0.0], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.2], cls_query=[1, 0])
    mask = object_masks(q, k, (1, 4), top_k=0.01, seed_component=False)
    assert mask.tolist() == [[[True, False, True, False]]]  # P' = {seed 0}: k_0 . k_j > 0


def test_cls_heads_choose_the_seed() -> None:
    # Two heads with the same keys: head 0's CLS query picks seed 0, head 1's seed 2.
    k = torch.zeros(1, 2, 5, 2)
    k[0, :, 1:] = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    q = torch.zeros_like(k)
    q[0, 0, 0] = torch.tensor([1.0, 0.0])
    q[0, 1, 0] = torch.tensor([0.0, 1.0])
    first = object_masks(q, k, (2, 2), top_k=0.25, cls_heads=[0], seed_component=False)
    second = object_masks(q, k, (2, 2), top_k=0.25, cls_heads=[1], seed_component=False)
    assert first.tolist() == [[[True, True], [False, True]]]  # k_0 . k_j > 0
    assert second.tolist() == [[[False, True], [True, True]]]  # k_2 . k_j > 0
    with pytest.raises(ValueError, match="cls_heads"):
        object_masks(q, k, (2, 2), cls_heads=[2])


def _reference(q: np.ndarray, k: np.ndarray, grid: tuple[int, int], top_k: float) -> np.ndarray:
    """The paper's text literally: Eq 1, Eq 2 as full matrices, P, s, P', M (Sec 3.2)."""
    heads = q.shape[0]
    a_cls = sum(q[h, 0] @ k[h, 1:].T for h in range(heads)) / heads
    a_patches = sum(k[h, 1:] @ k[h, 1:].T for h in range(heads)) / heads
    count = max(1, int(np.floor(top_k * a_cls.size)))
    proposals = np.argsort(-a_cls, kind="stable")[:count]
    seed = int(np.argmax(a_cls))
    kept = [j for j in proposals if a_patches[seed, j] > 0]
    mask = np.array([a_patches[kept, j].sum() > 0 for j in range(a_cls.size)])
    return mask.reshape(grid)


@pytest.mark.parametrize("top_k", [0.1, 0.4, 0.9])
def test_matches_the_literal_paper_math(top_k: float) -> None:
    generator = torch.Generator().manual_seed(int(top_k * 10))
    grid = (5, 7)
    q = torch.randn(6, 3, 1 + 35, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(6, 3, 1 + 35, 8, generator=generator, dtype=torch.float64) + 0.3
    fast = object_masks(q, k, grid, top_k=top_k, seed_component=False)
    for b in range(6):
        np.testing.assert_array_equal(
            fast[b].numpy(), _reference(q[b].numpy(), k[b].numpy(), grid, top_k)
        )


@pytest.mark.parametrize("seed_component", [True, False])
def test_seed_is_always_in_the_mask(seed_component: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(32, 2, 1 + 48, 4, generator=generator)
    k = torch.randn(32, 2, 1 + 48, 4, generator=generator)
    masks = object_masks(q, k, (6, 8), seed_component=seed_component)
    a_cls = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)).squeeze(2).mean(1)
    seeds = a_cls.argmax(1)
    assert masks.flatten(1)[torch.arange(32), seeds].all()


def test_seed_component_keeps_only_the_seeds_blob() -> None:
    masks = torch.tensor(
        [[[1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1], [1, 0, 1, 1]]], dtype=torch.bool
    ).repeat(2, 1, 1)
    seeds = torch.tensor([0, 3])  # (0, 0) and (0, 3)
    kept = component_of(masks, seeds)
    assert kept[0].tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert kept[1].tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1]]


def test_seed_component_matches_scipy_labelling() -> None:
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(16, 2, 1 + 80, 4, generator=generator)
    k = torch.randn(16, 2, 1 + 80, 4, generator=generator)
    loose = object_masks(q, k, (8, 10), seed_component=False)
    tight = object_masks(q, k, (8, 10), seed_component=True)
    seeds = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)).squeeze(2).mean(1).argmax(1)
    for b in range(16):
        labels, _ = ndimage.label(loose[b].numpy())  # default structure: 4-connectivity
        expected = labels == labels.flat[int(seeds[b])]
        np.testing.assert_array_equal(tight[b].numpy(), expected)


def test_batched_equals_per_image_loop() -> None:
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(5, 4, 1 + 24, 8, generator=generator)
    k = torch.randn(5, 4, 1 + 24, 8, generator=generator)
    batched = object_masks(q, k, (4, 6))
    for b in range(5):
        assert torch.equal(batched[b : b + 1], object_masks(q[b : b + 1], k[b : b + 1], (4, 6)))


def test_bfloat16_inputs_are_accepted() -> None:
    generator = torch.Generator().manual_seed(9)
    q = torch.randn(2, 2, 1 + 12, 16, generator=generator)
    k = torch.randn(2, 2, 1 + 12, 16, generator=generator) + 1.0
    masks = object_masks(q.bfloat16(), k.bfloat16(), (3, 4))
    assert masks.dtype == torch.bool and masks.shape == (2, 3, 4)


def test_shape_errors_name_the_shapes() -> None:
    q = torch.zeros(1, 2, 13, 4)
    with pytest.raises(ValueError, match="13 tokens do not match 1 \\+ 3x5"):
        object_masks(q, q, (3, 5))
    with pytest.raises(ValueError, match="must both be"):
        object_masks(q, q[:, :1], (3, 4))


def test_attention_share_is_a_fraction() -> None:
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 1 + 12, 4, generator=generator)
    k = torch.randn(3, 2, 1 + 12, 4, generator=generator)
    full = attention_share(q, k, torch.ones(3, 3, 4, dtype=torch.bool), None)
    none = attention_share(q, k, torch.zeros(3, 3, 4, dtype=torch.bool), None)
    torch.testing.assert_close(full, torch.ones(3))
    torch.testing.assert_close(none, torch.zeros(3))


@dataclass
class _Features:
    q: torch.Tensor
    k: torch.Tensor
    cls_token: torch.Tensor
    grid: tuple[int, int]


class _StripeBackbone:
    """A stand-in ViT: patches whose mean red is high get keys along +x, the rest along -x."""

    patch_size = 8

    def __call__(self, images: torch.Tensor) -> _Features:
        batch, _, height, width = images.shape
        grid = (height // 8, width // 8)
        red = images[:, 0].unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)
        keys = torch.stack([torch.where(red > 0, 1.0, -1.0), torch.zeros_like(red)], -1)
        k = torch.cat([torch.zeros(batch, 1, 2), keys], 1)[:, None]
        q = torch.zeros_like(k)
        q[:, 0, 0, 0] = 1.0
        return _Features(q, k, images.mean((2, 3)), grid)


def _red_block_image(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1, 0] = 255
    return image


def test_mined_size_keeps_the_aspect_ratio() -> None:
    assert mined_size(375, 500, 640) == (640, 853)
    assert mined_size(500, 375, 640) == (853, 640)
    assert mined_size(100, 100, 64) == (64, 64)


def test_padding_does_not_shift_the_mask_on_the_original_image() -> None:
    # 40x60 image mined at 40x60: padded to 40x64, grid 5x8. The red block covers patch-aligned
    # pixels [8, 32) x [16, 48) = patches rows 1-3, cols 2-5; the mask must land exactly there.
    image = _red_block_image(40, 60, (16, 8, 48, 32))
    (mined,) = mine_images(_StripeBackbone(), [image], short_side=40, top_k=0.2)
    assert mined.grid == (5, 8)
    expected = np.zeros((40, 60), dtype=bool)
    expected[8:32, 16:48] = True
    np.testing.assert_array_equal(mined.mask, expected)
    assert mined.box == (16, 8, 48, 32)
    row, col = mined.seed_patch
    assert 1 <= row <= 3 and 2 <= col <= 5
    assert mined.seed_box == (8 * col, 8 * row, 8 * col + 8, 8 * row + 8)
    assert mined.mask[mined.seed_box[1], mined.seed_box[0]]


def test_mask_is_upsampled_to_the_original_size() -> None:
    # 30x45 mined at short side 16 -> 16x24 (grid 2x3); the red left third is one patch column.
    image = _red_block_image(30, 45, (0, 0, 15, 30))
    (mined,) = mine_images(_StripeBackbone(), [image], short_side=16, top_k=0.3)
    assert mined.mask.shape == (30, 45)
    assert mined.mask[:, :15].all() and not mined.mask[:, 15:].any()
    assert (mined.height, mined.width) == (30, 45)
    x0, y0, x1, y1 = mined.seed_box  # a patch is 15 x 15 pixels of the original here
    assert x0 == 0 and x1 == 15 and y1 - y0 == 15


def test_mixed_sizes_give_the_same_masks_as_one_by_one() -> None:
    images = [
        _red_block_image(40, 60, (16, 8, 48, 32)),
        _red_block_image(48, 48, (0, 0, 24, 24)),
        _red_block_image(40, 60, (0, 16, 24, 40)),
    ]
    together = mine_images(_StripeBackbone(), images, short_side=40, top_k=0.2)
    for image, mined in zip(images, together, strict=True):
        (alone,) = mine_images(_StripeBackbone(), [image], short_side=40, top_k=0.2)
        np.testing.assert_array_equal(mined.mask, alone.mask)
        assert mined.score == pytest.approx(alone.score)


@pytest.mark.parametrize(
    ("height", "width", "short_side"), [(37, 53, 40), (90, 61, 24), (16, 16, 64)]
)
def test_seed_box_lies_inside_the_mask_at_any_scale(
    height: int, width: int, short_side: int
) -> None:
    rng = np.random.default_rng(height)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    (mined,) = mine_images(_StripeBackbone(), [image], short_side=short_side, top_k=0.3)
    x0, y0, x1, y1 = mined.seed_box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert mined.mask[y0:y1, x0:x1].all()


def test_attention_share_never_exceeds_one_by_rounding() -> None:
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(64, 6, 1 + 400, 64, generator=generator)
    k = torch.randn(64, 6, 1 + 400, 64, generator=generator)
    share = attention_share(q, k, torch.ones(64, 20, 20, dtype=torch.bool), None)
    assert (share <= 1.0).all() and (share >= 0.0).all()


# The batched device path against the per-image one it replaced


def _reference_span(index: int, patch_size: int, mined: int, original: int) -> tuple[int, int]:
    """The per-image seed-box rule, written plainly: original pixels whose nearest mined pixel
    lies in patch `index`, else the pixel nearest the patch's centre."""
    hits = np.flatnonzero(nearest_index(mined, original) // patch_size == index)
    if hits.size == 0:
        centre = min(int((index + 0.5) * patch_size * original / mined), original - 1)
        return centre, centre + 1
    return int(hits[0]), int(hits[-1]) + 1


def _reference_original(
    grid_mask: np.ndarray, seed: int, original: tuple[int, int], mined: tuple[int, int], ps: int
) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """One image the old way: patch mask -> pixels of the padded input -> unpadded mined size
    -> original size (nearest), the seed pixel if nothing is left; its box and seed box."""
    pixels = np.kron(grid_mask, np.ones((ps, ps), dtype=bool))[: mined[0], : mined[1]]
    mask = resize_nearest(pixels, original)
    row, col = divmod(seed, grid_mask.shape[1])
    y0, y1 = _reference_span(row, ps, mined[0], original[0])
    x0, x1 = _reference_span(col, ps, mined[1], original[1])
    if not mask.any():
        mask[y0, x0] = True
    return mask, mask_to_box(mask), (x0, y0, x1, y1)


@pytest.mark.parametrize("mined", [(32, 48), (40, 40), (64, 96)])
def test_original_masks_equal_the_per_image_upsampling(mined: tuple[int, int]) -> None:
    # Originals of several sizes (smaller, larger, a far smaller one) mined at one size, with
    # padding to the batch's largest: masks, boxes and seed boxes must be exactly the old ones.
    originals = [(30, 45), (50, 70), (33, 50), (3, 5), (64, 96)]
    patch_size = 8
    grid = (-(-mined[0] // patch_size), -(-mined[1] // patch_size))
    generator = torch.Generator().manual_seed(sum(mined))
    grid_masks = torch.rand(len(originals), *grid, generator=generator) > 0.7
    seeds = torch.randint(0, grid[0] * grid[1], (len(originals),), generator=generator)
    grid_masks.view(len(originals), -1)[torch.arange(len(originals)), seeds] = True
    extent = (70, 100)
    masks, seed_boxes = original_masks(grid_masks, seeds, originals, mined, patch_size, extent)
    boxes = mask_boxes(masks)
    assert masks.shape == (len(originals), 100, 70)  # transposed: [B, W, H]
    for b, (h, w) in enumerate(originals):
        mask, box, seed_box = _reference_original(
            grid_masks[b].numpy(), int(seeds[b]), (h, w), mined, patch_size
        )
        np.testing.assert_array_equal(masks[b, :w, :h].T.numpy(), mask)
        assert not masks[b, w:].any() and not masks[b, :, h:].any()  # padding stays empty
        assert tuple(boxes[b].tolist()) == box
        assert tuple(seed_boxes[b].tolist()) == seed_box


def test_a_mask_no_original_pixel_sees_falls_back_to_the_seed_pixel() -> None:
    # A 2x2 image mined at 32x32 (grid 4x4, 8 px patches): original pixel y takes mined pixel
    # floor((y + 0.5) * 16) = 8, 24, i.e. patch rows/cols 1 and 3. A mask of patch (0, 0) alone
    # is seen by no pixel; its seed box: patch 0 has no pixel, the one nearest its centre is
    # floor(0.5 * 8 * 2 / 32) = 0, so (0, 0, 1, 1), and the mask becomes that pixel.
    grid_masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    grid_masks[0, 0, 0] = True
    masks, seed_boxes = original_masks(grid_masks, torch.tensor([0]), [(2, 2)], (32, 32), 8, (2, 2))
    assert masks[0].T.tolist() == [[True, False], [False, False]]
    assert seed_boxes[0].tolist() == [0, 0, 1, 1]
    assert mask_boxes(masks)[0].tolist() == [0, 0, 1, 1]


def _reference_view(image: np.ndarray, mask: np.ndarray, box: tuple[int, ...], size: int):
    """The old per-object CPU view: the box crop, normalised, resized (bilinear, antialias)."""
    x0, y0, x1, y1 = box
    crop = to_model_input(torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1]))[None])
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]


def test_mine_images_equals_the_per_image_path_on_mixed_sizes() -> None:
    # One batch: two mined sizes (32x48 from 40x60 and 48x72, padded to 32x48; 46x32 from
    # 53x37) and a small 20x20 image upscaled to 32x32, so the original-size masks are padded
    # to 53x72. Masks (and their RLE), boxes, seed boxes must equal the per-image path exactly;
    # features (crop views, batched on the device) within the stated tolerance.
    backbone = build_backbone("test_vit")
    rng = np.random.default_rng(0)
    shapes = [(40, 60), (53, 37), (48, 72), (20, 20)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    features = ObjectFeatures(backbone=backbone, mode="crop", size=32)
    mined = mine_images(backbone, images, short_side=32, top_k=0.4, features=features)
    sizes = [mined_size(h, w, 32) for h, w in shapes]
    assert sizes == [(32, 48), (46, 32), (32, 48), (32, 32)]
    with torch.no_grad():
        for size in dict.fromkeys(sizes):  # the same forward passes, then per image the old way
            members = [i for i, s in enumerate(sizes) if s == size]
            batch = torch.cat(
                [
                    F.interpolate(
                        to_model_input(torch.from_numpy(images[i])[None]),
                        size=size,
                        mode="bilinear",
                        antialias=True,
                    )
                    for i in members
                ]
            )
            out = backbone(pad_to_multiple(batch, 16))
            grid_masks, seeds = masks_and_seeds(
                out.q, out.k, out.grid, top_k=0.4, cls_heads=None, seed_component=True
            )
            scores = attention_share(out.q, out.k, grid_masks, None)
            for row, i in enumerate(members):
                mask, box, seed_box = _reference_original(
                    grid_masks[row].numpy(), int(seeds[row]), shapes[i], size, 16
                )
                np.testing.assert_array_equal(mined[i].mask, mask)
                assert encode_rle(mined[i].mask) == encode_rle(mask)
                assert (mined[i].box, mined[i].seed_box) == (box, seed_box)
                assert mined[i].seed_patch == divmod(int(seeds[row]), out.grid[1])
                assert mined[i].score == pytest.approx(float(scores[row]), abs=1e-6)
                np.testing.assert_allclose(mined[i].cls_token, out.cls_token[row], atol=1e-6)
                expected = backbone.cls_features(_reference_view(images[i], mask, box, 32)[None])
                feature = mined[i].feature
                assert feature is not None
                assert np.abs(feature - expected[0].numpy()).max() <= FEATURE_ATOL
