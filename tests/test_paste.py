"""paste_masks and paste_image_frame_masks against float64 per-pixel loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from frozenseg.head.paste import (
    image_points_to_roi,
    paste_image_frame_masks,
    paste_masks,
    roi_points_to_image,
)


def _bilinear_zero(grid: np.ndarray, px: float, py: float) -> float:
    """grid (h, w) at cell coordinates (px, py); cells off the grid read zero."""
    h, w = grid.shape
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * grid[yy, xx]
    return total


def _paste_reference(masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel centre (x + .5, y + .5) -> RoI cell (c - x0) / (x1 - x0) * S - .5; 0 off the box."""
    n, s, _ = masks.shape
    out = np.zeros((n, height, width))
    for i in range(n):
        x0, y0, x1, y1 = boxes[i]
        for y in range(height):
            for x in range(width):
                cx, cy = x + 0.5, y + 0.5
                if x0 <= cx <= x1 and y0 <= cy <= y1:
                    px = (cx - x0) / (x1 - x0) * s - 0.5
                    py = (cy - y0) / (y1 - y0) * s - 0.5
                    out[i, y, x] = _bilinear_zero(masks[i], px, py)
    return out


def _random_boxes(n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """xyxy float64 boxes with fractional corners, some reaching past the image."""
    lo = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([width, height]) - 1
    size = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 6 + 1
    return torch.cat([lo, lo + size], dim=1)


def test_paste_matches_float64_loop():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 4, 4, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(5, 7, 9, gen)
    out = paste_masks(masks, boxes, (7, 9))
    ref = _paste_reference(masks.numpy(), boxes.numpy(), 7, 9)
    assert out.dtype == torch.float64 and out.shape == (5, 7, 9)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_constant_mask_pastes_to_the_box_pixels():
    gen = torch.Generator().manual_seed(1)
    boxes = _random_boxes(6, 8, 10, gen)
    out = paste_masks(torch.ones(6, 5, 5, dtype=torch.float64), boxes, (8, 10), threshold=0.5)
    ys, xs = np.meshgrid(np.arange(8) + 0.5, np.arange(10) + 0.5, indexing="ij")
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        expected = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        assert out.dtype == torch.bool
        np.testing.assert_array_equal(out[i].numpy(), expected)


def test_cell_centres_paste_onto_pixel_centres():
    """Box x0 = 3, width 3 * S: RoI cell j's centre is pixel 3 + 3j + 1's centre."""
    s = 4
    masks = torch.rand(1, s, s, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    boxes = torch.tensor([[3.0, 2.0, 3.0 + 3 * s, 2.0 + 3 * s]], dtype=torch.float64)
    out = paste_masks(masks, boxes, (20, 20))
    rows, cols = 2 + 3 * torch.arange(s) + 1, 3 + 3 * torch.arange(s) + 1
    torch.testing.assert_close(out[0][rows[:, None], cols[None, :]], masks[0])
    # and the point mapping agrees: cell centres go to those pixel centres and back
    centres = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    coords = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(1, -1, 2)
    points = roi_points_to_image(coords, boxes)
    expected = torch.stack(torch.meshgrid(cols + 0.5, rows + 0.5, indexing="xy"), -1)
    torch.testing.assert_close(points, expected.reshape(1, -1, 2).double())
    torch.testing.assert_close(image_points_to_roi(points, boxes), coords)


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(3)
    masks = torch.rand(7, 6, 6, generator=gen)
    boxes = _random_boxes(7, 12, 11, gen).float()
    whole = paste_masks(masks, boxes, (12, 11), chunk_size=7)
    for chunk in (1, 3):
        torch.testing.assert_close(paste_masks(masks, boxes, (12, 11), chunk_size=chunk), whole)
    assert torch.equal(paste_masks(masks, boxes, (12, 11), 0.5, chunk_size=2), whole >= 0.5)


def test_paste_empty_and_boxes_off_the_image():
    assert paste_masks(torch.zeros(0, 4, 4), torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)
    off = torch.tensor([[20.0, 20.0, 30.0, 30.0]])
    assert not paste_masks(torch.ones(1, 4, 4), off, (5, 6)).any()


def _upsample_reference(grid: np.ndarray, stride: int, height: int, width: int) -> np.ndarray:
    """Bilinear x stride, align_corners=False (cell coordinate (c + .5) / s - .5, clamped)."""
    h, w = grid.shape
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            px = min(max((x + 0.5) / stride - 0.5, 0.0), w - 1)
            py = min(max((y + 0.5) / stride - 0.5, 0.0), h - 1)
            out[y, x] = _bilinear_zero(grid, px, py)
    return out


def test_image_frame_paste_matches_loop_and_crops():
    gen = torch.Generator().manual_seed(4)
    maps = torch.rand(3, 3, 4, generator=gen, dtype=torch.float64)
    out = paste_image_frame_masks(maps, (10, 13), stride=4)
    assert out.shape == (3, 10, 13)
    for i in range(3):
        np.testing.assert_allclose(out[i].numpy(), _upsample_reference(maps[i].numpy(), 4, 10, 13),
                                   atol=1e-12)
    chunked = paste_image_frame_masks(maps, (10, 13), stride=4, chunk_size=1, threshold=0.5)
    assert torch.equal(chunked, out >= 0.5)


@pytest.mark.parametrize("size", [(5, 7), (20, 30)])
def test_image_frame_paste_output_size(size):
    out = paste_image_frame_masks(torch.full((2, 3, 4), 0.75), (10, 13), output_size=size)
    assert out.shape == (2, *size)
    torch.testing.assert_close(out, torch.full((2, *size), 0.75))
