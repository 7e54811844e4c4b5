"""``frozenseg::ms_deform_attn``: the deformable attention registered with ``torch.library``.

One op node for ``torch.compile``, ``torch.export`` and autograd, whatever back end runs::

    frozenseg::ms_deform_attn(Tensor value, SymInt[] spatial_shapes,
        Tensor sampling_locations, Tensor attention_weights, str backend="auto") -> Tensor
    frozenseg::ms_deform_attn_backward(Tensor grad_output, Tensor value,
        SymInt[] spatial_shapes, Tensor sampling_locations, Tensor attention_weights,
        str backend="auto") -> (Tensor, Tensor, Tensor)

``spatial_shapes`` is flat, [H_0, W_0, H_1, W_1, ...], ints in the schema, so compiled
graphs keep H and W symbolic; the kernels' int64 (L, 2) shape and (L,) start tensors are
made here from those ints (once per shapes and device). ``backend`` is "cpu", "cuda",
"triton", "fallback", or "auto": chosen when the op runs (``functional.choose_backend``).
The backward is an op too, so a compiled graph keeps it. Gradients come back in each
input's dtype; the op is differentiable once (no double backward).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from frozenseg.ops import build, fallback
from frozenseg.ops.levels import level_starts, pairs

# The kernel reads value and the output's gradient in vectors of up to 32 bytes, and
# locations as float2 pairs: a contiguous view that starts mid-vector (a slice of a larger
# tensor) is read misaligned on a GPU, or for some head dims refused.
KERNEL_ALIGNMENT = 32


@torch.library.custom_op("frozenseg::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(value: Tensor, spatial_shapes: Sequence[int], sampling_locations: Tensor,
                      attention_weights: Tensor, backend: str = "auto") -> Tensor:
    """(N, Q, M * D) in value's dtype; inputs as ``frozenseg.ops.ms_deform_attn`` takes them,
    already validated."""
    backend = _resolve(backend, value)
    if backend == "fallback":
        inputs = _in_compute_dtype(value, sampling_locations, attention_weights)
        out = fallback.sample(*inputs, pairs(spatial_shapes))
        return out.to(value.dtype).contiguous()
    kernel, inputs = _kernel_inputs(backend, value, spatial_shapes, sampling_locations,
                                    attention_weights)
    return kernel.forward(*inputs)


@torch.library.custom_op("frozenseg::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: Tensor, value: Tensor, spatial_shapes: Sequence[int],
    sampling_locations: Tensor, attention_weights: Tensor, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad value, grad locations, grad weights), each in its input's dtype."""
    backend = _resolve(backend, value)
    if backend == "fallback":
        inputs = _in_compute_dtype(value, sampling_locations, attention_weights)
        grads = fallback.sample_backward(grad_output.to(inputs[0].dtype), *inputs,
                                         pairs(spatial_shapes))
    else:
        kernel, inputs = _kernel_inputs(backend, value, spatial_shapes, sampling_locations,
                                        attention_weights)
        grads = kernel.backward(*inputs, kernel_layout(grad_output))
    like = (value, sampling_locations, attention_weights)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, like, strict=True))


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, sampling_locations, attention_weights, backend="auto"):
    n, _, m, d = value.shape
    return value.new_empty(n, sampling_locations.shape[1], m * d)


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, sampling_locations, attention_weights,
      backend="auto"):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (value, sampling_locations, attention_weights))


def _setup_context(ctx, inputs, output) -> None:
    value, spatial_shapes, locations, weights, backend = inputs
    ctx.save_for_backward(value, locations, weights)
    ctx.spatial_shapes, ctx.backend = spatial_shapes, backend


def _backward(ctx, grad_output):
    value, locations, weights = ctx.saved_tensors
    grads = ms_deform_attn_backward_op(grad_output, value, ctx.spatial_shapes, locations,
                                       weights, ctx.backend)
    grad_value, grad_locations, grad_weights = (
        g if needed else None
        for g, needed in zip(grads, (ctx.needs_input_grad[i] for i in (0, 2, 3)), strict=True))
    return grad_value, None, grad_locations, grad_weights, None


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def _resolve(backend: str, value: Tensor) -> str:
    """'auto' becomes the back end ``choose_backend`` picks; while the op runs, autograd is
    off, so the CUDA kernel's self-check waits for an eager call of the public function."""
    if backend != "auto":
        return backend
    from frozenseg.ops import functional  # functional imports this module

    return functional.choose_backend(value, selfcheck=False)


def _in_compute_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Half precision computes in float32, float64 stays float64."""
    compute = torch.promote_types(tensors[0].dtype, torch.float32)
    return tuple(t.to(compute) for t in tensors)


def _kernel_inputs(backend: str, value, spatial_shapes, locations, weights):
    """The kernel module (``forward(value, shapes, starts, locations, weights)``,
    ``backward(same, grad_output)``: the built CUDA or CPU extension, or the Triton module)
    and what it reads: contiguous and aligned (:func:`kernel_layout`), int64 level layout,
    locations and weights in float32 (the CPU kernel: in the accumulation type, float64 for
    a float64 value)."""
    shapes, starts = _level_tensors(tuple(spatial_shapes), value.device)
    if backend == "cpu":
        compute = torch.promote_types(value.dtype, torch.float32)
        return build.load_cpu_extension(), (
            value.contiguous(), shapes, starts, locations.to(compute).contiguous(),
            weights.to(compute).contiguous())
    if backend == "triton":
        from frozenseg.ops import triton_kernel as kernel
    elif backend == "cuda":
        kernel = build.load_extension()
    else:
        raise ValueError(f"unknown back end {backend!r}: expected auto, cpu, cuda, triton "
                         "or fallback")
    return kernel, (kernel_layout(value), shapes, starts, kernel_layout(locations.float()),
                    kernel_layout(weights.float()))


@functools.lru_cache(maxsize=256)
def _level_tensors(spatial_shapes: tuple[int, ...], device: torch.device):
    """(L, 2) int64 (H, W) and (L,) int64 starts on ``device``: made once, not per call (on
    a GPU each would be a copy from the host)."""
    shapes = pairs(spatial_shapes)
    return (torch.tensor(shapes, dtype=torch.long).view(-1, 2).to(device),
            torch.tensor(level_starts(shapes), dtype=torch.long).to(device))


def kernel_layout(t: Tensor) -> Tensor:
    """``t`` contiguous and starting on a :data:`KERNEL_ALIGNMENT` boundary (a copy if not)."""
    t = t.contiguous()
    return t if t.data_ptr() % KERNEL_ALIGNMENT == 0 else t.clone()
