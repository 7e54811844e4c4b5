"""The Triton back end, run by Triton's interpreter on the CPU, against the float64 loop.

Without a GPU, conftest.py sets ``TRITON_INTERPRET=1``: Triton then executes the kernels'
Python with numpy, program by program, so every line of the back end a GPU would compile
runs here. Shapes are tiny: the interpreter takes milliseconds per program.
"""

from __future__ import annotations

import pytest
import torch
from reference import ms_deform_attn_reference, random_inputs

from frozenseg.ops import ms_deform_attn_fallback, ms_deform_attn_triton

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")
LEVELS = [(6, 5), (3, 4), (1, 1)]  # non-square, and a 1 x 1 level
# On a GPU machine the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_op(*inputs: torch.Tensor) -> torch.Tensor:
    """The Triton back end on DEVICE, its result back on the CPU (autograd follows)."""
    return ms_deform_attn_triton(*(t.to(DEVICE) for t in inputs)).cpu()


def _gradients(op, inputs, grad_output):
    value, shapes, starts, loc, attn = (t.clone() for t in inputs)
    for t in (value, loc, attn):
        t.requires_grad_()
    op(value, shapes, starts, loc, attn).backward(grad_output)
    return value.grad, loc.grad, attn.grad


@pytest.mark.parametrize("head_dim", [1, 3, 8, 32])
def test_forward_matches_the_float64_loop(head_dim):
    inputs = random_inputs(LEVELS, batch=2, queries=3, heads=2, head_dim=head_dim, points=2,
                           dtype=torch.float32, margin=0.3)
    value, shapes, _, loc, attn = inputs
    out = triton_op(*inputs)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2 * head_dim)
    expected = ms_deform_attn_reference(value, shapes, loc, attn)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_values_accumulate_in_float32(dtype, tolerance):
    inputs = random_inputs(LEVELS, batch=1, queries=3, heads=2, head_dim=8, points=2)
    value, shapes, starts, loc, attn = inputs
    out = triton_op(value.to(dtype), shapes, starts, loc.float(), attn.float())
    assert out.dtype == dtype
    expected = ms_deform_attn_reference(value.to(dtype), shapes, loc, attn)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)


def test_gradients_match_the_fallback_in_float64():
    inputs = random_inputs(LEVELS, batch=2, queries=3, heads=2, head_dim=8, points=2,
                           margin=0.3)
    grad_output = torch.randn(2, 3, 16, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(5))
    got = _gradients(triton_op, [t.float() if t.is_floating_point() else t
                                             for t in inputs], grad_output.float())
    expected = _gradients(ms_deform_attn_fallback, inputs, grad_output)
    for name, mine, theirs in zip(("value", "locations", "weights"), got, expected,
                                  strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=0, atol=2e-5, msg=name)


def test_locations_outside_and_on_the_edges():
    """Points beyond the map read zero; those on its border pixels' centres read them."""
    value, shapes, starts, loc, attn = random_inputs([(4, 4), (2, 2)], batch=1, queries=4,
                                                     heads=1, head_dim=4, points=2,
                                                     dtype=torch.float32)
    loc[:, 0] = -0.6  # wholly left of and above every map
    loc[:, 1] = 1.6
    loc[:, 2, ..., 0] = 1.0 + 0.5 / 4  # half a pixel right of level 0's last column
    loc[:, 3, :, 0] = torch.tensor([0.5 / 4, 3.5 / 4])  # the border pixels' centres
    out = triton_op(value, shapes, starts, loc, attn)
    assert out[:, :2].abs().max() == 0
    expected = ms_deform_attn_reference(value, shapes, loc, attn)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_no_queries_give_an_empty_output_and_zero_gradients():
    inputs = random_inputs([(3, 4)], batch=2, queries=0, dtype=torch.float32)
    value = inputs[0].clone().requires_grad_()
    out = triton_op(value, *inputs[1:])
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert value.grad.abs().max() == 0
