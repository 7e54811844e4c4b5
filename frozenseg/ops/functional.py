"""The one multi-scale deformable attention function and its back ends.

Shapes (Deformable DETR's)::

    value               (N, S, M, D)        S = sum of H_l * W_l over levels
    spatial_shapes      (L, 2) int          (H_l, W_l) per level
    level_start_index   (L,) int            offset of level l in S
    sampling_locations  (N, Q, M, L, P, 2)  normalised (x, y); (0, 0) is the top-left
                                            corner of the map, (1, 1) the bottom-right
    attention_weights   (N, Q, M, L, P)     usually a softmax over L * P
    returns             (N, Q, M * D)       in value's dtype

Sampling convention: bilinear with ``align_corners=False``. A location x maps to
the pixel coordinate ``x * W - 0.5``, so pixel i's centre is at (i + 0.5) / W.
Neighbours outside the map read zero (grid_sample's ``padding_mode="zeros"``); so does a
NaN or infinite location, whose gradients are zero too.
Sampling locations and attention weights are used in float32 whatever the dtype
of ``value``; accumulation is float32.

Back ends: CUDA tensors use the CUDA kernel, or, where it cannot be built (no nvcc: most
pip installs), the Triton kernel (``triton_kernel.py``, compiled by the Triton that ships
with torch); CPU tensors use the CPU kernel. Both C++ kernels are built from ``cuda/`` on
first use (see ``build.py``). Other devices, and any case a kernel cannot build or take,
use the grid_sample fallback. ``FROZENSEG_OPS=cpu|cuda|triton|fallback`` forces one.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.autograd.function import once_differentiable

from frozenseg.ops import build, selfcheck
from frozenseg.ops.fallback import ms_deform_attn_fallback

BACKEND_ENV = "FROZENSEG_OPS"
BACKENDS = ("cpu", "cuda", "triton", "fallback")
_warned: set[str] = set()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; see the module docstring for the contract."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_inputs(*args)
    backend = choose_backend(value)
    if backend == "cuda":
        return ms_deform_attn_cuda(*args)
    if backend == "cpu":
        return ms_deform_attn_cpu(*args)
    if backend == "triton":
        return ms_deform_attn_triton(*args)
    return ms_deform_attn_fallback(*args)


def ms_deform_attn_cuda(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
) -> torch.Tensor:
    """The CUDA kernel alone (no checks, no dispatch): CUDA inputs, D supported."""
    return _KernelFunction.apply(build.load_extension(), *_kernel_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights))


def ms_deform_attn_triton(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
) -> torch.Tensor:
    """The Triton kernel alone (no checks, no dispatch): CUDA inputs, or any inputs under
    ``TRITON_INTERPRET=1`` (how the tests run it on the CPU)."""
    from frozenseg.ops import triton_kernel

    return _KernelFunction.apply(triton_kernel, *_kernel_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights))


def _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights) -> tuple[torch.Tensor, ...]:
    """What both kernels read: contiguous and aligned (:func:`kernel_layout`), int64 level
    layout, float32 locations and weights (value keeps its dtype)."""
    return (kernel_layout(value), spatial_shapes.long().contiguous(),
            level_start_index.long().contiguous(), kernel_layout(sampling_locations.float()),
            kernel_layout(attention_weights.float()))


# The kernel reads value and the output's gradient in vectors of up to 32 bytes, and
# locations as float2 pairs: a contiguous view that starts mid-vector (a slice of a larger
# tensor) is read misaligned on a GPU, or for some head dims refused.
KERNEL_ALIGNMENT = 32


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a :data:`KERNEL_ALIGNMENT` boundary (a copy if not)."""
    t = t.contiguous()
    return t if t.data_ptr() % KERNEL_ALIGNMENT == 0 else t.clone()


def ms_deform_attn_cpu(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
) -> torch.Tensor:
    """The CPU kernel alone (no checks, no dispatch): CPU inputs of any floating dtype.

    Locations and weights are used in the accumulation type: float32, or float64 for a
    float64 ``value``.
    """
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    return _KernelFunction.apply(
        build.load_cpu_extension(),
        value.contiguous(),
        spatial_shapes.long().contiguous(),
        level_start_index.long().contiguous(),
        sampling_locations.to(compute_dtype).contiguous(),
        attention_weights.to(compute_dtype).contiguous(),
    )


