"""Multi-scale deformable attention in plain PyTorch (``grid_sample``).

Runs on any device and is exactly differentiable. Memory stays flat: queries are
processed in chunks and levels are accumulated one at a time, so the
(batch*heads, head_dim, queries, points) sample tensor exists for one chunk and
one level at a time only. When gradients are needed the chunks are recomputed in
backward (like activation checkpointing) instead of keeping every sample alive.

Half-precision inputs are computed in float32 (float32 accumulation, float32
sampling locations), matching the CUDA kernel; the output has ``value``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from frozenseg.ops.levels import level_shapes

# Largest sample tensor (elements) one chunk may create: 32M floats = 128 MB.
CHUNK_ELEMENTS = 1 << 25
# A grid coordinate whose bilinear neighbours all lie outside any map (pixel < -1).
OUTSIDE = -3.0


def ms_deform_attn_fallback(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as :func:`frozenseg.ops.ms_deform_attn`, inputs already validated.

    ``level_start_index`` is implied by ``spatial_shapes`` here and not read. This is plain
    PyTorch (what the TorchScript tracer records for ONNX); the registered op runs
    :func:`sample` and :func:`sample_backward` as its ``fallback`` back end.
    """
    shapes = level_shapes(spatial_shapes)
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    inputs = [t.to(compute_dtype) for t in (value, sampling_locations, attention_weights)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out = _RecomputedSampling.apply(*inputs, shapes)
    else:
        out = sample(*inputs, shapes)
    return out.to(value.dtype)


def _level_maps(value: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """(N, S, M, D) -> per level (N*M, D, H, W)."""
    n, _, m, d = value.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    return [
        lvl.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        for lvl, (h, w) in zip(levels, shapes, strict=True)
    ]


def _heads_first(locations: torch.Tensor, weights: torch.Tensor):
    """(N, Q, M, L, P, 2) -> grids (N*M, Q, L, P, 2) in [-1, 1]; weights -> (N*M, Q, L, P)."""
    n, q, m, lv, p, _ = locations.shape
    grids = (2 * locations - 1).transpose(1, 2).reshape(n * m, q, lv, p, 2)
    # A NaN or infinite location reads zero (and has zero gradients), as in the kernel and
    # Deformable DETR's; grid_sample would make the query's output NaN.
    grids = torch.where(grids.isfinite(), grids, OUTSIDE)
    weights = weights.transpose(1, 2).reshape(n * m, q, lv, p)
    return grids, weights


def _query_chunks(num_queries: int, maps: list[torch.Tensor], num_points: int):
    batch_heads, head_dim = maps[0].shape[:2]
    step = max(1, CHUNK_ELEMENTS // max(1, batch_heads * head_dim * num_points))
    return [(q0, min(q0 + step, num_queries)) for q0 in range(0, num_queries, step)]


def _bilinear(level_map: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of one level; align_corners=False + zero padding is Deformable
    DETR's convention: pixel centre (i + 0.5) / size, samples outside the map read zero.
    Its backward, by hand, is ``grid_sampler_2d_backward`` with the same settings."""
    return F.grid_sample(level_map, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def _sample_chunk(maps, grids, weights) -> torch.Tensor:
    """Weighted sum of bilinear samples for one query chunk: (N*M, D, q)."""
    out = None
    for level, level_map in enumerate(maps):
        sampled = _bilinear(level_map, grids[:, :, level])  # (N*M, D, q, P)
        term = (sampled * weights[:, None, :, level]).sum(-1)
        out = term if out is None else out + term
    return out


def _merge_heads(out: torch.Tensor, batch: int) -> torch.Tensor:
    """(N*M, D, Q) -> (N, Q, M*D)."""
    bm, d, q = out.shape
    return out.view(batch, bm // batch, d, q).permute(0, 3, 1, 2).reshape(batch, q, -1)


def sample(value, locations, weights, shapes) -> torch.Tensor:
    """The forward, no autograd of its own: every input in the compute dtype, ``shapes``
    the (H, W) pairs of the levels."""
    n, q, _, _, p, _ = locations.shape
    if q == 0 or n == 0:
        return value.new_zeros(n, q, value.shape[2] * value.shape[3])
    maps = _level_maps(value, shapes)
    grids, weights = _heads_first(locations, weights)
    if torch.jit.is_tracing():  # chunk bounds would freeze the traced number of queries
        return _merge_heads(_sample_chunk(maps, grids, weights), n)
    chunks = [
        _sample_chunk(maps, grids[:, q0:q1], weights[:, q0:q1])
        for q0, q1 in _query_chunks(q, maps, p)
    ]
    return _merge_heads(torch.cat(chunks, dim=2), n)


class _RecomputedSampling(torch.autograd.Function):
    """Keeps only the inputs for backward and recomputes each chunk there.

    The backward is written out by hand rather than differentiating ``_sample_chunk``
    with autograd: per chunk and level one ``grid_sample`` (the samples, for the
    attention weights' gradient) and one ``grid_sampler_2d_backward`` (the map's and the
    grid's gradients together). Autograd built a graph per chunk and, for every level's
    slice of the grids and weights, a zero-filled full-size gradient; this does neither
    (a 1.2-1.4x faster backward on the CPU, BENCHMARKS.md) and gives the same gradients.
    """

    @staticmethod
    def forward(ctx, value, locations, weights, shapes):
        ctx.shapes = shapes
        ctx.save_for_backward(value, locations, weights)
        return sample(value, locations, weights, shapes)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, locations, weights = ctx.saved_tensors
        grads = sample_backward(grad_out, value, locations, weights, ctx.shapes,
                                ctx.needs_input_grad[:3])
        return (*grads, None)


def sample_backward(grad_out, value, locations, weights, shapes, needs=(True, True, True)):
    """(grad value, grad locations, grad weights) of :func:`sample` for ``grad_out``
    (None for each gradient ``needs`` leaves out); every input in the compute dtype."""
    need_value, need_locations, need_weights = needs
    n, q, m, levels, p, _ = locations.shape
    d = value.shape[3]
    maps = _level_maps(value, shapes)
    grids, heads_weights = _heads_first(locations, weights)
    # (N, Q, M*D) -> (N*M, D, Q), the layout _sample_chunk produces.
    grad_heads = grad_out.reshape(n, q, m, d).permute(0, 2, 3, 1).reshape(n * m, d, q)
    grad_maps = [torch.zeros_like(t) for t in maps] if need_value else []
    grad_grids = torch.zeros_like(grids) if need_locations else None
    grad_heads_weights = torch.zeros_like(heads_weights) if need_weights else None
    # grid_sampler_2d_backward's codes for _bilinear's settings: bilinear (0), zeros (0).
    wanted = [bool(need_value), bool(need_locations)]
    for q0, q1 in _query_chunks(q, maps, p) if n and q else []:
        grad = grad_heads[:, :, q0:q1, None]  # (N*M, D, q, 1)
        for level, level_map in enumerate(maps):
            grid = grids[:, q0:q1, level]
            if need_weights:
                sampled = _bilinear(level_map, grid)
                grad_heads_weights[:, q0:q1, level] = (sampled * grad).sum(1)
            if any(wanted):
                grad_sampled = grad * heads_weights[:, None, q0:q1, level]
                grad_map, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                    grad_sampled, level_map, grid, 0, 0, False, wanted)
                if need_value:
                    grad_maps[level] += grad_map
                if need_locations:
                    grad_grids[:, q0:q1, level] = grad_grid
    grad_value = grad_locations = grad_weights = None
    if need_value:
        grad_value = torch.cat(  # sizes spelled out: -1 is ambiguous when n is 0
            [g.reshape(n, m, d, g.shape[2] * g.shape[3]).permute(0, 3, 1, 2)
             for g in grad_maps], dim=1
        )
    if need_locations:  # grids are 2 * locations - 1, heads first
        grad_locations = 2 * grad_grids.view(n, m, q, levels, p, 2).transpose(1, 2)
    if need_weights:
        grad_weights = grad_heads_weights.view(n, m, q, levels, p).transpose(1, 2)
    return grad_value, grad_locations, grad_weights
