"""The CUDA kernel checked against the fallback before a process first relies on it.

The kernel has been run on the CPU (tests/cuda_emulation) but a GPU, its compiler and its
driver can still make it wrong. So the first time a process would use the kernel on a
device, for a dtype and head dim, both back ends run one small case (forward and
backward, milliseconds on a GPU) and are compared; on a mismatch frozenseg warns once,
naming the device and the error, and uses the fallback (``functional.choose_backend``).
``frozenseg doctor`` prints the same comparison.

Errors are ``max |kernel - fallback| / max(1, max |fallback|)`` per output, the fallback
computed in float64 on the CPU from the same (rounded) inputs.
"""

from __future__ import annotations

import torch

from frozenseg.ops.fallback import ms_deform_attn_fallback

# Largest error allowed per dtype of value: float32 accumulation, outputs rounded to dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
OUTPUTS = ("output", "grad value", "grad locations", "grad weights")

_verdicts: dict[tuple[str, torch.dtype, int], str | None] = {}


def kernel_disagreement(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the kernel agrees with the fallback, else what differs, for a warning.

    Checked once per process for each device, dtype and head dim (the kernel's code path
    depends on the last two). While a graph is traced, compiled or captured there is no
    room for a side computation: the check waits for the next eager call.
    """
    key = (str(device), dtype, head_dim)
    if key not in _verdicts:
        if _recording(device):
            return None
        errors = kernel_errors(device, dtype, head_dim)
        wrong = [f"{name} off by {err:.1e}" for name, err in errors.items()
                 if not err <= TOLERANCE[dtype]]  # NaN is wrong too
        _verdicts[key] = (
            f"on {describe(device)} ({dtype}, head dim {head_dim}) the kernel's "
            f"{', '.join(wrong)} (relative; tolerance {TOLERANCE[dtype]:.0e})" if wrong else None
        )
    return _verdicts[key]


def kernel_errors(device, dtype: torch.dtype = torch.float32, head_dim: int = 32,
                  kernel: str = "cuda"):
    """{output name: relative error} of a kernel (``functional.ms_deform_attn_<kernel>``,
    "cuda" or "cpu") on ``device`` against the fallback."""
    from frozenseg.ops import functional  # functional imports this module

    kernel_op = getattr(functional, f"ms_deform_attn_{kernel}")
    inputs, grad = small_case(head_dim, dtype)
    with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        kernel = forward_backward(kernel_op, [t.to(device) for t in inputs],
                                  grad.to(device))
        exact = [t.double() if t.is_floating_point() else t for t in inputs]
        fallback = forward_backward(ms_deform_attn_fallback, exact, grad.double())
    return {name: scaled_error(k.cpu(), f) for name, k, f in zip(OUTPUTS, kernel, fallback,
                                                                strict=True)}


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|), in float64 (0 when empty)."""
    if expected.numel() == 0:
        return 0.0
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item())
    return (actual.double() - expected).abs().max().item() / scale


def small_case(head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Inputs ((value in dtype, shapes, starts, locations, weights) on the CPU) and a grad
    of the output: 2 images, 5 queries, 2 heads, 3 levels (one 1x1), 2 points, some
    locations outside the maps and two queries on their edges."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[6, 7], [1, 1], [3, 4]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    n, q, m, p = 2, 5, 2, 2
    value = torch.randn(n, int(shapes.prod(1).sum()), m, head_dim, generator=gen).to(dtype)
    loc = torch.rand(n, q, m, len(shapes), p, 2, generator=gen) * 1.4 - 0.2
    # 0 and 1 are the maps' outer edges, half a pixel beyond the border pixels' centres:
    # one neighbour inside, one outside. Queries 0 and 1 sample the four corners.
    loc[:, 0, :, :, 0], loc[:, 0, :, :, 1] = 0.0, 1.0
    loc[:, 1, :, :, :, 0] = torch.tensor([0.0, 1.0])
    loc[:, 1, :, :, :, 1] = torch.tensor([1.0, 0.0])
    attn = torch.rand(n, q, m, len(shapes), p, generator=gen)
    grad = torch.randn(n, q, m * head_dim, generator=gen).to(dtype)
    return (value, shapes, starts, loc, attn), grad


def forward_backward(op, inputs, grad) -> list[torch.Tensor]:
    """[output, grad value, grad locations, grad weights] of ``op`` on ``inputs``."""
    value, shapes, starts, loc, attn = (t.detach() for t in inputs)
    for t in (value, loc, attn):
        t.requires_grad_()
    out = op(value, shapes, starts, loc, attn)
    out.backward(grad)
    return [out.detach(), value.grad, loc.grad, attn.grad]


def describe(device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"


def _recording(device) -> bool:
    capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or capturing