def choose_backend(value: torch.Tensor) -> str:
    """'cpu', 'cuda', 'triton' or 'fallback' for this input, honouring ``FROZENSEG_OPS``."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", *BACKENDS):
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "fallback":
        return "fallback"
    if value.is_cuda:
        return _cuda_if_it_can(value, forced)
    if value.device.type == "cpu":
        return _cpu_if_it_can(forced)
    if forced:
        raise ValueError(f"{BACKEND_ENV}={forced} but value is on {value.device}")
    return "fallback"


def _cuda_if_it_can(value: torch.Tensor, forced: str) -> str:
    if forced == "cpu":
        raise ValueError(f"{BACKEND_ENV}=cpu but value is a CUDA tensor, not on the CPU")
    if forced == "triton":
        return "triton" if triton_available() else _fall_back("Triton is not installed", forced)
    if not kernel_supports_head_dim(value.shape[-1]):
        return _fall_back(f"head dim {value.shape[-1]} has no kernel", forced)
    if value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return _fall_back(f"dtype {value.dtype} has no kernel", forced)
    try:
        build.load_extension()
    except build.BuildError as err:
        if not forced and triton_available():
            return "triton"
        return _fall_back(f"the CUDA op could not be built: {err}", forced)
    disagreement = selfcheck.kernel_disagreement(value.device, value.dtype, value.shape[-1])
    if disagreement:
        return _fall_back(f"the CUDA kernel disagrees with it {disagreement}", forced)
    return "cuda"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (shipped with CUDA builds of torch)
    except ImportError:
        return False
    return True


def _cpu_if_it_can(forced: str) -> str:
    """The CPU kernel takes every floating dtype and head dim: only its build can fail."""
    if forced in ("cuda", "triton"):
        raise ValueError(f"{BACKEND_ENV}={forced} but value is on the CPU, not a CUDA device")
    try:
        build.load_cpu_extension()
    except build.BuildError as err:
        return _fall_back(f"the CPU op could not be built: {err}", forced)
    return "cpu"


def kernel_supports_head_dim(head_dim: int) -> bool:
    """The kernel gives each thread 1, 2, 4 or 8 channels and a head at most one warp."""
    return any(head_dim % vec == 0 and head_dim // vec <= 32 for vec in (1, 2, 4, 8))


def _fall_back(reason: str, forced: str) -> str:
    if forced:
        raise RuntimeError(f"{BACKEND_ENV}={forced} but {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"frozenseg: multi-scale deformable attention uses the PyTorch fallback: {reason}",
            RuntimeWarning, stacklevel=3,
        )
    return "fallback"


class _KernelFunction(torch.autograd.Function):
    """Autograd around a kernel: ``kernel.forward(value, shapes, starts, locations,
    weights)`` and ``kernel.backward(same, grad_output) -> (grad_value, grad_locations,
    grad_weights)``: the built CUDA or CPU extension, or the Triton module."""

    @staticmethod
    def forward(ctx, kernel, value, spatial_shapes, level_start_index, locations, weights):
        ctx.kernel = kernel
        ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
        return kernel.forward(value, spatial_shapes, level_start_index, locations, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_locations, grad_weights = ctx.kernel.backward(
            *ctx.saved_tensors, kernel_layout(grad_output)
        )
        return None, grad_value, None, None, grad_locations, grad_weights


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Raise ValueError naming the argument and the shape or dtype it should have."""
    tensors = {
        "value": value, "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations, "attention_weights": attention_weights,
    }
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, rank, text in (
        ("value", value, 4, "(N, S, M, D)"),
        ("spatial_shapes", spatial_shapes, 2, "(L, 2)"),
        ("level_start_index", level_start_index, 1, "(L,)"),
        ("sampling_locations", sampling_locations, 6, "(N, Q, M, L, P, 2)"),
        ("attention_weights", attention_weights, 5, "(N, Q, M, L, P)"),
    ):
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {text}, got {tuple(t.shape)}")

    n, s, m, _ = value.shape
    levels = spatial_shapes.shape[0]
    _, q, _, _, p, _ = sampling_locations.shape
    expected = {
        "spatial_shapes": (spatial_shapes, (levels, 2), "(L, 2)"),
        "level_start_index": (level_start_index, (levels,), "(L,) with L = len(spatial_shapes)"),
        "sampling_locations": (sampling_locations, (n, q, m, levels, p, 2),
                               "(N, Q, M, L, P, 2) with N, M from value, L from spatial_shapes"),
        "attention_weights": (attention_weights, (n, q, m, levels, p),
                              "(N, Q, M, L, P) matching sampling_locations"),
    }
    for name, (t, shape, text) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {text} = {shape}")

    if not value.is_floating_point():
        raise ValueError(f"value must be a floating-point tensor, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if not tensors[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensors[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if tensors[name].is_floating_point() or tensors[name].is_complex():
            raise ValueError(f"{name} must be an integer tensor, got {tensors[name].dtype}")
    for name, t in tensors.items():
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")
    # Checking the level sizes needs their values; only do it when that costs no
    # device synchronisation (the fallback reads them anyway). On a CUDA device the
    # kernel checks them itself (a device-side assert, as torch's indexing does).
    if not spatial_shapes.is_cuda:
        sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
        if sum(sizes) != s:
            raise ValueError(
                f"value has S={s} positions but spatial_shapes {spatial_shapes.tolist()} "
                f"sum to {sum(sizes)}"
            )
        starts = [sum(sizes[:i]) for i in range(levels)]
        if not level_start_index.is_cuda and level_start_index.tolist() != starts:
            raise ValueError(
                f"level_start_index is {level_start_index.tolist()}, expected {starts} "
                "(the cumulative sizes of spatial_shapes)"
            )

