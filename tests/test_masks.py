import json

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from maskdistill.masks import (
    best_match_iou,
    decode_rle,
    encode_rle,
    mask_to_box,
    pad_to_multiple,
    patch_grid,
    resize_nearest,
)


def test_rle_round_trip_and_json() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = encode_rle(mask)
    assert rle["size"] == [37, 53]
    restored = decode_rle(json.loads(json.dumps(rle)))
    assert restored.dtype == bool
    np.testing.assert_array_equal(restored, mask)


def test_rle_is_coco_compatible() -> None:
    mask = np.zeros((6, 5), dtype=bool)
    mask[1:4, 2:4] = True
    rle = encode_rle(mask)
    assert coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()}) == 6
    assert decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}).sum() == 6


def test_rle_rejects_batches() -> None:
    with pytest.raises(ValueError, match=r"\[H, W\] mask"):
        encode_rle(np.zeros((2, 4, 4), dtype=bool))


def test_mask_to_box_uses_pixel_edges() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    mask[7, 1] = True
    assert mask_to_box(mask) == (1, 2, 9, 8)
    single = np.zeros((4, 4), dtype=bool)
    single[3, 3] = True
    assert mask_to_box(single) == (3, 3, 4, 4)
    with pytest.raises(ValueError, match="empty mask"):
        mask_to_box(np.zeros((4, 4), dtype=bool))


def test_resize_nearest_repeats_patches() -> None:
    grid = np.array([[1, 0], [0, 2]], dtype=np.int64)
    up = resize_nearest(grid, (4, 6))
    expected = np.array([[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 2, 2, 2]] * 2)
    np.testing.assert_array_equal(up, expected)


def test_resize_nearest_torch_matches_numpy_and_keeps_batch_axes() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((3, 7, 9)) > 0.5
    as_numpy = resize_nearest(masks, (20, 11))
    as_torch = resize_nearest(torch.from_numpy(masks), (20, 11))
    assert as_numpy.shape == (3, 20, 11)
    np.testing.assert_array_equal(as_torch.numpy(), as_numpy)


def test_resize_nearest_downscale_then_upscale_is_identity_on_blocks() -> None:
    grid = np.arange(12).reshape(3, 4)
    up = resize_nearest(grid, (48, 64))
    np.testing.assert_array_equal(resize_nearest(up, (3, 4)), grid)


def test_pad_unpad_round_trip() -> None:
    images = torch.rand(2, 3, 30, 45)
    padded = pad_to_multiple(images, 16)
    assert padded.shape == (2, 3, 32, 48)
    assert torch.equal(padded[..., :30, :45], images)  # the image stays top-left
    assert padded[..., 30:, :].abs().sum() == 0 and padded[..., :, 45:].abs().sum() == 0
    aligned = images[..., :16, :32]
    assert pad_to_multiple(aligned, 16) is aligned


def test_patch_grid_covers_image() -> None:
    assert patch_grid((30, 45), 16) == (2, 3)
    assert patch_grid((32, 48), 16) == (2, 3)
    assert patch_grid((33, 48), 16) == (3, 3)


def test_best_match_iou_takes_the_best_object() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True  # 4 pixels
    objects = np.zeros((2, 4, 4), dtype=bool)
    objects[0, :2, :] = True  # 8 pixels, 4 shared: IoU 4/8
    objects[1, :1, :1] = True  # 1 pixel inside: IoU 1/4
    assert best_match_iou(mask, objects) == 0.5
    assert best_match_iou(mask, objects[1:]) == 0.25
    assert best_match_iou(mask, objects[:0]) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        best_match_iou(mask, objects[:, :3])
