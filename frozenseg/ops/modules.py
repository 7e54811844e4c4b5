"""``MSDeformAttn``: the multi-scale deformable attention layer of Deformable DETR.

Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
``output_proj``) and their layouts are Deformable DETR's, so its checkpoints and
those of DINO, H-Deformable-DETR, detrex and Mask DINO load as they are.

Per-level point counts (D-FINE's ``num_points: [3, 6, 3]``): the op takes one count P on
every level, so each level is padded to the largest count. Its rows stay heads x levels x
P; a padded point's attention logit is -inf before the softmax, so its weight is exactly
zero and the real points share the softmax as if the padding were not there. Converters
scatter a checkpoint's heads x sum(points) rows into this layout (padded rows zero).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from frozenseg.ops.functional import ms_deform_attn
from frozenseg.ops.levels import level_shapes, shapes_tensor


class MSDeformAttn(nn.Module):
    def __init__(
        self, *, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
        n_points: int | Sequence[int] = 4, projections: bool = True,
    ) -> None:
        """``n_points``: sampling points per head on every level, or one count per level
        (padded to the largest: module docstring). ``projections=False``: no value and
        output projections (D-FINE's decoder attends to the memory itself and returns the
        sampled values as they are)."""
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1):
            warnings.warn(
                f"MSDeformAttn head dim {head_dim} is not a power of 2; the CUDA kernel is "
                "fastest with 32 or 64", stacklevel=2,
            )
        counts = [n_points] * n_levels if isinstance(n_points, int) else list(n_points)
        if len(counts) != n_levels or min(counts) < 1:
            raise ValueError(f"n_points={n_points!r}: expected a positive count, or one per "
                             f"each of {n_levels} levels")
        self.d_model, self.n_levels = d_model, n_levels
        self.n_heads, self.n_points, self.level_counts = n_heads, max(counts), tuple(counts)
        # Python values, not buffers: they follow from n_points, and a buffer left out of
        # the state dict stays empty in a model built on the meta device and then loaded.
        self.padded = min(counts) < self.n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * self.n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * self.n_points)
        self.value_proj = nn.Linear(d_model, d_model) if projections else nn.Identity()
        self.output_proj = nn.Linear(d_model, d_model) if projections else nn.Identity()
        self.reset_parameters()

    def _padding(self, device: torch.device) -> torch.Tensor:
        """(L * P,) bool: which of each level's P points are padding."""
        points = torch.arange(self.n_points, device=device)
        counts = torch.tensor(self.level_counts, device=device)
        return (points[None] >= counts[:, None]).flatten()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: point k of head h starts k+1 steps out along direction h
        (padded points at the reference)."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        steps = torch.tensor([[k + 1.0 if k < n else 0.0 for k in range(self.n_points)]
                              for n in self.level_counts])
        grid *= steps.view(1, self.n_levels, self.n_points, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            if isinstance(proj, nn.Identity):
                continue
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: Sequence[tuple[int, int]] | torch.Tensor,
        input_level_start_index: torch.Tensor | None = None,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to P points per head and level around its reference.

        query: (N, Q, C). reference_points: (N, Q, L, 2) normalised (x, y) points,
        or (N, Q, L, 4) normalised (cx, cy, w, h) boxes, in which case offsets are
        scaled by half the box size per point. input_flatten: (N, S, C), the levels
        flattened and concatenated. input_spatial_shapes: the (H, W) of each level, as
        Python int pairs (or Deformable DETR's (L, 2) tensor, read back); its
        input_level_start_index (L,) may be None. input_padding_mask: (N, S), True at
        padding. Returns (N, Q, C).
        """
        n, q, _ = query.shape
        _, s, _ = input_flatten.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        shapes = level_shapes(input_spatial_shapes)
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, q, m, lv * p).float()
        if self.padded:
            weights = weights.masked_fill(self._padding(weights.device), float("-inf"))
        weights = weights.softmax(-1).view(n, q, m, lv, p)
        locations = self.sampling_locations(reference_points, offsets, shapes)
        out = ms_deform_attn(value, shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)

    def sampling_locations(
        self, reference_points: torch.Tensor, offsets: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Normalised sampling locations (N, Q, M, L, P, 2), always in float32."""
        reference_points, offsets = reference_points.float(), offsets.float()
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by its (W, H). Broadcast over
            # rows of L * P * 2 values, not over (x, y) pairs: the same numbers, computed
            # about twice as fast on a CPU (the encoder's many queries make this count).
            n, q, m, lv, p, _ = offsets.shape
            normalizer = shapes_tensor(spatial_shapes, dtype=offsets.dtype,
                                       device=offsets.device).flip(-1)
            row = normalizer[:, None, :].expand(lv, p, 2).reshape(lv * p * 2)
            reference = reference_points[:, :, None, :, None, :].expand(-1, -1, 1, lv, p, 2)
            reference = reference.reshape(reference.shape[0], q, 1, lv * p * 2)
            return (reference + offsets.reshape(n, q, m, lv * p * 2) / row).view(offsets.shape)
        if reference_points.shape[-1] == 4:
            centre = reference_points[:, :, None, :, None, :2]
            half_size = reference_points[:, :, None, :, None, 2:] * 0.5
            if self.padded:  # box offsets in units of box size / each level's own count
                counts = offsets.new_tensor(self.level_counts)[:, None, None]
                return centre + offsets / counts * half_size
            return centre + offsets / self.n_points * half_size
        raise ValueError(
            "reference_points must have shape (N, Q, L, 2) or (N, Q, L, 4), "
            f"got {tuple(reference_points.shape)}"
        )
