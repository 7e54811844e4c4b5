"""RT-DETR's hybrid encoder: AIFI on the coarsest level, then CCFM cross-scale fusion.

AIFI (attention-based intra-scale feature interaction) is a plain post-norm transformer
encoder (multi-head self-attention, GELU FFN) over one level's positions, with a fixed 2-d
sine position embedding added to queries and keys. CCFM (CNN-based cross-scale feature
fusion) is an FPN top-down pass (1x1 lateral conv, nearest 2x upsampling, concatenation,
CSP block) followed by a PAN bottom-up pass (3x3 stride-2 conv, concatenation, CSP block);
a CSP block is two 1x1 ConvNorm branches, one through RepVGG blocks (3x3 + 1x1 ConvNorm,
summed, SiLU), added. Parameter names follow lyuwenyu/RT-DETR's ``HybridEncoder``
(``input_proj``, ``encoder.i.layers.j``, ``lateral_convs``, ``fpn_blocks``,
``downsample_convs``, ``pan_blocks``).

DEIMv2's small models replace it with :class:`LiteEncoder` (no attention, two levels).

D-FINE's variant (``elan_fusion``) fuses with RepNCSPELAN4 blocks, downsamples with SCDown
(1x1, then depthwise 3x3 stride 2) and has laterals without activation; their names are
transformers' ``DFineHybridEncoder`` ones.

Maps are (B, C, H, W); levels run from fine (stride 8) to coarse (stride 32). The encoder
has no padding mask: as in RT-DETR, a padded batch is one canvas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from frozenseg.detector.conv import ConvNorm
from frozenseg.detector.position import grid_position_embedding
from frozenseg.detector.transformer import ACTIVATIONS


class AttentionEncoderLayer(nn.Module):
    """Self-attention (position on queries and keys) -> add & norm1 -> FFN -> add & norm2.

    ``activation``: the FFN's, "gelu" (AIFI) or "relu" (Grounding DINO's text enhancer).
    """

    def __init__(self, *, dim: int, ffn_dim: int, heads: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src: (B, S, C); pos: (S, C) or (B, S, C); attn_mask: (S, S) bool, True where
        position i may not see position j."""
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, src, attn_mask=attn_mask,
                                              need_weights=False)[0])
        return self.norm2(src + self.linear2(self.activation(self.linear1(src))))


