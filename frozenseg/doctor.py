"""``frozenseg doctor``: what this machine has, and whether the CUDA op builds and agrees."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass

import torch

from frozenseg.ops import build


@dataclass(frozen=True)
class Finding:
    name: str
    value: str
    ok: bool | None = None  # None: information only


def environment() -> list[Finding]:
    """Versions of Python, torch, CUDA (build, toolkit, driver) and the visible GPUs."""
    import torchvision

    cuda_home = build.find_cuda_home()
    findings = [
        Finding("python", platform.python_version()),
        Finding("torch", torch.__version__),
        Finding("torchvision", torchvision.__version__),
        Finding("torch CUDA build", torch.version.cuda or "none (CPU-only build)"),
        Finding("CUDA toolkit", str(cuda_home or "not found"), cuda_home is not None),
        Finding("nvcc", _nvcc_version(cuda_home)),
        Finding("driver", _driver_version()),
    ]
    if not torch.cuda.is_available():
        return [*findings, Finding("GPU", "none visible")]
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        findings.append(Finding(f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})"))
    return findings


def _nvcc_version(cuda_home) -> str:
    if cuda_home is None:
        return "not found"
    out = _run([str(cuda_home / "bin" / "nvcc"), "--version"])
    releases = [line for line in out.splitlines() if "release" in line]
    return releases[-1].strip() if releases else "unknown"


def _driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def kernel_build(archs: str | None = None) -> Finding:
    """Build (or reuse) and load the kernel."""
    archs = archs or build.arch_list()
    try:
        module = build.load_extension(archs)
    except build.BuildError as err:
        return Finding("CUDA op build", f"failed for sm {archs}: {err}", False)
    return Finding("CUDA op build", f"ok for sm {archs}: {module.__file__}", True)


def kernel_agreement(tolerance: float = 1e-5) -> Finding:
    """Kernel (GPU) and fallback (CPU) on one small float32 case, forward and backward.

    Errors are max |kernel - fallback| / max(1, max |fallback|) per output.
    """
    from frozenseg.ops.fallback import ms_deform_attn_fallback
    from frozenseg.ops.functional import ms_deform_attn_cuda

    case = _small_case()
    kernel = _forward_backward(ms_deform_attn_cuda, case, "cuda")
    fallback = _forward_backward(ms_deform_attn_fallback, case, "cpu")
    names = ("output", "grad value", "grad locations", "grad weights")
    errors = [
        (k.cpu() - f).abs().max().item() / max(1.0, f.abs().max().item())
        for k, f in zip(kernel, fallback, strict=True)
    ]
    text = ", ".join(f"{name} {err:.1e}" for name, err in zip(names, errors, strict=True))
    return Finding("kernel vs fallback", f"relative max diff: {text}", max(errors) <= tolerance)


def _small_case():
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[12, 17], [6, 9], [3, 5]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    n, q, m, d, p = 2, 50, 4, 32, 4
    value = torch.randn(n, int(shapes.prod(1).sum()), m, d, generator=gen)
    loc = torch.rand(n, q, m, len(shapes), p, 2, generator=gen) * 1.2 - 0.1
    attn = torch.rand(n, q, m, len(shapes), p, generator=gen)
    grad = torch.randn(n, q, m * d, generator=gen)
    return value, shapes, starts, loc, attn, grad


def _forward_backward(op, case, device):
    value, shapes, starts, loc, attn, grad = (t.to(device) for t in case)
    for t in (value, loc, attn):
        t.requires_grad_()
    out = op(value, shapes, starts, loc, attn)
    out.backward(grad)
    return out.detach(), value.grad, loc.grad, attn.grad
