"""Level shapes as Python ints, the form the registered op's schema takes.

Callers hold the (H, W) of each level as a sequence of pairs of ints, read off the maps'
``shape``: plain ints when eager, symbolic sizes under ``torch.compile`` and
``torch.export``, and traced sizes under the TorchScript tracer (which records them as
shape arithmetic, so an ONNX graph keeps H and W free). Deformable DETR's (L, 2) tensor
still works; reading it back is a device synchronisation on a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def level_shapes(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple]:
    """[(H_0, W_0), (H_1, W_1), ...] from an (L, 2) tensor or a sequence of pairs."""
    if isinstance(spatial_shapes, torch.Tensor):
        return [(h, w) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def level_starts(shapes: Sequence[tuple]) -> list:
    """The offset of each level in the flattened S positions: 0, H_0 W_0, ..."""
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total = total + h * w
    return starts


def start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L,) level_start_index of an (L, 2) spatial_shapes tensor."""
    return torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))


def flat_shapes(shapes: Sequence[tuple]) -> list:
    """[H_0, W_0, H_1, W_1, ...]: the op's ``SymInt[]``."""
    return [size for pair in shapes for size in pair]


def pairs(flat: Sequence) -> list[tuple]:
    """Inverse of :func:`flat_shapes`."""
    return list(zip(flat[::2], flat[1::2], strict=True))


def shapes_tensor(shapes: Sequence[tuple], *, dtype: torch.dtype = torch.long,
                  device=None) -> torch.Tensor:
    """(L, 2) (H, W) of the pairs, in ``dtype`` on ``device``.

    Symbolic sizes (``torch.compile``, ``torch.export``) and traced ones (TorchScript) are
    multiplied in rather than read, so the graph keeps them free; plain ints make a constant
    tensor, kept per shapes, dtype and device (on a GPU, no copy from the host per call):
    read it, never write to it.
    """
    constant = all(isinstance(size, int) for pair in shapes for size in pair)
    if constant and not torch.compiler.is_compiling():  # a compiled graph holds its own
        key = tuple(tuple(pair) for pair in shapes)
        return _constant(key, dtype, torch.device(device or "cpu"))
    one = torch.ones((), dtype=dtype, device=device)
    return torch.stack([torch.stack([one * h, one * w]) for h, w in shapes])


@functools.lru_cache(maxsize=256)
def _constant(shapes: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(shapes, dtype=dtype).view(-1, 2).to(device)
