"""A naive float64 loop of multi-scale deformable attention, and random inputs for it.

Written from the definition, one sampling point at a time, independent of
grid_sample: pixel coordinate = location * size - 0.5 (align_corners=False),
bilinear interpolation, neighbours outside the map read zero.
"""

from __future__ import annotations

import math

import torch


def bilinear_sample(level: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """level: (H, W, D) float64; x, y: 0-d normalised location. Returns (D,).

    Differentiable in level, x and y (only the neighbour indices go through floats).
    """
    h, w, d = level.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px.detach().item()), math.floor(py.detach().item())
    out = torch.zeros(d, dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * level[yy, xx]
    return out


def ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """Same contract as frozenseg.ops.ms_deform_attn, computed in float64 loops."""
    value = value.double()
    loc, attn = sampling_locations.double(), attention_weights.double()
    n, _, m, d = value.shape
    _, q, _, levels, points, _ = loc.shape
    shapes = [tuple(s) for s in spatial_shapes.tolist()]
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(levels)]
    out = [[[torch.zeros(d, dtype=torch.float64) for _ in range(m)] for _ in range(q)]
           for _ in range(n)]
    for b in range(n):
        for head in range(m):
            maps = [value[b, s:s + h * w, head].reshape(h, w, d)
                    for s, (h, w) in zip(starts, shapes, strict=True)]
            for i in range(q):
                for lvl in range(levels):
                    for p in range(points):
                        x, y = loc[b, i, head, lvl, p]
                        sample = bilinear_sample(maps[lvl], x, y)
                        out[b][i][head] = out[b][i][head] + attn[b, i, head, lvl, p] * sample
    if not (n and q):
        return torch.zeros(n, q, m * d, dtype=torch.float64)
    return torch.stack([torch.stack([torch.cat(row) for row in image]) for image in out])


def random_inputs(
    shapes, *, batch=2, queries=5, heads=2, head_dim=4, points=3, dtype=torch.float64,
    device="cpu", margin=0.2, seed=0,
):
    """Random op inputs; locations spread over [-margin, 1 + margin] so some fall outside."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels, total = len(shapes), int(sizes.sum())
    value = torch.randn(batch, total, heads, head_dim, generator=g, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64)
    loc = loc * (1 + 2 * margin) - margin
    logits = torch.randn(batch, queries, heads, levels * points, generator=g, dtype=torch.float64)
    attn = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return (
        value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
        loc.to(device, dtype), attn.to(device, dtype),
    )


def giou_cxcywh(a: list[float], b: list[float]) -> float:
    """GIoU of two normalised (cx, cy, w, h) boxes, by hand in float64."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull
