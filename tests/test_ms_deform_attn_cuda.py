"""The CUDA kernel against the float64 loop and the fallback (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from reference import ms_deform_attn_reference, random_inputs

from frozenseg.ops import ms_deform_attn, ms_deform_attn_cuda, ms_deform_attn_fallback

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DINO_LIKE = [(16, 24), (8, 12), (4, 6), (2, 3)]


def _cuda(inputs, dtype):
    value, shapes, starts, loc, attn = (t.cuda() for t in inputs)
    return value.to(dtype), shapes, starts, loc.float(), attn.float()


@pytest.mark.parametrize("head_dim", [32, 64, 8, 24, 256, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_float32_matches_float64_loop_within_1e5(head_dim, batch):
    inputs = random_inputs(DINO_LIKE, batch=batch, queries=7, heads=2, head_dim=head_dim, points=4)
    expected = ms_deform_attn_reference(inputs[0], inputs[1], inputs[3], inputs[4])
    out = ms_deform_attn_cuda(*_cuda(inputs, torch.float32))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 24])
def test_kernel_gradients_match_the_fallback(dtype, head_dim):
    inputs = random_inputs(DINO_LIKE, batch=2, queries=40, heads=4, head_dim=head_dim, points=4)
    grad = torch.randn(2, 40, 4 * head_dim, dtype=torch.float64)
    results = []
    for op, device in ((ms_deform_attn_cuda, "cuda"), (ms_deform_attn_fallback, "cpu")):
        value, shapes, starts, loc, attn = (t.to(device) for t in _cuda(inputs, dtype))
        for t in (value, loc, attn):
            t.requires_grad_()
        out = op(value, shapes, starts, loc, attn)
        out.backward(grad.to(device, dtype))
        results.append([out, value.grad, loc.grad, attn.grad])
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for kernel, fallback in zip(*results, strict=True):
        assert kernel.dtype == fallback.dtype
        scale = max(1.0, fallback.abs().max().item())
        torch.testing.assert_close(kernel.cpu().double() / scale, fallback.double() / scale,
                                   rtol=0, atol=tol)


def test_kernel_gradcheck_float32_against_finite_differences():
    inputs = random_inputs([(6, 5), (3, 4)], batch=1, queries=3, heads=2, head_dim=4, margin=0.1)
    value, shapes, starts, loc, attn = _cuda(inputs, torch.float32)
    for t in (value, attn):
        t.requires_grad_()
    # float32 finite differences: value and weights enter linearly, so this is exact enough.
    assert torch.autograd.gradcheck(
        lambda v, a: ms_deform_attn_cuda(v, shapes, starts, loc, a), (value, attn),
        eps=1e-2, atol=1e-3, rtol=1e-3,
    )


def test_dispatch_picks_the_kernel_and_empty_queries_work(monkeypatch):
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)
    value, shapes, starts, loc, attn = _cuda(random_inputs([(4, 4)], queries=0), torch.float32)
    value.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == (2, 0, 8) and out.is_cuda
    out.sum().backward()
    assert value.grad.abs().max() == 0


def test_misaligned_value_still_matches(monkeypatch):
    inputs = random_inputs(DINO_LIKE, queries=5, heads=2, head_dim=32)
    value, shapes, starts, loc, attn = _cuda(inputs, torch.float32)
    storage = torch.zeros(value.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(value)  # 4-byte aligned only: forces scalar loads
    shifted.copy_(value)
    torch.testing.assert_close(
        ms_deform_attn_cuda(shifted, shapes, starts, loc, attn),
        ms_deform_attn_cuda(value, shapes, starts, loc, attn), rtol=0, atol=0,
    )
