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
                            like: torch.Tensor) -> torch.Tensor:
    """RT-DETR's fixed 2-d sine embedding of a feature grid, for its AIFI layer.

    Returns (height * width, dim) in the row-major order of ``x.flatten(2)``: each position
    (y, x) gets [sin(y w), cos(y w), sin(x w), cos(x w)] with the dim / 4 frequencies
    w_i = temperature ** (-i / (dim / 4)), computed in float64 (as transformers 5 does; on a
    square grid this equals the official code's layout). ``like``: dtype and device.
    """
    if dim % 4:
        raise ValueError(f"the grid position embedding needs a width divisible by 4, not {dim}")
    quarter = dim // 4
    omega = temperature ** -(torch.arange(quarter, dtype=torch.float64, device=like.device)
                             / quarter)
    ys = torch.arange(height, dtype=torch.float64, device=like.device)
    xs = torch.arange(width, dtype=torch.float64, device=like.device)
    y = (ys[:, None, None] * omega).expand(height, width, quarter)
    x = (xs[None, :, None] * omega).expand(height, width, quarter)
    embedding = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], -1)
    return embedding.reshape(height * width, dim).to(like.dtype)
