"""``frozenseg doctor``: what this machine has, and whether the CUDA and CPU ops build and
agree with the fallback."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass

import torch

from frozenseg.ops import build, selfcheck


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


def cpu_kernel() -> list[Finding]:
    """Build (or reuse) the CPU kernel and compare it with the fallback. Without a C++
    compiler the fallback serves: information, not a failure."""
    try:
        module = build.load_cpu_extension()
    except build.BuildError as err:
        return [Finding("CPU op build", f"not built ({err}); the PyTorch fallback is used")]
    name = getattr(module, "name", "frozenseg_cpu")
    return [Finding("CPU op build", f"ok: torch.ops.{name}", True),
            *kernel_agreement("cpu", kernel="cpu", label="CPU kernel")]


def kernel_agreement(device: str = "cuda", kernel: str = "cuda",
                     label: str = "kernel") -> list[Finding]:
    """The first-use self-check (:mod:`frozenseg.ops.selfcheck`) on ``device``, per dtype:
    kernel against fallback, forward and backward, errors relative to max(1, max |fallback|).
    """
    findings = []
    for dtype, tolerance in selfcheck.TOLERANCE.items():
        errors = selfcheck.kernel_errors(device, dtype, kernel=kernel)
        text = ", ".join(f"{name} {err:.1e}" for name, err in errors.items())
        findings.append(Finding(
            f"{label} vs fallback ({str(dtype).removeprefix('torch.')})",
            f"on {selfcheck.describe(device)}, relative max diff: {text}",
            all(err <= tolerance for err in errors.values()),
        ))
    return findings
