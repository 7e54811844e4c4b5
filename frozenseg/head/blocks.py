"""The three block types of the head's encoders, behind one small interface.

A *stack* of blocks maps tokens to tokens: ``forward(tokens (B, S, C), layout) -> (B, S, C)``,
where :class:`TokenLayout` says how the S tokens form maps (Deformable DETR's flattened
multi-scale layout). Two stacks implement it:

- :class:`DeformableStack`: the detector's own :class:`EncoderLayer` with a GELU FFN
  (paper: MSDeformAttn -> LN -> FFN -> LN), on every level at once.
- :class:`MapStack`: Swin or ConvNeXt blocks, channels-last (B, H, W, C) maps, on level 0
  only (the paper applies them to E1 only); other levels pass through unchanged.

Padded batches: a deformable stack reads the padding mask and valid ratios, as the
detector's encoder does. A map stack runs each image's valid crop on its own, so a
padded batch gives exactly what each image alone gives (windows and 7x7 convolutions
would otherwise see the padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from frozenseg.detector.backbones.swin import SwinStage
from frozenseg.detector.transformer import Encoder, EncoderLayer
from frozenseg.ops.levels import level_starts
from frozenseg.ops.tracing import tensor_values


@dataclass
class TokenLayout:
    """How a (B, S, C) token tensor is laid out.

    shapes        (H, W) of each level, int pairs (:meth:`starts`: its first token)
    valid_ratios  (B, L, 2)     unpadded fraction (w, h) of each level
    padding_mask  (B, S) bool   True at padding, or None when nothing is padded
    pos           (B or 1, S, C) positional embedding added to attention queries, or None
    """

    shapes: list[tuple[int, int]]
    valid_ratios: Tensor
    padding_mask: Tensor | None = None
    pos: Tensor | None = None

    @classmethod
    def single_map(cls, batch: int, height: int, width: int, *, like: Tensor,
                   pos: Tensor | None = None) -> TokenLayout:
        """One unpadded H x W level (a RoI), for ``batch`` maps."""
        ratios = torch.ones(batch, 1, 2, dtype=like.dtype, device=like.device)
        return cls(shapes=[(height, width)], valid_ratios=ratios, pos=pos)

    def starts(self) -> list[int]:
        """The first token of each level."""
        return level_starts(self.shapes)

    def valid_sizes(self, level: int = 0) -> list[tuple[int, int]]:
        """Unpadded (h, w) of ``level`` for each map, counted from the padding mask."""
        h, w = self.shapes[level]
        batch = self.valid_ratios.shape[0]
        if self.padding_mask is None:
            return [(h, w)] * batch
        start = self.starts()[level]
        valid = ~self.padding_mask[:, start : start + h * w].view(-1, h, w)
        return list(zip(tensor_values(valid[:, :, 0].sum(1)),
                        tensor_values(valid[:, 0, :].sum(1)), strict=True))


class DeformableStack(nn.Module):
    """Deformable encoder layers (GELU FFN) over all levels; reference points as the detector."""

    def __init__(self, *, depth: int, dim: int, ffn_dim: int, levels: int, heads: int,
                 points: int) -> None:
        super().__init__()
        layers = [EncoderLayer(dim=dim, ffn_dim=ffn_dim, levels=levels, heads=heads,
                               points=points, activation="gelu") for _ in range(depth)]
        self.encoder = Encoder(layers=layers)

    def forward(self, tokens: Tensor, layout: TokenLayout) -> Tensor:
        pos = layout.pos if layout.pos is not None else torch.zeros_like(tokens[:1])
        outputs = self.encoder(tokens, pos.to(tokens.dtype), layout.shapes,
                               layout.valid_ratios.to(tokens.dtype), layout.padding_mask)
        return outputs[-1]


class MapStack(nn.Module):
    """Map blocks ``(B, H, W, C) -> (B, H, W, C)`` applied to level 0 of the tokens."""

    def __init__(self, *, blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, tokens: Tensor, layout: TokenLayout) -> Tensor:
        (h, w), start = layout.shapes[0], layout.starts()[0]
        level0 = tokens[:, start : start + h * w].view(-1, h, w, tokens.shape[-1])
        sizes = layout.valid_sizes(0)
        if all(size == (h, w) for size in sizes):
            out = self.blocks(level0)
        else:
            # Each image's valid crop alone: windows and convolutions must not see padding.
            out = level0.clone()
            for i, (hi, wi) in enumerate(sizes):
                out[i, :hi, :wi] = self.blocks(level0[i : i + 1, :hi, :wi])[0]
        return torch.cat([tokens[:, :start], out.flatten(1, 2), tokens[:, start + h * w :]], 1)


class SwinBlocks(nn.Module):
    """The backbone's Swin stage without downsampling: blocks alternate plain / shifted
    windows, and maps that are not window multiples are zero-padded (official Swin)."""

    def __init__(self, *, depth: int, dim: int, heads: int, window: int, ffn_dim: int) -> None:
        super().__init__()
        self.stage = SwinStage(dim, depth, heads, window, downsample=False,
                               mlp_ratio=ffn_dim / dim, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(x)[0]


class ConvNeXtBlock(nn.Module):
    """x + FFN(LN(DWConv7x7(x))) with FFN = Linear -> GELU -> Linear; (B, H, W, C) in and out.

    The depth-wise convolution zero-pads its borders. No layer scale (the paper lists none).
    """

    def __init__(self, *, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.linear2(self.act(self.linear1(self.norm(y))))


def build_stack(kind: str, *, depth: int, dim: int, ffn_dim: int, levels: int, heads: int,
                points: int, window: int) -> nn.Module | None:
    """A stack of ``depth`` blocks of ``kind`` ("deformable" | "swin" | "convnext"), or None
    for "none" or depth 0 (the encoder is then the identity)."""
    if kind == "none" or depth == 0:
        return None
    if kind == "deformable":
        return DeformableStack(depth=depth, dim=dim, ffn_dim=ffn_dim, levels=levels,
                               heads=heads, points=points)
    if kind == "swin":
        blocks = SwinBlocks(depth=depth, dim=dim, heads=heads, window=window, ffn_dim=ffn_dim)
    elif kind == "convnext":
        blocks = nn.Sequential(*(ConvNeXtBlock(dim=dim, ffn_dim=ffn_dim) for _ in range(depth)))
    else:
        raise ValueError(f"block type is {kind!r}; one of deformable, swin, convnext, none")
    return MapStack(blocks=blocks)
