"""The CPU kernel beyond test_ms_deform_attn.py (which runs every op test on it too):
head dims, bfloat16, thread counts, strides, the default choice, and a failing build."""

from __future__ import annotations

import shutil

import pytest
import torch
from reference import ms_deform_attn_reference, random_inputs

from frozenseg.ops import build, choose_backend, ms_deform_attn_cpu, ms_deform_attn_fallback

DINO_LIKE = [(16, 24), (8, 12), (4, 6), (2, 3)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    try:
        return build.load_cpu_extension()
    except build.BuildError as err:
        pytest.skip(f"the CPU kernel cannot be built here: {err}")


def forward_backward(op, inputs, grad):
    """op's output and the gradients of value, locations and weights for grad."""
    value, shapes, starts, loc, attn = (t.detach().clone() for t in inputs)
    for t in (value, loc, attn):
        t.requires_grad_()
    out = op(value, shapes, starts, loc, attn)
    out.backward(grad.to(out.dtype))
    return [out, value.grad, loc.grad, attn.grad]


@pytest.mark.parametrize("head_dim", [32, 64, 3, 12])
def test_float32_matches_float64_loop_within_1e5(head_dim):
    """Head dims that fill the kernel's 8-channel lanes and ones that leave a remainder."""
    inputs = random_inputs(DINO_LIKE, queries=5, heads=2, head_dim=head_dim, points=4)
    expected = ms_deform_attn_reference(inputs[0], inputs[1], inputs[3], inputs[4])
    out = ms_deform_attn_cpu(*(t.float() if t.is_floating_point() else t for t in inputs))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradients_match_the_fallback(dtype):
    """Half precision within its bounds (bfloat16: 8 bits of mantissa) in the value, the
    output and the value's gradient; both accumulate in float32."""
    inputs = random_inputs(DINO_LIKE, queries=40, heads=4, head_dim=32, points=4)
    inputs = (inputs[0].to(dtype), inputs[1], inputs[2], inputs[3].float(), inputs[4].float())
    grad = torch.randn(2, 40, 4 * 32, generator=torch.Generator().manual_seed(1))
    kernel = forward_backward(ms_deform_attn_cpu, inputs, grad)
    fallback = forward_backward(ms_deform_attn_fallback, inputs, grad)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for ours, theirs in zip(kernel, fallback, strict=True):
        assert ours.dtype == theirs.dtype
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours.double() / scale, theirs.double() / scale,
                                   rtol=0, atol=tol)


def test_one_and_two_threads_give_identical_results():
    """Each (batch, head) slice of the value gradient is one thread's, summed in one order."""
    inputs = random_inputs(DINO_LIKE, batch=3, queries=64, heads=4, head_dim=32, points=4,
                           dtype=torch.float32)
    grad = torch.randn(3, 64, 4 * 32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(forward_backward(ms_deform_attn_cpu, inputs, grad))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_strided_and_offset_inputs_match_contiguous_ones():
    value, shapes, starts, loc, attn = random_inputs([(5, 7), (3, 2)], queries=6, head_dim=5)
    # A view with a storage offset and an odd stride: every second row of a padded buffer.
    storage = torch.randn(1 + 2 * value.numel(), dtype=value.dtype)
    odd_value = storage[1:].view(*value.shape[:-1], 2 * value.shape[-1])[..., ::2]
    odd_value.copy_(value)
    odd_loc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    odd_attn = torch.cat([attn, attn], dim=-1)[..., : attn.shape[-1]]
    odd_shapes = torch.stack([shapes, shapes], dim=-1).flatten(1)[:, ::2].int()  # strided int32
    odd = forward_backward(ms_deform_attn_cpu, (odd_value, odd_shapes, starts, odd_loc, odd_attn),
                           torch.ones(2, 6, value.shape[2] * 5))
    plain = forward_backward(ms_deform_attn_cpu, (value, shapes, starts, loc, attn),
                             torch.ones(2, 6, value.shape[2] * 5))
    for a, b in zip(odd, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_tensors_use_the_kernel_by_default(monkeypatch):
    monkeypatch.delenv("FROZENSEG_OPS", raising=False)
    assert choose_backend(torch.zeros(1, 1, 1, 4)) == "cpu"


def test_a_broken_source_fails_with_its_first_compiler_error(tmp_path, monkeypatch):
    sources = tmp_path / "cuda"
    shutil.copytree(build.source_dir(), sources)
    kernel_source = sources / build.CPU_SOURCES[0]
    kernel_source.write_text(kernel_source.read_text() + "\nstatic int broken = undeclared_name;\n")
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setenv("FROZENSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_loaded", {})
    with pytest.raises(build.BuildError, match="error: .undeclared_name. was not declared"):
        build.load_cpu_extension()