class AIFI(nn.Module):
    """``layers`` over one map: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, *, layers: list[AttentionEncoderLayer], temperature: float,
                 transposed_grid: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.temperature, self.transposed_grid = temperature, transposed_grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        src = x.flatten(2).transpose(1, 2)
        pos = grid_position_embedding(h, w, dim=c, temperature=self.temperature, like=src,
                                      transposed=self.transposed_grid)
        for layer in self.layers:
            src = layer(src, pos)
        return src.transpose(1, 2).reshape(b, c, h, w)


class RepVggBlock(nn.Module):
    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_dim=dim, out_dim=dim, kernel=3)
        self.conv2 = ConvNorm(in_dim=dim, out_dim=dim, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """(B, in_dim, H, W) -> (B, out_dim, H, W): conv3(bottlenecks(conv1(x)) + conv2(x))."""

    def __init__(self, *, in_dim: int, out_dim: int, blocks: int, expansion: float) -> None:
        super().__init__()
        hidden = int(out_dim * expansion)
        self.conv1 = ConvNorm(in_dim=in_dim, out_dim=hidden, kernel=1, activation="silu")
        self.conv2 = ConvNorm(in_dim=in_dim, out_dim=hidden, kernel=1, activation="silu")
        self.bottlenecks = nn.Sequential(*[RepVggBlock(dim=hidden) for _ in range(blocks)])
        self.conv3 = (ConvNorm(in_dim=hidden, out_dim=out_dim, kernel=1, activation="silu")
                      if hidden != out_dim else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class RepNCSPELAN4(nn.Module):
    """D-FINE's fusion block, (B, 2 dim, H, W) -> (B, dim, H, W): conv1 (1x1) splits into two
    halves; the second goes through CSP block + 3x3 ConvNorm twice (``csp_rep1``, ``conv2``,
    ``csp_rep2``, ``conv3``, ``width`` wide); both halves and both branch outputs are
    concatenated and fused by conv4 (1x1). Names are transformers' ``DFineRepNCSPELAN4``."""

    def __init__(self, *, dim: int, width: int, blocks: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_dim=2 * dim, out_dim=2 * dim, kernel=1, activation="silu")
        self.csp_rep1 = CSPRepLayer(in_dim=dim, out_dim=width, blocks=blocks, expansion=1.0)
        self.conv2 = ConvNorm(in_dim=width, out_dim=width, kernel=3, activation="silu")
        self.csp_rep2 = CSPRepLayer(in_dim=width, out_dim=width, blocks=blocks, expansion=1.0)
        self.conv3 = ConvNorm(in_dim=width, out_dim=width, kernel=3, activation="silu")
        self.conv4 = ConvNorm(in_dim=2 * dim + 2 * width, out_dim=dim, kernel=1,
                              activation="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = list(self.conv1(x).chunk(2, 1))
        first = self.conv2(self.csp_rep1(halves[-1]))
        second = self.conv3(self.csp_rep2(first))
        return self.conv4(torch.cat([*halves, first, second], 1))


class SCDown(nn.Sequential):
    """D-FINE's downsampling: 1x1 ConvNorm, then a depthwise 3x3 stride-2 ConvNorm."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_dim=dim, out_dim=dim, kernel=1)
        self.conv2 = ConvNorm(in_dim=dim, out_dim=dim, kernel=3, stride=2, groups=dim)


class SplitCSPLayer(nn.Module):
    """DEIMv2's CSP block, (B, in_dim, H, W) -> (B, out_dim, H, W): one 1x1 ConvNorm split
    into a residual and a path through RepVGG blocks, added, then a 3x3 ConvNorm
    (``trailing``) or nothing."""

    def __init__(self, *, in_dim: int, out_dim: int, blocks: int, trailing: bool) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_dim=in_dim, out_dim=2 * out_dim, kernel=1, activation="silu")
        self.bottlenecks = nn.Sequential(*[RepVggBlock(dim=out_dim) for _ in range(blocks)])
        self.conv2 = (ConvNorm(in_dim=out_dim, out_dim=out_dim, kernel=3, activation="silu")
                      if trailing else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual, path = self.conv1(x).chunk(2, 1)
        return self.conv2(residual + self.bottlenecks(path))


class RepNCSPELAN5(nn.Module):
    """DEIMv2's fusion block, (B, dim, H, W) -> (B, dim, H, W): conv1 (1x1 to 2 dim) splits
    into halves, the second through two CSP blocks in a chain (``width`` wide); the halves
    and both CSP outputs, concatenated, are fused by conv2 (1x1)."""

    def __init__(self, *, dim: int, width: int, blocks: int, trailing: bool) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_dim=dim, out_dim=2 * dim, kernel=1, activation="silu")
        self.csp_rep1 = SplitCSPLayer(in_dim=dim, out_dim=width, blocks=blocks,
                                      trailing=trailing)
        self.csp_rep2 = SplitCSPLayer(in_dim=width, out_dim=width, blocks=blocks,
                                      trailing=trailing)
        self.conv2 = ConvNorm(in_dim=2 * dim + 2 * width, out_dim=dim, kernel=1,
                              activation="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = list(self.conv1(x).chunk(2, 1))
        first = self.csp_rep1(halves[-1])
        return self.conv2(torch.cat([*halves, first, self.csp_rep2(first)], 1))


def csp_fusion(dim: int, blocks: int, expansion: float) -> dict:
    """RT-DETR's CCFM parts: CSP blocks, SiLU laterals, 3x3 stride-2 ConvNorm downsampling."""
    return {"fusion_block": lambda: CSPRepLayer(in_dim=2 * dim, out_dim=dim, blocks=blocks,
                                                expansion=expansion),
            "downsample": lambda: ConvNorm(in_dim=dim, out_dim=dim, kernel=3, stride=2,
                                           activation="silu"),
            "lateral_activation": "silu"}


def elan_fusion(dim: int, blocks: int, expansion: float) -> dict:
    """D-FINE's: RepNCSPELAN4 blocks (branches ``expansion * dim`` wide), SCDown, plain
    laterals."""
    return {"fusion_block": lambda: RepNCSPELAN4(dim=dim, width=round(expansion * dim),
                                                 blocks=blocks),
            "downsample": lambda: SCDown(dim=dim), "lateral_activation": None}


def elan5_fusion(dim: int, blocks: int, expansion: float, *, trailing: bool) -> dict:
    """DEIMv2's: RepNCSPELAN5 blocks on levels merged by a sum, SCDown, plain laterals."""
    return {"fusion_block": lambda: RepNCSPELAN5(dim=dim, width=round(expansion * dim),
                                                 blocks=blocks, trailing=trailing),
            "downsample": lambda: SCDown(dim=dim), "lateral_activation": None, "merge": "sum"}


class HybridEncoder(nn.Module):
    """Backbone maps (fine to coarse) -> as many fused maps of width ``dim``.

    fusion_block / downsample: builders of the FPN and PAN blocks (2 dim -> dim) and of the
    PAN's stride-2 downsampling; lateral_activation: the laterals' (RT-DETR: SiLU; D-FINE:
    none); merge: how a block's two inputs meet ("cat": concatenated, 2 dim wide; "sum":
    added, DEIMv2's). ``csp_fusion``, ``elan_fusion`` and ``elan5_fusion`` give each
    family's.
    """

    def __init__(self, *, in_channels: list[int], dim: int, aifi: dict[int, AIFI],
                 fusion_block: Callable[[], nn.Module], downsample: Callable[[], nn.Module],
                 lateral_activation: str | None, merge: str = "cat") -> None:
        super().__init__()
        self.merge = merge
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1, bias=False), FrozenBatchNorm2d(dim))
            for c in in_channels
        )
        self.aifi_levels = list(aifi)
        self.encoder = nn.ModuleList(aifi.values())
        n = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList(
            ConvNorm(in_dim=dim, out_dim=dim, kernel=1, activation=lateral_activation)
            for _ in range(n))
        self.fpn_blocks = nn.ModuleList(fusion_block() for _ in range(n))
        self.downsample_convs = nn.ModuleList(downsample() for _ in range(n))
        self.pan_blocks = nn.ModuleList(fusion_block() for _ in range(n))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = [proj(f) for proj, f in zip(self.input_proj, features, strict=True)]
        for level, aifi in zip(self.aifi_levels, self.encoder, strict=True):
            maps[level] = aifi(maps[level])
        # Top-down (FPN): inner[0] is the coarsest; each lateral conv replaces its input.
        inner = [maps[-1]]
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks,
                                                 strict=True)):
            inner[-1] = lateral(inner[-1])
            finer = maps[-2 - i]
            upsampled = F.interpolate(inner[-1], scale_factor=2.0, mode="nearest")
            # An odd finer map (an image side not a multiple of 32) is one short of twice
            # the coarser one: the extra row or column is cropped (RT-DETR's own 640 x 640
            # inputs never meet it).
            upsampled = upsampled[..., : finer.shape[-2], : finer.shape[-1]]
            inner.append(block(self._merge(upsampled, finer)))
        inner.reverse()  # fine to coarse
        # Bottom-up (PAN).
        outs = [inner[0]]
        for i, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks,
                                              strict=True)):
            outs.append(block(self._merge(down(outs[-1]), inner[i + 1])))
        return outs

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b if self.merge == "sum" else torch.cat([a, b], 1)


