"""Multi-scale deformable attention in Triton: the CUDA back end for machines without nvcc.

Most pip users have torch's own Triton but no CUDA toolkit, so the kernel in ``cuda/``
cannot build for them; this one compiles at run time with what torch ships. It follows
the CUDA kernel's conventions exactly (see ``functional.py``): ``align_corners=False``,
corners outside the map read zero, a point whose pixel position lies outside
(-1, H) x (-1, W) contributes nothing, float32 accumulation whatever ``value``'s dtype.

One program owns one (batch, query, head) and all D channels of it (a power-of-two
block, masked). Backward scatters the value gradient with float32 atomics and writes
each point's location and weight gradients once, as the CUDA kernel does.

Checked on the CPU under ``TRITON_INTERPRET=1`` against the float64 loop
(``tests/test_ms_deform_attn_triton.py``); the interpreter must be switched on before
this module is first imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _corner(value, n, m, start, yy, xx, height, width, S, M, D, d, dmask, inside):
    """One bilinear corner's D channels (float32, zero when outside the map), their
    offsets in value's layout (N, S, M, D), and whether the corner is inside."""
    ok = inside & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    offset = ((n * S + start + yy * width + xx) * M + m) * D + d
    return tl.load(value + offset, mask=dmask & ok, other=0.0).to(tl.float32), offset, ok


@triton.jit
def _pixel(loc, i, height, width, zeros):
    """Point i's pixel position (align_corners=False) and whether it samples anything,
    repeated over the channels (``zeros``: their shape): a scalar condition cannot mask
    a vector of channels in Triton's interpreter, and a GPU pays nothing for it."""
    x = tl.load(loc + 2 * i).to(tl.float32) * width.to(tl.float32) - 0.5 + zeros
    y = tl.load(loc + 2 * i + 1).to(tl.float32) * height.to(tl.float32) - 0.5 + zeros
    inside = (y > -1.0) & (x > -1.0) & (y < height.to(tl.float32)) & (x < width.to(tl.float32))
    return x, y, inside


@triton.jit
def _kernel(value, shapes, starts, loc, attn, out, grad_out, grad_value, grad_loc, grad_attn,
            S, M, Q, L, P, D, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    """Forward (``out``) or, with BACKWARD, the three gradients: one sampling loop for
    both, so forward and backward cannot disagree on where a point samples."""
    group = tl.program_id(0)  # (n * Q + q) * M + m
    m = group % M
    n = group // M // Q
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc = zeros
    if BACKWARD:
        g = tl.load(grad_out + group * D + d, mask=dmask, other=0.0).to(tl.float32)
    for level in range(L):
        height = tl.load(shapes + 2 * level)
        width = tl.load(shapes + 2 * level + 1)
        start = tl.load(starts + level)
        for point in range(P):
            i = (group * L + level) * P + point
            x, y, inside = _pixel(loc, i, height, width, zeros)
            x0, y0 = tl.floor(x), tl.floor(y)
            lx, ly = x - x0, y - y0
            hx, hy = 1 - lx, 1 - ly
            xi, yi = x0.to(tl.int64), y0.to(tl.int64)
            a = tl.load(attn + i).to(tl.float32)
            v00, o00, ok00 = _corner(value, n, m, start, yi, xi, height, width, S, M, D, d,
                                     dmask, inside)
            v01, o01, ok01 = _corner(value, n, m, start, yi, xi + 1, height, width, S, M, D,
                                     d, dmask, inside)
            v10, o10, ok10 = _corner(value, n, m, start, yi + 1, xi, height, width, S, M, D,
                                     d, dmask, inside)
            v11, o11, ok11 = _corner(value, n, m, start, yi + 1, xi + 1, height, width, S, M,
                                     D, d, dmask, inside)
            sample = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)
            if BACKWARD:
                ag = a * g
                tl.atomic_add(grad_value + o00, hy * hx * ag, mask=dmask & ok00)
                tl.atomic_add(grad_value + o01, hy * lx * ag, mask=dmask & ok01)
                tl.atomic_add(grad_value + o10, ly * hx * ag, mask=dmask & ok10)
                tl.atomic_add(grad_value + o11, ly * lx * ag, mask=dmask & ok11)
                d_x = hy * (v01 - v00) + ly * (v11 - v10)  # d sample / d x (pixels)
                d_y = hx * (v10 - v00) + lx * (v11 - v01)
                tl.store(grad_attn + i, tl.sum(g * sample, axis=0))
                tl.store(grad_loc + 2 * i, a * tl.sum(g * d_x, axis=0) * width.to(tl.float32))
                tl.store(grad_loc + 2 * i + 1,
                         a * tl.sum(g * d_y, axis=0) * height.to(tl.float32))
            else:
                acc += a * sample
    if not BACKWARD:
        tl.store(out + group * D + d, acc.to(out.dtype.element_ty), mask=dmask)


def _launch_shape(value: torch.Tensor, locations: torch.Tensor) -> tuple:
    n, s, m, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    return (n * q * m,), dict(S=s, M=m, Q=q, L=levels, P=points, D=d,
                              BLOCK_D=triton.next_power_of_2(d))


def forward(value, spatial_shapes, level_start_index, locations, weights):
    """(N, Q, M * D) in value's dtype; every input contiguous, locations/weights float32."""
    n, _, m, d = value.shape
    out = torch.empty(n, locations.shape[1], m * d, dtype=value.dtype, device=value.device)
    grid, sizes = _launch_shape(value, locations)
    if grid[0]:  # the gradient pointers are unused: out stands in for them
        _kernel[grid](value, spatial_shapes, level_start_index, locations, weights, out,
                      out, out, out, out, **sizes, BACKWARD=False)
    return out


def backward(value, spatial_shapes, level_start_index, locations, weights, grad_out):
    """(grad_value in value's dtype, grad_locations, grad_weights in float32)."""
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_loc = torch.zeros_like(locations)
    grad_attn = torch.zeros_like(weights)
    grid, sizes = _launch_shape(value, locations)
    if grid[0]:  # out is unused: grad_out stands in for it
        _kernel[grid](value, spatial_shapes, level_start_index, locations, weights,
                      grad_out, grad_out, grad_value, grad_loc, grad_attn, **sizes,
                      BACKWARD=True)
    return grad_value.to(value.dtype), grad_loc, grad_attn
