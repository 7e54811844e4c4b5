"""The CUDA kernel of cuda/, compiled by g++ and run on the CPU: a test tool.

The kernel's text (and that of the sampling header it shares with the CPU kernel) is
used byte for byte but for two mechanical rewrites: the c10/cuda
includes become ``shim.h`` (CUDA's built-ins in C++20: threads, barriers, shuffles,
atomics), and each ``kernel<<<grid, threads, shared, stream>>>(args)`` becomes
``emulated_launch(kernel, grid, threads, shared, stream, args)``; its header includes
ATen instead of torch/extension.h (half the compile time). The shim registers the
kernel's two entry points as ``torch.ops.<build name>.forward`` and ``.backward``, which
take CPU tensors; the build has ``-fsanitize=undefined`` (undefined behaviour aborts
with its source line).

``__CUDA_ARCH__`` is a build parameter, as in nvcc's per-architecture passes: 800 builds
the scalar-atomic path of sm_80, 900 the vector atomics of sm_90. Builds are cached by the
hash of everything that goes into them.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import torch

from frozenseg.ops import build

SHIM = Path(__file__).with_name("shim.h")
KERNEL, HEADER = "ms_deform_attn_kernel.cu", "ms_deform_attn.h"
SAMPLING = "ms_deform_attn_sampling.h"  # the arithmetic the kernel shares with the CPU one
CFLAGS = ["-std=c++20", "-O1", "-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
C10_CUDA_INCLUDES = re.compile(r"^#include <c10/cuda/\w+\.h>\n", re.MULTILINE)
# kernel_name<template args><<<launch config>>>(  -- template args hold no '<' of their own
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<([^<>]*)>>>\s*\(")
LAUNCHES = 2  # forward and backward
ARCHS = (800, 900)  # scalar atomics (sm_80), vector atomics (sm_90)


class EmulationError(RuntimeError):
    """The source no longer has the shape the rewrite expects."""


def compiler_missing() -> str | None:
    """Why the emulation cannot be built here, or None."""
    return None if shutil.which("g++") else "needs g++ (C++20) to build the CUDA emulation"


def rewrite_kernel(text: str) -> str:
    """The .cu text with the shim in place of c10/cuda and plain calls for the launches."""
    text, includes = C10_CUDA_INCLUDES.subn("", text)
    if includes == 0:
        raise EmulationError(f"no c10/cuda include in {KERNEL}")
    text, launches = LAUNCH.subn(r"emulated_launch(\1, \2, ", text)
    if launches != LAUNCHES or "<<<" in text:
        raise EmulationError(f"expected {LAUNCHES} kernel launches, rewrote {launches}")
    return '#include "shim.h"\n' + text


def rewrite_header(text: str) -> str:
    if "#include <torch/extension.h>" not in text:
        raise EmulationError(f"{HEADER} no longer includes torch/extension.h")
    return text.replace("#include <torch/extension.h>", "#include <ATen/ATen.h>")


def load(root: Path, texts: dict[str, str] | None = None, archs=ARCHS) -> dict[int, object]:
    """The emulated op per ``__CUDA_ARCH__`` in ``archs``, of cuda/'s kernel or of
    ``texts`` (a mutant: the kernel's and the sampling header's text by file name), built
    in ``root`` or reused: objects with the extension's ``forward`` and ``backward``.

    One library, one translation unit per architecture (ninja compiles them side by side);
    each renames the namespace ``frozenseg`` after its architecture so that they link.
    """
    from torch.utils import cpp_extension

    texts = texts or sources()
    kernel = rewrite_kernel(texts[KERNEL])
    header = rewrite_header((build.source_dir() / HEADER).read_text())
    digest = hashlib.sha256("\0".join(
        [kernel, header, texts[SAMPLING], SHIM.read_text(), *CFLAGS, *map(str, archs)]
    ).encode()).hexdigest()[:12]
    name = f"ms_deform_attn_emulated_{digest}"
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    files = {HEADER: header, SAMPLING: texts[SAMPLING]}
    for arch in archs:
        files[f"kernel_sm{arch}.cpp"] = (
            f"#define EMULATED_CUDA_ARCH {arch}\n#define EMULATED_OPS {name}_sm{arch}\n"
            f"#define frozenseg frozenseg_sm{arch}\n{kernel}"
        )
    for file_name, text in files.items():
        path = directory / file_name
        if not path.exists() or path.read_text() != text:  # keeps ninja's timestamps
            path.write_text(text)
    cpp_extension.load(
        name=name,
        sources=[str(directory / f"kernel_sm{arch}.cpp") for arch in archs],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fsanitize=undefined"],
        extra_include_paths=[str(SHIM.parent), str(directory)],
        build_directory=str(directory),
        with_cuda=False,
        is_python_module=False,
        verbose=False,
    )
    return {arch: getattr(torch.ops, f"{name}_sm{arch}") for arch in archs}


def sources() -> dict[str, str]:
    """The kernel's and the sampling header's text, by file name."""
    return {name: (build.source_dir() / name).read_text() for name in (KERNEL, SAMPLING)}


# Defines planted(name): whether the PLANTED_BUG environment variable names this bug, so
# that one build holds several planted bugs and a test switches one on.
PLANTED = """#include <cstdlib>
#include <cstring>
static bool planted(const char* bug) {
  const char* live = std::getenv("PLANTED_BUG");
  return live != nullptr && std::strcmp(live, bug) == 0;
}
"""


def with_planted_bugs(replacements: dict[str, str]) -> dict[str, str]:
    """The kernel's and the sampling header's texts with each key (found exactly once in
    the two) replaced by its value, which names its bug with ``planted("...")``."""
    texts = sources()
    for old, new in replacements.items():
        found = [name for name, text in texts.items() if text.count(old) == 1]
        if len(found) != 1 or sum(text.count(old) for text in texts.values()) != 1:
            raise EmulationError(f"{old!r} is not found exactly once in {KERNEL} and {SAMPLING}")
        texts[found[0]] = texts[found[0]].replace(old, new)
    texts[KERNEL] = PLANTED + texts[KERNEL]  # before the header is included: it may call it
    return texts
