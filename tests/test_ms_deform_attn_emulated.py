"""The CUDA kernel's own source, run on the CPU (tests/cuda_emulation): no GPU needed.

Every call goes through the real glue (``ms_deform_attn_cuda`` and its autograd
function) with ``build.load_extension`` handing out the emulated op, for both atomic
variants (``__CUDA_ARCH__`` 800: scalar atomics, 900: vector atomics). The kernel is
compared with the float64 loop (forward) and with the float64 fallback (forward and
backward, ``selfcheck.kernel_errors``, the first-use check a GPU runs); planted bugs must
fail that comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import cuda_emulation
import pytest
import torch
from reference import ms_deform_attn_reference, random_inputs
from test_backend_choice import fake_cuda_value

from frozenseg import doctor
from frozenseg.ops import build, choose_backend, ms_deform_attn_cuda, selfcheck
from frozenseg.ops import functional as op_module
from frozenseg.ops.fallback import ms_deform_attn_fallback

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(cuda_emulation.compiler_missing() is not None,
                       reason=str(cuda_emulation.compiler_missing())),
    pytest.mark.usefixtures("one_thread"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [1, 8, 24, 32, 64, 256]
SHAPES = [(4, 5), (1, 1), (2, 3)]
# Pixel coordinates (from the start, or from the end with "n") on and around the borders.
EDGE_PIXELS = [lambda n: -1.0, lambda n: -0.5, lambda n: 0.0,
               lambda n: n - 1.0, lambda n: n - 0.5, lambda n: float(n)]
# Bugs planted in the kernel's text: (found once, replaced by); planted("name") is live
# when PLANTED_BUG names it.
PLANTED_BUGS = {
    # The right neighbour read one column past the edge: the next row's first pixel.
    "x1_in = x0 + 1 < w,": 'x1_in = x0 + 1 < w + planted("edge"),',
    # fy for fx in the y gradient.
    "gx * (v2 - v0) + b.fx * (v3 - v1)":
        'gx * (v2 - v0) + (planted("fy-for-fx") ? b.fy : b.fx) * (v3 - v1)',
    # Every group's shuffle mask names the warp's first lanes.
    "return ((1u << lanes) - 1u) << first;":
        'return ((1u << lanes) - 1u) << (planted("mask") ? 0 : first);',
}


@pytest.fixture(scope="session")
def emulation_root(pytestconfig) -> Path:
    cache = os.environ.get("FROZENSEG_CACHE_DIR")
    return Path(cache) / "emulation" if cache else pytestconfig.cache.mkdir("cuda-emulation")


@pytest.fixture(scope="session")
def emulated(emulation_root):
    return cuda_emulation.load(emulation_root)


@pytest.fixture(scope="session")
def mutant(emulation_root):
    texts = cuda_emulation.with_planted_bugs(PLANTED_BUGS)
    return cuda_emulation.load(emulation_root, texts, archs=(800,))[800]


def use_kernel(monkeypatch, ops):
    """Make ``ops`` the extension ms_deform_attn_cuda calls; forget earlier verdicts."""
    monkeypatch.setattr(build, "load_extension", lambda archs=None: ops)
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(op_module, "_warned", set())


@pytest.fixture(params=cuda_emulation.ARCHS, ids=lambda arch: f"sm{arch // 10}")
def kernel(request, emulated, monkeypatch):
    use_kernel(monkeypatch, emulated[request.param])
    return emulated[request.param]


def on_edges(loc: torch.Tensor, shapes) -> torch.Tensor:
    """Queries 0 and 1 (x, y swapped) on every EDGE_PIXELS coordinate of every level."""
    loc = loc.clone()
    for level, (h, w) in enumerate(shapes):
        for p in range(loc.shape[4]):
            x, y = (EDGE_PIXELS[(level + p + k) % len(EDGE_PIXELS)] for k in (0, 3))
            loc[:, 0, :, level, p] = torch.tensor([(x(w) + 0.5) / w, (y(h) + 0.5) / h])
            loc[:, 1, :, level, p] = torch.tensor([(y(w) + 0.5) / w, (x(h) + 0.5) / h])
    return loc


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64_loop(emulated, monkeypatch, dtype, head_dim):
    use_kernel(monkeypatch, emulated[800])  # forward has no atomics: one variant
    value, shapes, starts, loc, attn = random_inputs(
        SHAPES, batch=2, queries=3, heads=2, head_dim=head_dim, points=6, seed=head_dim)
    value, loc, attn = value.to(dtype), on_edges(loc, SHAPES).float(), attn.float()
    out = ms_deform_attn_cuda(value, shapes, starts, loc, attn)
    assert out.dtype == dtype
    expected = ms_deform_attn_reference(value, shapes, loc, attn)
    assert selfcheck.scaled_error(out, expected) <= selfcheck.TOLERANCE[dtype]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_the_fallback(kernel, dtype, head_dim):
    errors = selfcheck.kernel_errors("cpu", dtype, head_dim)
    assert max(errors.values()) <= selfcheck.TOLERANCE[dtype], errors


def test_empty_queries_and_batch(kernel):
    for batch, queries in ((2, 0), (0, 3)):
        inputs = [t.float() if t.is_floating_point() else t
                  for t in random_inputs(SHAPES, batch=batch, queries=queries, head_dim=8)]
        out, grad_value, grad_loc, grad_attn = selfcheck.forward_backward(
            ms_deform_attn_cuda, inputs, torch.ones(batch, queries, 16))
        assert out.shape == (batch, queries, 16)
        assert grad_value.shape == inputs[0].shape and not grad_value.any()
        assert grad_loc.shape == inputs[3].shape and grad_attn.shape == inputs[4].shape


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that starts one element into its storage."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)
    shifted = storage[1:].view_as(t)
    shifted.copy_(t)
    return shifted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_value_and_locations_at_odd_offsets_give_the_same_result(emulated, monkeypatch, dtype):
    """value's offset left no channel width for D=64 (the call raised); float2 locations
    were read misaligned. Both are copied to an aligned buffer now."""
    kernel = emulated[800]
    use_kernel(monkeypatch, kernel)
    inputs, grad = selfcheck.small_case(64, dtype)
    value, shapes, starts, loc, attn = inputs
    with pytest.raises(RuntimeError, match="head dim 64 is not supported"):
        kernel.forward(misaligned(value), shapes, starts, loc, attn)
    shifted = (misaligned(value), shapes, starts, misaligned(loc), misaligned(attn))
    aligned = selfcheck.forward_backward(ms_deform_attn_cuda, inputs, grad)
    ours = selfcheck.forward_backward(ms_deform_attn_cuda, shifted, misaligned(grad))
    for k, expected in zip(ours, aligned, strict=True):  # atomics add in any order: 1e-6
        assert selfcheck.scaled_error(k, expected) <= 1e-6


def test_the_raw_kernel_reads_misaligned_locations_as_undefined_behaviour(emulation_root):
    """Why the locations are copied: UBSan stops the emulated kernel on the float2 read
    (in a child process, as UBSan aborts)."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import cuda_emulation, test_ms_deform_attn_emulated as t
