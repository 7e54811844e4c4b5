"""Data-dependent sizes that stay symbolic when ``torch.jit`` traces the head (ONNX export).

Level shapes travel as int pairs read off the maps' shapes (``frozenseg.ops.levels``), which
the tracer follows. What is left here are sizes computed from data: each image's size
(``DetectorOutput.image_sizes``) and valid area (counted from a padding mask), read back as
Python ints (``tolist``). A tracer cannot follow a Python int: it freezes the traced image's
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


def smaller(a, b):
    """``min(a, b)`` of two sizes; while tracing, ``torch.minimum``: Python's min would
    freeze the traced image's choice into the graph."""
    if torch.jit.is_tracing():
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)
