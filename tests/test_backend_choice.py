"""Which back end runs, what happens when a kernel cannot be built, and fallback memory."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from reference import random_inputs

from frozenseg.ops import build, choose_backend, ms_deform_attn, selfcheck
from frozenseg.ops import functional as op_module
from frozenseg.ops.fallback import ms_deform_attn_fallback


def fake_cuda_value(head_dim=32, dtype=torch.float32):
    """Stands in for a CUDA tensor: choose_backend only reads is_cuda, shape, dtype and
    device (where the self-check runs: the CPU here)."""
    return types.SimpleNamespace(is_cuda=True, shape=(2, 10, 8, head_dim), dtype=dtype,
                                 device=torch.device("cpu"))


@pytest.fixture
def failing_build(monkeypatch):
    def fail(archs=None):
        raise build.BuildError("nvcc not found (set CUDA_HOME to the CUDA toolkit)")

    monkeypatch.setattr(build, "load_extension", fail)
    monkeypatch.setattr(op_module, "_warned", set())
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)


@pytest.fixture
def failing_cpu_build(monkeypatch):
    def fail():
        raise build.BuildError("no C++ compiler: c++ not found (set CXX or install g++)")

    monkeypatch.setattr(build, "load_cpu_extension", fail)
    monkeypatch.setattr(op_module, "_warned", set())
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)


def test_cpu_tensors_use_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)
    monkeypatch.setattr(build, "load_cpu_extension", lambda: object())
    assert choose_backend(torch.zeros(1, 1, 1, 4)) == "cpu"
    assert choose_backend(torch.zeros(1, 1, 1, 4, device="meta")) == "fallback"


def test_cpu_build_failure_warns_once_then_falls_back(failing_cpu_build):
    with pytest.warns(RuntimeWarning, match="the CPU op could not be built: no C.. compiler"):
        assert choose_backend(torch.zeros(1, 1, 1, 4)) == "fallback"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*random_inputs([(2, 2)], queries=1))
    assert out.shape == (2, 1, 8)


def test_forcing_cpu_when_it_cannot_build_is_an_error(failing_cpu_build, monkeypatch):
    monkeypatch.setenv("FROZENSEG_OPS", "cpu")
    with pytest.raises(RuntimeError, match="FROZENSEG_OPS=cpu but the CPU op could not be built"):
        choose_backend(torch.zeros(1, 1, 1, 4))


def test_forcing_cpu_on_cuda_tensors_is_an_error(monkeypatch):
    monkeypatch.setenv("FROZENSEG_OPS", "cpu")
    with pytest.raises(ValueError, match="not on the CPU"):
        choose_backend(fake_cuda_value())


def test_build_failure_takes_triton_where_torch_ships_it(failing_build, monkeypatch):
    """No nvcc (most pip installs): the Triton kernel, silently; forced, it is taken even
    where the CUDA kernel builds."""
    monkeypatch.setattr(op_module, "triton_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_backend(fake_cuda_value()) == "triton"
    monkeypatch.setattr(build, "load_extension", lambda archs=None: object())
    monkeypatch.setenv("FROZENSEG_OPS", "triton")
    assert choose_backend(fake_cuda_value()) == "triton"
    monkeypatch.setattr(op_module, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="FROZENSEG_OPS=triton but Triton is not installed"):
        choose_backend(fake_cuda_value())


def test_build_failure_without_triton_warns_once_then_falls_back(failing_build, monkeypatch):
    monkeypatch.setattr(op_module, "triton_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="nvcc not found"):
        assert choose_backend(fake_cuda_value()) == "fallback"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_backend(fake_cuda_value()) == "fallback"


def test_forcing_cuda_when_it_cannot_build_is_an_error(failing_build, monkeypatch):
    monkeypatch.setenv("FROZENSEG_OPS", "cuda")
    with pytest.raises(RuntimeError, match="FROZENSEG_OPS=cuda but the CUDA op could not be built"):
        choose_backend(fake_cuda_value())


def test_forcing_cuda_on_cpu_tensors_is_an_error(monkeypatch):
    monkeypatch.setenv("FROZENSEG_OPS", "cuda")
    with pytest.raises(ValueError, match="not a CUDA device"):
        ms_deform_attn(*random_inputs([(2, 2)], queries=1))


def test_unknown_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv("FROZENSEG_OPS", "tpu")
    with pytest.raises(ValueError, match="expected one of cpu, cuda, triton, fallback"):
        choose_backend(torch.zeros(1, 1, 1, 4))


@pytest.mark.parametrize(
    "head_dim, dtype, reason",
    [(264, torch.float32, "head dim 264"), (32, torch.float64, "float64 has no kernel")],
)
def test_inputs_the_kernel_cannot_take_fall_back(monkeypatch, head_dim, dtype, reason):
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)
    monkeypatch.setattr(op_module, "_warned", set())
    monkeypatch.setattr(build, "load_extension", lambda archs=None: object())
    monkeypatch.setattr(selfcheck, "kernel_disagreement", lambda *args: None)
    with pytest.warns(RuntimeWarning, match=reason):
        assert choose_backend(fake_cuda_value(head_dim, dtype)) == "fallback"
    assert choose_backend(fake_cuda_value(32, torch.bfloat16)) == "cuda"


def test_a_kernel_that_disagrees_with_the_fallback_is_dropped_with_one_warning(monkeypatch):
    """The first-use self-check, on the CPU: a wrong kernel entry point stands in for a GPU
    that computes wrongly; a right one (the fallback itself) passes."""
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)
    monkeypatch.setattr(op_module, "_warned", set())
    monkeypatch.setattr(build, "load_extension", lambda archs=None: object())
    for entry_point, backend in ((ms_deform_attn_fallback, "cuda"),
                                 (lambda *args: 1.01 * ms_deform_attn_fallback(*args), "fallback")):
        monkeypatch.setattr(selfcheck, "_verdicts", {})
        monkeypatch.setattr(op_module, "ms_deform_attn_cuda", entry_point)
        if backend == "fallback":
            with pytest.warns(RuntimeWarning, match="disagrees with it on cpu .*output off by"):
                assert choose_backend(fake_cuda_value()) == backend
        with warnings.catch_warnings():  # no warning for a right kernel, one for a wrong one
            warnings.simplefilter("error")
            assert choose_backend(fake_cuda_value()) == backend


def test_fallback_keeps_only_its_inputs_for_backward(monkeypatch):
    """Training memory stays flat: no (batch*heads, D, Q, P) sample survives the forward."""
    monkeypatch.setenv("FROZENSEG_OPS", "fallback")
    value, shapes, starts, loc, attn = random_inputs(
        [(16, 24), (8, 12), (4, 6)], batch=2, queries=500, heads=4, head_dim=32, points=4,
        dtype=torch.float32,
    )
    for t in (value, loc, attn):
        t.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    inputs = value.numel() + loc.numel() + attn.numel()
    one_level_samples = 2 * 4 * 32 * 500 * 4
    assert sum(saved) <= inputs < one_level_samples
    out.sum().backward()
    assert value.grad is not None and loc.grad is not None and attn.grad is not None
