"""``frozenseg::ms_deform_attn`` as torch sees it: opcheck, torch.compile with no graph
break, torch.export (one node), and gradients through the op against the float64 loop."""

from __future__ import annotations

import pytest
import torch
from reference import ms_deform_attn_reference, random_inputs
from test_frozen_detector import images, tiny_detector

from frozenseg.ops import MSDeformAttn, build, ms_deform_attn
from frozenseg.ops.levels import flat_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

OP = torch.ops.frozenseg.ms_deform_attn.default
BACKWARD_OP = torch.ops.frozenseg.ms_deform_attn_backward.default
SHAPES = {"one-level": [(5, 7)], "three-levels": [(6, 4), (3, 2), (1, 1)]}


def backends():
    try:
        build.load_cpu_extension()
    except build.BuildError:
        return ["fallback"]
    return ["fallback", "cpu"]


def op_args(shapes, dtype, backend, *, grad=False, queries=3, seed=0):
    value, _, _, loc, attn = random_inputs(shapes, queries=queries, dtype=dtype, seed=seed)
    for t in (value, loc, attn):
        t.requires_grad_(grad)
    return (value, flat_shapes(shapes), loc, attn, backend)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck(backend, dtype, shapes, grad):
    args = op_args(shapes, dtype, backend, grad=grad)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("backend", backends())
def test_opcheck_backward_and_half_precision_value(backend):
    value, shapes, loc, attn, _ = op_args(SHAPES["three-levels"], torch.float32, backend)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    torch.library.opcheck(BACKWARD_OP, (grad, value, shapes, loc, attn, backend))
    torch.library.opcheck(OP, (value.bfloat16().requires_grad_(), shapes, loc, attn, backend))


@pytest.mark.parametrize("backend", backends())
def test_gradients_through_the_op_match_the_float64_loop(backend, monkeypatch):
    monkeypatch.setenv("FROZENSEG_OPS", backend)
    value, shapes, starts, loc, attn = random_inputs([(5, 4), (2, 3)], queries=4, seed=3)
    pairs = shapes.tolist()
    grads = []
    for fn in (lambda v, lc, a: ms_deform_attn(v, pairs, None, lc, a),
               lambda v, lc, a: ms_deform_attn_reference(v, shapes, lc, a)):
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = fn(*inputs)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([out.detach(), *(t.grad for t in inputs)])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_tensor_and_int_shapes_give_the_same_answer():
    value, shapes, starts, loc, attn = random_inputs(SHAPES["three-levels"], queries=4)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, attn),
                               ms_deform_attn(value, shapes.tolist(), None, loc, attn),
                               rtol=0, atol=0)


def test_compiled_op_has_no_graph_break_and_equals_eager():
    value, shapes, _, loc, attn = random_inputs(SHAPES["three-levels"], queries=4,
                                                dtype=torch.float32)
    pairs = [tuple(s) for s in shapes.tolist()]
    for t in (value, loc, attn):
        t.requires_grad_()

    def attend(v, lc, a):
        return ms_deform_attn(v, pairs, None, lc, a).square().sum()

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(attend(value, loc, attn), (value, loc, attn))
    compiled_grads = torch.autograd.grad(compiled(value, loc, attn), (value, loc, attn))
    for ours, ref in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_exported_module_holds_the_op_as_one_node():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).eval()

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, query, reference, memory_a, memory_b):
            maps = (memory_a, memory_b)  # (N, C, H, W) each: shapes from the inputs
            shapes = [tuple(m.shape[-2:]) for m in maps]
            tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
            return self.layer(query, reference, tokens, shapes)

    args = (torch.randn(1, 5, 16), torch.rand(1, 5, 2, 2), torch.randn(1, 16, 6, 4),
            torch.randn(1, 16, 3, 2))
    sizes = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}  # H and W stay free
    exported = torch.export.export(Attend(), args,
                                   dynamic_shapes=(None, None, sizes, sizes))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(OP) == 1
    torch.testing.assert_close(exported.module()(*args), Attend()(*args), rtol=0, atol=0)
    wider = (args[0], args[1], torch.randn(1, 16, 8, 5), torch.randn(1, 16, 4, 3))
    torch.testing.assert_close(exported.module()(*wider), Attend()(*wider), rtol=0, atol=0)


def test_compiled_frozen_detector_has_no_graph_break_and_equals_eager():
    """Two-stage (proposal top-k) with box refinement: every deformable attention of the
    encoder and decoder is the op, with level shapes as ints."""
    detector = tiny_detector(query_init="proposals", box_refine=True)
    batch = images((64, 96), (48, 80))
    eager = detector(batch)
    compiled = torch.compile(detector, fullgraph=True, backend="aot_eager")(batch)
    for name in ("queries", "boxes", "scores", "memory", "spatial_shapes"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name),
                                   rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(compiled.labels, eager.labels)
    assert compiled.level_shapes == eager.level_shapes == [(8, 12), (4, 6), (2, 3), (1, 2)]