class LiteEncoder(nn.Module):
    """DEIMv2's "lite" encoder (Atto, Femto, Pico): one backbone map -> two fused maps of
    width ``dim``, at its stride and twice it.

    The 1x1 input projection (conv + batch norm) gives the fine map; a 3x3 stride-2 average
    pool (padding counted) and a 1x1 SiLU ConvNorm (``down_conv1``) the coarse one, to
    which its global average is added before another (``bi_fusion_conv``). Then one FPN
    step (the coarse map upsampled, nearest, added to the fine one, through
    ``fusion_block``) and one PAN step (that output pooled and projected as before,
    ``down_conv2``, added to the coarse map, through another): those two are the output.
    Names follow transformers' ``Deimv2LiteEncoder`` (its single blocks as ``fpn_blocks.0``
    and ``pan_blocks.0``)."""

    def __init__(self, *, in_channels: list[int], dim: int,
                 fusion_block: Callable[[], nn.Module]) -> None:
        super().__init__()
        if len(in_channels) != 1:
            raise ValueError(f"the lite encoder reads one backbone map, not {len(in_channels)}")
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels[0], dim, kernel_size=1, bias=False),
                           FrozenBatchNorm2d(dim))])
        self.down_conv1, self.bi_fusion_conv, self.down_conv2 = (
            ConvNorm(in_dim=dim, out_dim=dim, kernel=1, activation="silu") for _ in range(3))
        self.fpn_blocks = nn.ModuleList([fusion_block()])
        self.pan_blocks = nn.ModuleList([fusion_block()])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        fine = self.input_proj[0](features[0])
        coarse = self.down_conv1(_halved(fine))
        coarse = self.bi_fusion_conv(coarse + F.adaptive_avg_pool2d(coarse, 1))
        # An odd fine map is one short of twice the coarse one: the upsampled map is cropped.
        upsampled = F.interpolate(coarse, scale_factor=2.0, mode="nearest")
        fine = self.fpn_blocks[0](fine + upsampled[..., : fine.shape[-2], : fine.shape[-1]])
        return [fine, self.pan_blocks[0](coarse + self.down_conv2(_halved(fine)))]


def _halved(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 average pool, zero padding counted (``nn.AvgPool2d``'s default)."""
    return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)
