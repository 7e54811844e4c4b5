"""The deformable-attention op against a float64 loop, its gradients, and its input checks.

Every test runs on the grid_sample fallback and on the CPU kernel (skipped where the
kernel cannot be built); the CUDA kernel's are in test_ms_deform_attn_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from reference import ms_deform_attn_reference, random_inputs

from frozenseg.ops import build, ms_deform_attn
from frozenseg.ops import fallback as fallback_module

SHAPE_CASES = {
    "one-level": [(5, 7)],
    "two-levels-non-square": [(6, 3), (2, 9)],
    "four-levels-dino-like": [(8, 12), (4, 6), (2, 3), (1, 2)],
    "five-levels": [(7, 5), (4, 3), (2, 2), (1, 1), (3, 1)],
}


@pytest.fixture(autouse=True, params=["fallback", "cpu"])
def backend(request, monkeypatch):
    """The back end under test, forced with FROZENSEG_OPS."""
    if request.param == "cpu":
        try:
            build.load_cpu_extension()
        except build.BuildError as err:
            pytest.skip(f"the CPU kernel cannot be built here: {err}")
    monkeypatch.setenv("FROZENSEG_OPS", request.param)
    return request.param


@pytest.mark.parametrize("shapes", SHAPE_CASES.values(), ids=SHAPE_CASES.keys())
@pytest.mark.parametrize("batch", [1, 3])
def test_op_matches_float64_loop(shapes, batch):
    inputs = random_inputs(shapes, batch=batch, queries=4, points=2, seed=batch)
    value, spatial_shapes, _, loc, attn = inputs
    expected = ms_deform_attn_reference(value, spatial_shapes, loc, attn)
    torch.testing.assert_close(ms_deform_attn(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_float32_matches_float64_loop_within_1e5():
    inputs = random_inputs(SHAPE_CASES["four-levels-dino-like"], queries=6, dtype=torch.float32)
    value, spatial_shapes, _, loc, attn = inputs
    expected = ms_deform_attn_reference(value, spatial_shapes, loc, attn)
    out = ms_deform_attn(*inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_locations_far_outside_read_zero():
    value, shapes, starts, loc, attn = random_inputs([(4, 4), (2, 2)], queries=3)
    loc[:, 0] = -0.6  # wholly left of / above every map: no neighbour inside
    loc[:, 1] = 1.6
    loc[:, 2, ..., 0] = 1.0 + 0.5 / 4  # half a pixel right of the last column of level 0
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out[:, :2].abs().max() == 0
    expected = ms_deform_attn_reference(value, shapes, loc, attn)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_locations_read_zero_with_zero_gradients(bad):
    """As in the kernel: the point contributes nothing (grid_sample alone gives NaN)."""
    value, shapes, starts, loc, attn = random_inputs([(4, 4), (2, 2)], queries=3)
    loc[0, 1, 1, 0, 2, 0] = bad
    for t in (value, loc, attn):
        t.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    out.sum().backward()
    silenced = attn.detach().clone()
    silenced[0, 1, 1, 0, 2] = 0
    expected = ms_deform_attn_reference(value, shapes, loc.detach().nan_to_num(0, 0, 0), silenced)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not loc.grad[0, 1, 1, 0, 2].any() and not attn.grad[0, 1, 1, 0, 2]
    assert value.grad.isfinite().all() and loc.grad.isfinite().all()


def test_edge_locations_match_float64_loop():
    """Locations on the map's edges, on pixel centres and one pixel outside: exact zeros
    and exact weights, no neighbour read from the wrong row."""
    value, shapes, starts, loc, attn = random_inputs([(4, 5), (3, 2)], queries=36, points=1)
    for level, (h, w) in enumerate(shapes.tolist()):
        xs = torch.tensor([0.0, 1.0, 0.5 / w, -0.5 / w, 1 + 0.5 / w, (w - 0.5) / w])
        ys = torch.tensor([0.0, 1.0, 0.5 / h, -0.5 / h, 1 + 0.5 / h, (h - 0.5) / h])
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(36, 1, 2)
        loc[:, :, :, level] = grid[None, :, None].double()
    expected = ms_deform_attn_reference(value, shapes, loc, attn)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, attn), expected,
                               rtol=1e-12, atol=1e-12)


def test_empty_query_set_gives_empty_output_and_zero_value_grad():
    value, shapes, starts, loc, attn = random_inputs([(3, 4)], queries=0)
    value.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == (2, 0, value.shape[2] * value.shape[3])
    out.sum().backward()
    assert value.grad.shape == value.shape and value.grad.abs().max() == 0


def test_empty_batch_gives_empty_output_and_gradients():
    """N = 0 (the mask head's box encoder on a batch without a kept proposal) backpropagates."""
    value, shapes, starts, loc, attn = random_inputs([(3, 4), (2, 2)], batch=0)
    for tensor in (value, loc, attn):
        tensor.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == (0, loc.shape[1], value.shape[2] * value.shape[3])
    out.sum().backward()
    assert value.grad.shape == value.shape and loc.grad.shape == loc.shape


def test_chunked_queries_equal_a_single_chunk(monkeypatch, backend):
    if backend != "fallback":
        pytest.skip("query chunks are the fallback's")
    inputs = random_inputs([(6, 5), (3, 3)], queries=23, seed=4)
    whole = ms_deform_attn(*inputs)
    # Budget for ~2 queries per chunk: many chunks, including a short last one.
    monkeypatch.setattr(fallback_module, "CHUNK_ELEMENTS", 2 * 2 * 2 * 4 * 3)
    torch.testing.assert_close(ms_deform_attn(*inputs), whole, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_elements", [1 << 25, 48], ids=["one-chunk", "many-chunks"])
def test_gradcheck_float64(monkeypatch, chunk_elements):
    monkeypatch.setattr(fallback_module, "CHUNK_ELEMENTS", chunk_elements)
    # Keep locations away from pixel-centre lines, where bilinear has kinks.
    value, shapes, starts, loc, attn = random_inputs([(4, 5), (3, 2)], queries=3, margin=0.1)
    for t in (value, loc, attn):
        t.requires_grad_()

    def op(v, sampling_locations, weights):
        return ms_deform_attn(v, shapes, starts, sampling_locations, weights)

    assert torch.autograd.gradcheck(op, (value, loc, attn), eps=1e-6, atol=1e-6)


def test_gradient_matches_float64_loop_autograd():
    value, shapes, starts, loc, attn = random_inputs([(5, 4), (2, 3)], queries=3, seed=7)
    grads = []
    for fn in (
        lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a),
        lambda v, lc, a: ms_deform_attn_reference(v, shapes, lc, a),
    ):
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = fn(*inputs)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([t.grad for t in inputs])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_only_requested_gradients_are_computed():
    value, shapes, starts, loc, attn = random_inputs([(3, 3)], queries=2)
    value.requires_grad_()
    ms_deform_attn(value, shapes, starts, loc, attn).sum().backward()
    assert value.grad is not None and loc.grad is None and attn.grad is None


def test_half_precision_inputs_compute_in_float32():
    value, shapes, starts, loc, attn = random_inputs([(6, 6), (3, 3)], queries=4)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, loc.float(), attn.float())
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_reference(value.bfloat16(), shapes, loc.float(), attn.float())
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