from frozenseg.ops import selfcheck
ops = cuda_emulation.load(Path({str(emulation_root)!r}))[800]
(value, shapes, starts, loc, attn), _ = selfcheck.small_case(8, __import__("torch").float32)
ops.forward(value, shapes, starts, t.misaligned(loc), attn)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "misaligned address" in result.stderr and "float2" in result.stderr, result.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_locations_read_zero_like_the_fallback(kernel, bad):
    inputs, grad = selfcheck.small_case(8, torch.float32)
    value, shapes, starts, loc, attn = inputs
    loc[0, 2, 1, 0, 1, 0] = bad
    loc[1, 3, 0, 2, 0, 1] = bad
    ours = selfcheck.forward_backward(ms_deform_attn_cuda, (value, shapes, starts, loc, attn),
                                      grad)
    theirs = selfcheck.forward_backward(ms_deform_attn_fallback,
                                        (value, shapes, starts, loc, attn), grad)
    for k, f in zip(ours, theirs, strict=True):
        assert k.isfinite().all() and selfcheck.scaled_error(k, f) <= 1e-5
    # The points contribute nothing: the same output as with their weights zeroed.
    silenced = attn.clone()
    silenced[loc.isnan().any(-1) | loc.isinf().any(-1)] = 0
    expected = ms_deform_attn_reference(value, shapes, loc.nan_to_num(0.5, 0.5, 0.5), silenced)
    assert selfcheck.scaled_error(ours[0], expected) <= 1e-5
    assert not ours[2][0, 2, 1, 0, 1].any() and not ours[3][0, 2, 1, 0, 1]


