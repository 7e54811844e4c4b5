"""Build and load the kernels of multi-scale deformable attention on first use.

The sources live in the repository's ``cuda/`` folder (installed as
``frozenseg/_cuda``). They are compiled with ``torch.utils.cpp_extension`` into
``$FROZENSEG_CACHE_DIR`` (default ``~/.cache/frozenseg``) and reused after: one folder
per build configuration and source hash.

- The CUDA kernel (nvcc): once per torch version, CUDA version, source hash and
  architecture list. Architectures: ``TORCH_CUDA_ARCH_LIST`` when set, else those of the
  visible GPUs, else (a build-only machine) :data:`BUILD_ONLY_ARCHS`.
- The CPU kernel (the C++ compiler alone, ``$CXX`` or ``c++``): once per torch version,
  compiler flags, the CPU's instruction-set flags (it is built for this CPU,
  ``-march=native``) and source hash.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
from pathlib import Path

import torch

SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_kernel.cu")
HEADERS = ("ms_deform_attn.h", "ms_deform_attn_sampling.h")
# Ampere (scalar atomics) and Hopper (vector atomics): both code paths compile.
BUILD_ONLY_ARCHS = "8.0;9.0"
EXTENSION_NAME = "frozenseg_ms_deform_attn"
CPU_SOURCES = ("ms_deform_attn_cpu.cpp",)
CPU_HEADERS = ("ms_deform_attn_sampling.h",)
CPU_EXTENSION_NAME = "frozenseg_ms_deform_attn_cpu"
# -ffp-contract=fast: torch compiles with -std=c++20, which turns contraction off; the
# kernel's multiply-adds should become FMAs. -fopenmp: at::parallel_for is inline and runs
# serially unless compiled with OpenMP (the extension then shares torch's libgomp).
CPU_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")


class BuildError(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why in one line."""


def source_dir() -> Path:
    """Folder holding the CUDA sources (top-level cuda/ in a checkout, _cuda when installed)."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package.parent / "cuda", package / "_cuda"):
        if (folder / SOURCES[0]).exists():
            return folder
    raise BuildError(f"CUDA sources not found in {package.parent / 'cuda'} or {package / '_cuda'}")


def find_cuda_home() -> Path | None:
    """The CUDA toolkit that has nvcc and the runtime headers, or None.

    torch guesses CUDA_HOME from ``which nvcc``, which is wrong when nvcc is a
    wrapper script (``/usr/local/bin/nvcc``) or a distribution symlink.
    """
    candidates = [os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")),
                                            reverse=True)]
    for c in filter(None, candidates):
        home = Path(c)
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def arch_list() -> str:
    """The ';'-separated compute capabilities to compile for."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return BUILD_ONLY_ARCHS


def gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in re.split(r"[;\s]+", archs.strip()):
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d+[af]?", num):
            raise BuildError(f"unsupported entry {arch!r} in TORCH_CUDA_ARCH_LIST={archs!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def build_dir(archs: str) -> Path:
    """The CUDA kernel's cache folder for these architectures."""
    return cache_dir(f"torch{torch.__version__}-cu{torch.version.cuda}-sm{archs}",
                     SOURCES + HEADERS)


def cpu_build_dir() -> Path:
    """The CPU kernel's cache folder for this torch, these flags and this CPU."""
    config = hashlib.sha256(" ".join((*CPU_FLAGS, cpu_features())).encode()).hexdigest()
    return cache_dir(f"torch{torch.__version__}-cpu-{config[:12]}", CPU_SOURCES + CPU_HEADERS)


def cache_dir(config: str, files: tuple[str, ...]) -> Path:
    """``$FROZENSEG_CACHE_DIR/ops/<config>-<hash of the files>``."""
    root = Path(os.environ.get("FROZENSEG_CACHE_DIR", Path.home() / ".cache" / "frozenseg"))
    digest = hashlib.sha256()
    for name in files:
        digest.update((source_dir() / name).read_bytes())
    tag = f"{config}-{digest.hexdigest()[:12]}"
    return root / "ops" / re.sub(r"[^A-Za-z0-9_.-]", "_", tag)


def cpu_features() -> str:
    """The CPU's model and instruction-set flags: what ``-march=native`` compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.split(":")[0].strip() in ("flags", "Features")]
    except OSError:
        lines = []
    return lines[0].strip() if lines else f"{platform.machine()} {platform.processor()}"


_loaded: dict[str | None, object] = {}
_cpu_loaded: str | None = None  # the CPU library this process loaded (its cache tag)


def load_extension(archs: str | None = None):
    """Compile (or reuse) and import the CUDA kernel; raise BuildError with the reason."""
    return _remembered(archs, lambda: _build(archs or arch_list()))


def load_cpu_extension():
    """Compile (or reuse) and load the CPU kernel; raise BuildError with the reason.

    Returns the namespace of its ops, ``torch.ops.frozenseg_cpu`` (``forward``,
    ``backward``: the CUDA extension's signatures).
    """
    return _remembered("cpu", _build_cpu)


def _remembered(key: str | None, build):
    """build()'s outcome, failure included, remembered for the process: a failed build
    is not retried on every call."""
    if key not in _loaded:
        try:
            _loaded[key] = build()
        except BuildError as err:
            _loaded[key] = err
    result = _loaded[key]
    if isinstance(result, BuildError):
        raise result
    return result


def _build(archs: str):
    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise BuildError("nvcc not found (set CUDA_HOME to the CUDA toolkit)")
    # torch guesses CUDA_HOME when cpp_extension is first imported: point the
    # environment (for a first import, and for nvcc's children) and, if it was
    # imported already, the module at the toolkit found above.
    os.environ.setdefault("CUDA_HOME", str(cuda_home))
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(cuda_home)
    return _compile(
        EXTENSION_NAME, SOURCES, build_dir(archs),
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *gencode_flags(archs)],
    )


def _build_cpu():
    global _cpu_loaded
    tag = cpu_build_dir().name  # torch, flags, CPU and sources, not where the cache is
    if _cpu_loaded == tag:  # already in this process, perhaps from another cache folder:
        return torch.ops.frozenseg_cpu  # a second library of the same ops would abort it
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler: {compiler} not found (set CXX or install g++)")
    _compile(CPU_EXTENSION_NAME, CPU_SOURCES, cpu_build_dir(),
             extra_cflags=list(CPU_FLAGS), extra_ldflags=["-fopenmp"], is_python_module=False)
    _cpu_loaded = tag
    return torch.ops.frozenseg_cpu


def _compile(name: str, sources: tuple[str, ...], directory: Path, **flags):
    """cpp_extension.load of these sources into directory; BuildError with the first error."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name, sources=[str(source_dir() / s) for s in sources],
            build_directory=str(directory), verbose=False, **flags,
        )
    except (RuntimeError, OSError, ImportError, ValueError) as err:
        raise BuildError(first_error_line(str(err))) from err


def first_error_line(log: str) -> str:
    """The compiler's first error from a build log, or its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        # nvcc says "fatal" for an architecture it does not know, gcc/nvcc "error" otherwise.
        if re.search(r"\b(error|fatal)\b", line, re.IGNORECASE) and "Error building" not in line:
            return line[:300]
    return lines[-1][:300] if lines else "unknown build error"