BAD_INPUTS = {
    "value-rank": (lambda v, s, i, lc, a: (v[0], s, i, lc, a), "value must have shape"),
    "shapes-rank": (lambda v, s, i, lc, a: (v, s.flatten(), i, lc, a), "spatial_shapes"),
    "levels-mismatch": (lambda v, s, i, lc, a: (v, s, i[:1], lc, a), "level_start_index"),
    "locations-levels": (lambda v, s, i, lc, a: (v, s, i, lc[:, :, :, :1], a),
                         "sampling_locations has shape"),
    "weights-points": (lambda v, s, i, lc, a: (v, s, i, lc, a[..., :1]), "attention_weights"),
    "heads-mismatch": (lambda v, s, i, lc, a: (v[:, :, :1], s, i, lc, a), "sampling_locations"),
    "value-size": (lambda v, s, i, lc, a: (v[:, 1:], s, i, lc, a), "positions"),
    "start-index": (lambda v, s, i, lc, a: (v, s, i + 1, lc, a), "level_start_index is"),
    "int-value": (lambda v, s, i, lc, a: (v.long(), s, i, lc, a), "value must be a floating"),
    "float-shapes": (lambda v, s, i, lc, a: (v, s.float(), i, lc, a), "spatial_shapes must be"),
    "int-locations": (lambda v, s, i, lc, a: (v, s, i, lc.long(), a), "sampling_locations must"),
    "not-a-tensor": (lambda v, s, i, lc, a: (v, s, i, lc.tolist(), a), "torch.Tensor"),
    "not-pairs": (lambda v, s, i, lc, a: (v, s.flatten().tolist(), i, lc, a),
                  r"spatial_shapes must be a torch.Tensor or a sequence of \(H, W\) pairs"),
    "pairs-value-size": (lambda v, s, i, lc, a: (v[:, 1:], s.tolist(), None, lc, a),
                         "positions"),
    "device-mix": (lambda v, s, i, lc, a: (v, s, i, lc.to("meta"), a), "is on meta"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error_naming_the_argument(case):
    corrupt, message = case
    inputs = corrupt(*random_inputs([(3, 4), (2, 2)], queries=2))
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*inputs)