@pytest.mark.parametrize("corrupt", ["size", "start"])
def test_levels_that_do_not_tile_value_fail_the_launch(kernel, corrupt):
    """spatial_shapes on the device is not checked on the host: the kernel asserts."""
    (value, shapes, starts, loc, attn), _ = selfcheck.small_case(8, torch.float32)
    if corrupt == "size":
        shapes = shapes.clone()
        shapes[0, 0] += 1  # level 0 one row taller: the levels need more than S positions
    else:
        starts = starts + 1
    with pytest.raises(RuntimeError, match="device-side assert failed"):
        kernel.forward(value, shapes, starts, loc, attn)


def test_a_planted_read_past_the_edge_fails_the_comparison(mutant, monkeypatch):
    """Forward only: in backward the planted bug writes past the end of the value gradient."""
    use_kernel(monkeypatch, mutant)
    inputs, _ = selfcheck.small_case(24, torch.float32)
    with torch.no_grad():
        assert selfcheck.scaled_error(ms_deform_attn_cuda(*inputs),
                                      ms_deform_attn_fallback(*inputs)) <= 1e-5
        monkeypatch.setenv("PLANTED_BUG", "edge")
        assert not selfcheck.scaled_error(ms_deform_attn_cuda(*inputs),  # NaN fails too
                                          ms_deform_attn_fallback(*inputs)) <= 1e-5


@pytest.mark.parametrize("bug, failure", [
    ("fy-for-fx", "grad locations"), ("mask", "not in its mask"),
])
def test_a_planted_bug_fails_the_comparison(mutant, monkeypatch, bug, failure):
    use_kernel(monkeypatch, mutant)
    assert max(selfcheck.kernel_errors("cpu", torch.float32, 24).values()) <= 1e-5
    monkeypatch.setenv("PLANTED_BUG", bug)
    try:
        errors = selfcheck.kernel_errors("cpu", torch.float32, 24)
    except RuntimeError as err:
        assert failure in str(err)
    else:
        assert not errors[failure] <= 1e-5, errors


def test_first_use_self_check_keeps_a_right_kernel_and_drops_a_wrong_one(mutant, monkeypatch):
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)
    use_kernel(monkeypatch, mutant)
    assert choose_backend(fake_cuda_value(24)) == "cuda"
    use_kernel(monkeypatch, mutant)
    monkeypatch.setenv("PLANTED_BUG", "fy-for-fx")
    with pytest.warns(RuntimeWarning, match=r"disagrees with it on cpu .*grad locations off by"):
        assert choose_backend(fake_cuda_value(24)) == "fallback"
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        assert choose_backend(fake_cuda_value(24)) == "fallback"


def test_doctor_prints_the_self_check_per_dtype(mutant, monkeypatch):
    use_kernel(monkeypatch, mutant)
    findings = doctor.kernel_agreement("cpu")
    assert [f.ok for f in findings] == [True] * 3 and "grad weights" in findings[0].value
    monkeypatch.setenv("PLANTED_BUG", "fy-for-fx")
    assert [f.ok for f in doctor.kernel_agreement("cpu")] == [False] * 3
