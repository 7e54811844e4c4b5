"""Sine position embeddings: of feature-map pixels, and of boxes."""

from __future__ import annotations

import math

import torch


def _interleave_sin_cos(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(..., ) coordinates in radians-scale -> (..., num_feats) [sin, cos, sin, cos, ...]."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def feature_position_embedding(
    valid: torch.Tensor, *, num_feats: int, temperature: float, offset: float
) -> torch.Tensor:
    """Normalised sine embedding of every pixel of a padded feature map.

    valid: (B, H, W) bool, True on image pixels (False on padding).
    Returns (B, 2 * num_feats, H, W) float32: the y embedding, then the x embedding.
    Pixel coordinates count from 1 inside the valid area; ``offset`` (-0.5 in Deformable
    DETR, 0 in DINO) is added before dividing by the valid extent and scaling to 2*pi.
    """
    valid = valid.float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    pos_y = _interleave_sin_cos(y, num_feats, temperature)
    pos_x = _interleave_sin_cos(x, num_feats, temperature)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_position_embedding(
    boxes: torch.Tensor, *, num_feats: int = 128, temperature: float = 10000.0, order: str = "xywh"
) -> torch.Tensor:
    """Sine embedding of normalised boxes or points.

    boxes: (..., 2 or 4) in [0, 1], cx, cy(, w, h). Returns (..., num_feats * boxes.shape[-1])
    with the coordinates embedded in ``order``: "xywh" (Deformable DETR's proposal
    embedding) or "yxwh" (DINO's query embedding: y before x).
    """
    coords = boxes.float() * (2 * math.pi)
    index = {"xywh": [0, 1, 2, 3], "yxwh": [1, 0, 2, 3]}[order][: boxes.shape[-1]]
    return torch.cat([_interleave_sin_cos(coords[..., i], num_feats, temperature) for i in index],
                     dim=-1)


def grid_position_embedding(height: int, width: int, *, dim: int, temperature: float,
                            like: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """RT-DETR's fixed 2-d sine embedding of a feature grid, for its AIFI layer.

    Returns (height * width, dim) for the positions k of ``x.flatten(2)`` (row-major): each
    gets [sin(a w), cos(a w), sin(b w), cos(b w)] with the dim / 4 frequencies
    w_i = temperature ** (-i / (dim / 4)), computed in float64. transformers 5 takes
    (a, b) = (row, column) = divmod(k, width); the official code and transformers 4 build the
    grid as width x height and flatten that, so (a, b) = divmod(k, height) (``transposed``):
    the same on a square grid, not on others. ``like``: dtype and device.
    """
    if dim % 4:
        raise ValueError(f"the grid position embedding needs a width divisible by 4, not {dim}")
    quarter = dim // 4
    f64 = {"dtype": torch.float64, "device": like.device}
    omega = temperature ** -(torch.arange(quarter, **f64) / quarter)
    k = torch.arange(height * width, **f64)
    stride = height if transposed else width
    a = torch.div(k, stride, rounding_mode="floor")
    b = k - a * stride
    a, b = a[:, None] * omega, b[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], -1).to(like.dtype)
