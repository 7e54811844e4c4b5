"""Pasting head masks back into the image, and the RoI <-> image point mapping.

Conventions (continuous pixel coordinates): pixel (row y, column x) of an image covers
[x, x + 1) x [y, y + 1), so its centre is (x + 0.5, y + 0.5). Boxes are xyxy in absolute
pixels of the image the masks are pasted into.

RoI frame (RoIAlign, aligned=True): an S x S RoI mask spans its box exactly; normalised
RoI coordinate u in [0, 1] maps to image x = x0 + u * (x1 - x0) (y likewise), so RoI
cell (i, j) has its centre at u = (j + 0.5) / S, i.e. x = x0 + (j + 0.5) * (x1 - x0) / S.
Pasting inverts this: an image pixel centre c maps to RoI cell coordinate
p = (c - x0) / (x1 - x0) * S - 0.5 and reads the RoI mask there by bilinear
interpolation, neighbour cells outside the S x S grid reading zero (grid_sample's
align_corners=False with zero padding, as detectron2's ``paste_masks_in_image``).
Pixels whose centre lies outside the closed box are exactly zero.

Image frame (the head without RoIAlign): a stride-s map of the padded batch, cell j
covering image pixels [s * j, s * (j + 1)), is upsampled x s (bilinear,
align_corners=False) and cropped to the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Elements of one pasted chunk (masks x rows x columns); bounds paste memory.
_CHUNK_ELEMENTS = 1 << 23


def roi_points_to_image(coords: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Normalised RoI coordinates -> image pixels.

    coords: (N, P, 2) (x, y) in [0, 1] over each box; boxes: (N, 4) xyxy pixels.
    Returns (N, P, 2) (x, y) continuous pixel coordinates.
    """
    lo, size = boxes[:, None, :2], (boxes[:, None, 2:] - boxes[:, None, :2])
    return lo + coords * size


def image_points_to_roi(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Image pixels -> normalised RoI coordinates, the inverse of :func:`roi_points_to_image`.

    points: (N, P, 2) (x, y) pixels; boxes: (N, 4) xyxy pixels. Returns (N, P, 2).
    """
    return _roi_fraction(points, boxes[:, None, :2], boxes[:, None, 2:])


def _roi_fraction(coord: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # A degenerate box would divide by zero; any tiny extent keeps the result finite.
    return (coord - lo) / (hi - lo).clamp(min=1e-6)


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: Sequence[int],
                threshold: float | None = None, *, chunk_size: int | None = None
                ) -> torch.Tensor:
    """Paste RoI-frame masks into full images (see the module docstring for the mapping).

    mask_probs: (N, S, S) float probabilities in the RoI frame; boxes: (N, 4) xyxy
    absolute pixels of the target image; image_size: (H, W) of that image (scale the
    boxes first to paste at another resolution). Returns (N, H, W): probabilities of
    mask_probs' dtype, or bool ``>= threshold`` when threshold is given.
    chunk_size: masks pasted at once (default: about 8M output elements per chunk).
    """
    height, width = int(image_size[0]), int(image_size[1])
    n = mask_probs.shape[0]
    dtype = torch.bool if threshold is not None else mask_probs.dtype
    out = torch.zeros(n, height, width, dtype=dtype, device=mask_probs.device)
    if n == 0 or height == 0 or width == 0:
        return out
    step = chunk_size or max(1, _CHUNK_ELEMENTS // (height * width))
    for start in range(0, n, step):
        part = slice(start, start + step)
        _paste_chunk(out[part], mask_probs[part], boxes[part].to(mask_probs.dtype), threshold)
    return out


def _paste_chunk(out: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
                 threshold: float | None) -> None:
    """Fill ``out`` (n, H, W) with the chunk's pasted masks, only over the boxes' span.

    Bilinear interpolation is separable, so a pasted mask is Wy @ M @ Wx^T with 1-D
    interpolation matrices Wy (H, S) and Wx (W, S): no (H, W, 2) sampling grid.
    """
    rows = _pixel_span(boxes[:, 1], boxes[:, 3], out.shape[-2])
    cols = _pixel_span(boxes[:, 0], boxes[:, 2], out.shape[-1])
    if rows[0] >= rows[1] or cols[0] >= cols[1]:
        return
    size = masks.shape[-1]
    wy = _axis_weights(boxes[:, 1], boxes[:, 3], rows, size)
    wx = _axis_weights(boxes[:, 0], boxes[:, 2], cols, size)
    pasted = wy @ masks @ wx.transpose(1, 2)
    if threshold is not None:
        pasted = pasted >= threshold
    out[:, rows[0]:rows[1], cols[0]:cols[1]] = pasted


def _pixel_span(lo: torch.Tensor, hi: torch.Tensor, size: int) -> tuple[int, int]:
    """[start, stop) of the pixels whose centre k + 0.5 lies in some [lo_i, hi_i]."""
    start = int(torch.ceil(lo.min() - 0.5).clamp(0, size))
    stop = int((torch.floor(hi.max() - 0.5) + 1).clamp(0, size))
    return start, stop


def _axis_weights(lo: torch.Tensor, hi: torch.Tensor, span: tuple[int, int],
                  size: int) -> torch.Tensor:
    """1-D interpolation matrices (n, L, S) for pixels span[0]..span[1]-1 along one axis.

    Linear interpolation weight of cell k at coordinate p is max(0, 1 - |p - k|): the
    two neighbours of p, cells off the grid simply absent (zero padding).
    """
    centres = torch.arange(*span, device=lo.device, dtype=lo.dtype) + 0.5
    p = _roi_fraction(centres, lo[:, None], hi[:, None]) * size - 0.5
    cells = torch.arange(size, device=lo.device, dtype=lo.dtype)
    weights = (1 - (p[..., None] - cells).abs()).clamp(min=0)
    inside = (centres >= lo[:, None]) & (centres <= hi[:, None])
    return weights * inside[..., None]


def paste_image_frame_masks(mask_probs: torch.Tensor, image_size: Sequence[int], *,
                            stride: int = 4, output_size: Sequence[int] | None = None,
                            threshold: float | None = None, chunk_size: int | None = None
                            ) -> torch.Tensor:
    """Image-frame masks of the padded batch -> masks over one image.

    mask_probs: (N, h, w) float on the stride-``stride`` grid of the padded batch (the
    image at the top-left); image_size: (H, W) of the image inside the padding, H <= s*h.
    Upsampled x stride (bilinear, align_corners=False) to (s*h, s*w), cropped to
    (H, W), then resized bilinearly to ``output_size`` (e.g. the original image) if
    given. Returns (N, H', W') probabilities, or bool ``>= threshold``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    final = (height, width) if output_size is None else tuple(int(s) for s in output_size)
    n = mask_probs.shape[0]
    dtype = torch.bool if threshold is not None else mask_probs.dtype
    out = torch.zeros(n, *final, dtype=dtype, device=mask_probs.device)
    padded = mask_probs.shape[-2] * mask_probs.shape[-1] * stride * stride
    step = chunk_size or max(1, _CHUNK_ELEMENTS // max(padded, 1))
    for start in range(0, n, step):
        part = mask_probs[start:start + step, None]
        up = F.interpolate(part, scale_factor=stride, mode="bilinear", align_corners=False)
        up = up[..., :height, :width]
        if output_size is not None:
            up = F.interpolate(up, size=final, mode="bilinear", align_corners=False)
        out[start:start + step] = up[:, 0] >= threshold if threshold is not None else up[:, 0]
    return out
