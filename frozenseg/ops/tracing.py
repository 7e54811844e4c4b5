"""Sizes that stay symbolic when ``torch.jit`` traces the model (ONNX export).

Level shapes, image sizes and valid areas travel as tensors and are read back as Python
ints (``tolist``). A tracer cannot follow a Python int: it freezes the traced image's
value into the graph, which then fits that one image size. While tracing, these helpers
hand out 0-dim tensors instead, which the tracer records as computed values (views, slices
and ``arange`` accept them as sizes). Outside tracing they return exactly what the plain
calls return, so eager results are unchanged.
"""

from __future__ import annotations

import torch


def tensor_values(t: torch.Tensor):
    """``t.tolist()``; while tracing, the same nesting with 0-dim tensors as the leaves."""
    if not torch.jit.is_tracing():
        return t.tolist()
    return [tensor_values(row) for row in t.unbind(0)] if t.dim() else t


def spatial_shapes(maps: list[torch.Tensor]) -> torch.Tensor:
    """(L, 2) long: the (H, W) of each (..., H, W) map, on the first map's device."""
    device = maps[0].device
    if torch.jit.is_tracing():  # Shape ops in the graph, not the traced sizes as a constant
        return torch.stack([torch._shape_as_tensor(m)[-2:] for m in maps]).to(device)
    return torch.as_tensor([tuple(m.shape[-2:]) for m in maps], dtype=torch.long, device=device)


def unit_steps(start: float, count, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.linspace(start, start + count - 1, count)``: ``count`` values one apart.

    While tracing, the same values from ``arange`` (exact in float32): ONNX has no linspace,
    and the exporter's replacement divides by count - 1, NaN for a one-pixel level.
    """
    if torch.jit.is_tracing():
        return torch.arange(count, dtype=dtype, device=device) + start
    return torch.linspace(start, start + count - 1, count, dtype=dtype, device=device)


def smaller(a, b):
    """``min(a, b)`` of two sizes; while tracing, ``torch.minimum``: Python's min would
    freeze the traced image's choice into the graph."""
    if torch.jit.is_tracing():
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)
