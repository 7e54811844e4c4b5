"""MSDeformAttn: Deformable DETR's parameter layout, its init, and what forward computes."""

from __future__ import annotations

import pytest
import torch
from reference import ms_deform_attn_reference

from frozenseg.ops import MSDeformAttn

# Deformable DETR's MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4).
DEFORMABLE_DETR_LAYOUT = {
    "sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
    "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
    "value_proj.weight": (256, 256), "value_proj.bias": (256,),
    "output_proj.weight": (256, 256), "output_proj.bias": (256,),
}


@pytest.fixture(autouse=True)
def _use_fallback(monkeypatch):
    monkeypatch.setenv("FROZENSEG_OPS", "fallback")


def test_state_dict_has_deformable_detr_names_and_shapes():
    layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == DEFORMABLE_DETR_LAYOUT
    layer.load_state_dict({k: torch.randn(s) for k, s in DEFORMABLE_DETR_LAYOUT.items()})


def test_init_points_fan_out_along_each_head_direction():
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    bias = layer.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 looks right, head 1 down, head 2 left, head 3 up; point k is k+1 steps out.
    steps = torch.arange(1, 4, dtype=torch.float32)
    for head, (dx, dy) in enumerate([(1, 0), (0, 1), (-1, 0), (0, -1)]):
        for level in range(2):
            torch.testing.assert_close(bias[head, level, :, 0], dx * steps, atol=1e-6, rtol=0)
            torch.testing.assert_close(bias[head, level, :, 1], dy * steps, atol=1e-6, rtol=0)
    assert layer.attention_weights.weight.abs().max() == 0


def _random_layer_and_inputs(reference_dim, seed=0):
    torch.manual_seed(seed)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shapes = torch.tensor([[5, 6], [3, 2]])
    starts = torch.tensor([0, 30])
    n, q = 2, 4
    query = torch.randn(n, q, 16, dtype=torch.float64)
    memory = torch.randn(n, 36, 16, dtype=torch.float64)
    ref = torch.rand(n, q, 2, reference_dim, dtype=torch.float64) * 0.8 + 0.1
    return layer, query, ref, memory, shapes, starts


def _expected(layer, query, memory, locations, shapes, mask=None):
    n, q, _ = query.shape
    value = layer.value_proj(memory)
    if mask is not None:
        value = value.masked_fill(mask[..., None], 0)
    value = value.view(n, -1, 2, 8)
    weights = layer.attention_weights(query).view(n, q, 2, 6).softmax(-1).view(n, q, 2, 2, 3)
    return layer.output_proj(ms_deform_attn_reference(value, shapes, locations, weights))


def test_forward_with_points_matches_the_definition():
    layer, query, ref, memory, shapes, starts = _random_layer_and_inputs(2)
    offsets = layer.sampling_offsets(query).view(2, 4, 2, 2, 3, 2)
    # Offsets are in pixels of each level: divide by (W, H).
    wh = torch.tensor([[6.0, 5.0], [2.0, 3.0]], dtype=torch.float64)
    locations = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    expected = _expected(layer, query, memory, locations, shapes)
    out = layer(query, ref, memory, shapes, starts)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_forward_with_boxes_scales_offsets_by_half_the_box():
    layer, query, ref, memory, shapes, starts = _random_layer_and_inputs(4, seed=1)
    ref[..., 2:] *= 0.5
    offsets = layer.sampling_offsets(query).view(2, 4, 2, 2, 3, 2)
    centre, size = ref[:, :, None, :, None, :2], ref[:, :, None, :, None, 2:]
    locations = centre + offsets / 3 * size * 0.5
    expected = _expected(layer, query, memory, locations, shapes)
    out = layer(query, ref, memory, shapes, starts)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_padding_mask_removes_padded_positions():
    layer, query, ref, memory, shapes, starts = _random_layer_and_inputs(2, seed=2)
    mask = torch.zeros(2, 36, dtype=torch.bool)
    mask[:, 20:] = True
    out = layer(query, ref, memory, shapes, starts, input_padding_mask=mask)
    changed = memory.clone()
    changed[:, 20:] = 1e3  # whatever sits under the padding must not matter
    again = layer(query, ref, changed, shapes, starts, input_padding_mask=mask)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_bad_reference_points_raise():
    layer, query, ref, memory, shapes, starts = _random_layer_and_inputs(2)
    with pytest.raises(ValueError, match="reference_points"):
        layer(query, ref[..., :1], memory, shapes, starts)


def test_head_dim_must_divide():
    with pytest.raises(ValueError, match="not divisible"):
        MSDeformAttn(d_model=30, n_heads=8)


def test_per_level_points_equal_attention_over_the_real_points_only():
    """Points [1, 3]: padded to 3 per level, the result equals D-FINE's definition, one
    softmax over each head's 4 real points and box offsets in units of size / its level's
    count, computed level by level without padding."""
    torch.manual_seed(3)
    counts = (1, 3)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=counts,
                         projections=False).double()
    assert layer.attention_weights.weight.shape == (2 * 2 * 3, 16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shapes = torch.tensor([[5, 6], [3, 2]])
    query = torch.randn(2, 4, 16, dtype=torch.float64)
    memory = torch.randn(2, 36, 16, dtype=torch.float64)
    ref = torch.rand(2, 4, 1, 4, dtype=torch.float64) * 0.5 + 0.25
    out = layer(query, ref.expand(-1, -1, 2, -1), memory, shapes, None)
    real = [(level, k) for level, n in enumerate(counts) for k in range(n)]
    logits = layer.attention_weights(query).view(2, 4, 2, 2, 3)
    weights = torch.stack([logits[..., lv, k] for lv, k in real], -1).softmax(-1)
    offsets = layer.sampling_offsets(query).view(2, 4, 2, 2, 3, 2)
    value = memory.view(2, 36, 2, 8)
    expected = 0
    for i, (level, k) in enumerate(real):
        location = ref[:, :, None, :, None, :2] + offsets[:, :, :, level:level + 1, k:k + 1] / (
            counts[level]) * ref[:, :, None, :, None, 2:] * 0.5
        start = 0 if level == 0 else 30
        one_level = value[:, start:start + int(shapes[level].prod())]
        expected = expected + ms_deform_attn_reference(
            one_level, shapes[level:level + 1], location, weights[..., i, None, None])
    # the op samples in float32 (module docstring of ops.functional)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_per_level_points_start_on_their_level_and_padding_at_the_reference():
    layer = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=[3, 6, 3])
    bias = layer.sampling_offsets.bias.view(2, 3, 6, 2)
    torch.testing.assert_close(bias[0, 1, :, 0], torch.arange(1.0, 7.0))
    torch.testing.assert_close(bias[0, 0, :3, 0], torch.arange(1.0, 4.0))
    assert not bias[:, 0, 3:].any() and not bias[:, 2, 3:].any()
    assert set(layer.state_dict()) == {"sampling_offsets.weight", "sampling_offsets.bias",
                                       "attention_weights.weight", "attention_weights.bias",
                                       "value_proj.weight", "value_proj.bias",
                                       "output_proj.weight", "output_proj.bias"}
    with pytest.raises(ValueError, match="one per"):
        MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=[3, 6])
