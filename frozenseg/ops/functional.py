"""The one multi-scale deformable attention function and its back ends.

Shapes (Deformable DETR's)::

    value               (N, S, M, D)        S = sum of H_l * W_l over levels
    spatial_shapes      (L, 2) int          (H_l, W_l) per level: a tensor, or a sequence of
                                            L (H, W) pairs of Python ints
    level_start_index   (L,) int            offset of level l in S (None with int pairs:
                                            it follows from the shapes)
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

Every back end runs behind one registered op, ``frozenseg::ms_deform_attn`` (``registered.py``):
level shapes are ints in its schema, so pass them as (H, W) pairs read off the maps' shapes;
a shape tensor is read back first (on a GPU, a synchronisation; under ``torch.compile``, a
graph break). Under the TorchScript tracer (ONNX export) the fallback's PyTorch ops are
recorded instead of the op, which that exporter cannot translate.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from frozenseg.ops import build, selfcheck
from frozenseg.ops.fallback import ms_deform_attn_fallback
from frozenseg.ops.levels import flat_shapes, level_shapes, level_starts
from frozenseg.ops.registered import ms_deform_attn_op

BACKEND_ENV = "FROZENSEG_OPS"
BACKENDS = ("cpu", "cuda", "triton", "fallback")
_warned: set[str] = set()

Shapes = torch.Tensor | Sequence[Sequence[int]]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; see the module docstring for the contract."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights)
    # A compiled graph chooses when it runs (registered.py); eager calls choose here, where
    # the CUDA kernel's self-check can run.
    backend = "auto" if torch.compiler.is_compiling() else choose_backend(value)
    return _call(backend, value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights) -> torch.Tensor:
    """The CUDA kernel alone (no checks, no dispatch): CUDA inputs, D supported."""
    return _call("cuda", value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights) -> torch.Tensor:
    """The Triton kernel alone (no checks, no dispatch): CUDA inputs, or any inputs under
    ``TRITON_INTERPRET=1`` (how the tests run it on the CPU)."""
    return _call("triton", value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights) -> torch.Tensor:
    """The CPU kernel alone (no checks, no dispatch): CPU inputs of any floating dtype.

    Locations and weights are used in the accumulation type: float32, or float64 for a
    float64 ``value``.
    """
    return _call("cpu", value, spatial_shapes, sampling_locations, attention_weights)


def _call(backend: str, value, spatial_shapes, sampling_locations, attention_weights):
    shapes = level_shapes(spatial_shapes)
    if torch.jit.is_tracing():  # TorchScript records PyTorch ops, not a registered op
        return ms_deform_attn_fallback(value, shapes, None, sampling_locations,
                                       attention_weights)
    return ms_deform_attn_op(value, flat_shapes(shapes), sampling_locations, attention_weights,
                             backend)


def choose_backend(value: torch.Tensor, *, selfcheck: bool = True) -> str:
    """'cpu', 'cuda', 'triton' or 'fallback' for this input, honouring ``FROZENSEG_OPS``.

    ``selfcheck=False`` skips the CUDA kernel's first-use comparison (it needs autograd,
    which is off inside the registered op; the next eager call runs it)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", *BACKENDS):
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "fallback":
        return "fallback"
    if value.is_cuda:
        return _cuda_if_it_can(value, forced, selfcheck)
    if value.device.type == "cpu":
        return _cpu_if_it_can(forced)
    if forced:
        raise ValueError(f"{BACKEND_ENV}={forced} but value is on {value.device}")
    return "fallback"


def _cuda_if_it_can(value: torch.Tensor, forced: str, check: bool) -> str:
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
    if not check:
        return "cuda"
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


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Raise ValueError naming the argument and the shape or dtype it should have."""
    tensors = {"value": value, "spatial_shapes": spatial_shapes,
               "level_start_index": level_start_index,
               "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    pairs_given = _is_pairs(spatial_shapes)
    if pairs_given:
        del tensors["spatial_shapes"]
    if level_start_index is None:  # it follows from the shapes
        del tensors["level_start_index"]
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            alternative = " or a sequence of (H, W) pairs" * (name == "spatial_shapes")
            raise ValueError(f"{name} must be a torch.Tensor{alternative}, "
                             f"got {type(t).__name__}")
    ranks = {"value": (4, "(N, S, M, D)"), "spatial_shapes": (2, "(L, 2)"),
             "level_start_index": (1, "(L,)"), "sampling_locations": (6, "(N, Q, M, L, P, 2)"),
             "attention_weights": (5, "(N, Q, M, L, P)")}
    for name, t in tensors.items():
        rank, text = ranks[name]
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {text}, got {tuple(t.shape)}")
    _check_sizes(tensors, len(spatial_shapes) if pairs_given else spatial_shapes.shape[0])
    _check_dtypes_and_devices(tensors)
    # Traced sizes (TorchScript) are tensors: comparing them would freeze the traced image's.
    if not torch.jit.is_tracing():
        _check_levels(value, spatial_shapes, level_start_index)


def _is_pairs(spatial_shapes) -> bool:
    """A sequence of (H, W) pairs (lists, tuples or ``torch.Size``), not a tensor."""
    return isinstance(spatial_shapes, (list, tuple)) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in spatial_shapes)


def _check_sizes(tensors: dict, levels: int) -> None:
    n, _, m, _ = tensors["value"].shape
    _, q, _, _, p, _ = tensors["sampling_locations"].shape
    expected = {
        "spatial_shapes": ((levels, 2), "(L, 2)"),
        "level_start_index": ((levels,), "(L,) with L = len(spatial_shapes)"),
        "sampling_locations": ((n, q, m, levels, p, 2),
                               "(N, Q, M, L, P, 2) with N, M from value, L from spatial_shapes"),
        "attention_weights": ((n, q, m, levels, p),
                              "(N, Q, M, L, P) matching sampling_locations"),
    }
    for name, (shape, text) in expected.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {text} = {shape}")


def _check_dtypes_and_devices(tensors: dict) -> None:
    value = tensors["value"]
    for name in ("value", "sampling_locations", "attention_weights"):
        if not tensors[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensors[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if name in tensors and (tensors[name].is_floating_point() or tensors[name].is_complex()):
            raise ValueError(f"{name} must be an integer tensor, got {tensors[name].dtype}")
    for name, t in tensors.items():
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")


def _check_levels(value, spatial_shapes, level_start_index) -> None:
    """The level sizes against value's S and level_start_index. Only where that costs no
    device synchronisation (int pairs, CPU tensors); on a CUDA device the kernel checks
    them itself (a device-side assert, as torch's indexing does)."""
    if isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.is_cuda:
        return
    shapes = level_shapes(spatial_shapes)
    s, sizes = value.shape[1], [h * w for h, w in shapes]
    if sum(sizes) != s:
        raise ValueError(f"value has S={s} positions but spatial_shapes "
                         f"{[list(pair) for pair in shapes]} sum to {sum(sizes)}")
    if level_start_index is None or level_start_index.is_cuda:
        return
    starts = level_starts(shapes)
    if level_start_index.tolist() != starts:
        raise ValueError(f"level_start_index is {level_start_index.tolist()}, expected {starts} "
                         "(the cumulative sizes of spatial_shapes)")
