"""Windowed plain ViTs: LW-DETR's (a CAE-pretrained ViT) and RF-DETR's (DINOv2), and the
backbone that puts the multi-scale projector on top of either. Their block (with rotary
positions and a gated MLP where asked) is also DINOv3's (:mod:`.dinov3`).

Both keep their tokens split into ``window_side`` x ``window_side`` windows of the patch
grid from the embedding on, as a (B * windows, tokens per window, C) batch: a windowed
block attends within each window, a global block reshapes the batch to (B, all tokens, C)
for its attention only (attention has no position bias, so the token order there does not
matter). A block is pre-norm with per-channel layer scales::

    x = x + gamma1 * attn(norm1(x));  x = x + gamma2 * mlp(norm2(x))

The two differ in the embedding and the outputs (``flavour``):

``cae`` (LW-DETR)  no class token; the absolute position table (pretraining grid, with an
                   unused class slot first) is resized bicubically to the patch grid;
                   windows are the grid's tiles; the key projection has no bias; maps are
                   taken as they are.
``dinov2`` (RF-DETR) a class token, copied into every window; the table is resized
                   bicubically with antialiasing (in float32) unless the grid is the
                   pretraining one; windows are cut as RF-DETR cuts them (transformers keeps
                   its reshape order, which tiles a non-square grid differently from a
                   square one); output maps are layer-normed, the class tokens dropped.

Output ``out_layers``: the hidden state after that many blocks, as a (B, C, H/p, W/p) map.
An input whose sides are not multiples of ``patch * window_side`` cannot be windowed:
:class:`ViTProjector` pads it (bottom and right, zeros) and crops its maps back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frozenseg.detector.projector import MultiScaleProjector
from frozenseg.detector.transformer import ACTIVATIONS, GatedFFN

Rope = tuple[torch.Tensor, torch.Tensor]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on the last ``len(cos)`` tokens of (N, heads, S, head_dim) queries
    or keys: each half-split pair (x_i, x_{i + d/2}) turned by its angle; the tokens before
    them (class and register tokens) are left as they are."""
    prefix, patches = x.split((x.shape[-2] - cos.shape[0], cos.shape[0]), dim=-2)
    first, second = patches.chunk(2, dim=-1)
    turned = patches * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([prefix, turned], dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention over (N, S, C) with separate q/k/v projections; with
    ``rope`` (cos, sin tables of the patch tokens, DINOv3's), rotary positions on q and k.
    """

    def __init__(self, *, dim: int, heads: int, key_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        n, s, c = x.shape
        q, k, v = (p(x).view(n, s, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, s, c))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm block with layer scales; ``windowed`` attends within windows only.
    ``gated``: the MLP is a gated one (DINOv3's SwiGLU-style ``GatedFFN``), of
    ``activation``."""

    def __init__(self, *, dim: int, heads: int, mlp_dim: int, key_bias: bool, eps: float,
                 windowed: bool, gated: bool = False, activation: str = "gelu") -> None:
        super().__init__()
        self.windowed = windowed
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim=dim, heads=heads, key_bias=key_bias)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = (GatedFFN(dim=dim, hidden_dim=mlp_dim, activation=activation) if gated
                    else Mlp(dim=dim, hidden=mlp_dim, activation=activation))
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, windows: int = 1, rope: Rope | None = None
                ) -> torch.Tensor:
        """x: (B * windows, S, C), each image's windows consecutive; ``rope``: rotary
        position tables for the last tokens (:class:`Attention`)."""
        h = self.norm1(x)
        if not self.windowed:
            h = h.reshape(x.shape[0] // windows, windows * x.shape[1], x.shape[2])
        x = x + self.attn(h, rope).reshape(x.shape) * self.gamma1
        return x + self.mlp(self.norm2(x)) * self.gamma2


class WindowedViT(nn.Module):
    """(B, 3, H, W) normalised images, sides multiples of patch * window_side -> one
    (B, dim, H/patch, W/patch) map per entry of ``out_layers``. Its blocks are those up to
    the last output layer: a checkpoint's later blocks are never read."""

    def __init__(self, *, flavour: str, dim: int, heads: int, mlp_dim: int,
                 patch: int, pretrain_grid: int, window_side: int,
                 window_blocks: Sequence[int], out_layers: Sequence[int],
                 eps: float = 1e-6) -> None:
        super().__init__()
        if flavour not in ("cae", "dinov2"):
            raise ValueError(f"ViT flavour is {flavour!r}; one of cae, dinov2")
        self.flavour, self.patch, self.side = flavour, patch, window_side
        self.grid, self.out_layers = pretrain_grid, tuple(out_layers)
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, dim))
        if flavour == "dinov2":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.norm = nn.LayerNorm(dim, eps=eps)
        self.blocks = nn.ModuleList(
            Block(dim=dim, heads=heads, mlp_dim=mlp_dim, key_bias=flavour == "dinov2", eps=eps,
                  windowed=i in window_blocks)
            for i in range(max(self.out_layers)))

    @property
    def size_multiple(self) -> int:
        return self.patch * self.side

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(images)
        b, c, h, w = x.shape
        x = self._windows(x) if self.flavour == "cae" else self._dinov2_windows(x)
        maps = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, self.side**2)
            if i in self.out_layers:
                maps.append(self._map(x, b, h, w))
        return maps

    def _positions(self, h: int, w: int, **resize) -> torch.Tensor:
        """(1, C, h, w): the table's grid part, resized to the patch grid when it differs."""
        table = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        if (h, w) == (self.grid, self.grid):
            return table
        return F.interpolate(table.float(), size=(h, w), mode="bicubic", align_corners=False,
                             **resize).to(table.dtype)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """CAE: (B, C, h, w) + positions -> (B * s * s, h/s * w/s, C), window by window."""
        b, c, h, w = x.shape
        s = self.side
        x = (x + self._positions(h, w)).permute(0, 2, 3, 1)
        x = x.reshape(b, s, h // s, s, w // s, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b * s * s, (h // s) * (w // s), c)

    def _dinov2_windows(self, x: torch.Tensor) -> torch.Tensor:
        """DINOv2: class token + positions, then RF-DETR's windows, a class token in each."""
        b, c, h, w = x.shape
        s = self.side
        pos = self._positions(h, w, antialias=True).flatten(2).transpose(1, 2)
        cls = self.cls_token + self.pos_embed[:, :1]
        tokens = x.flatten(2).transpose(1, 2) + pos
        if s == 1:
            return torch.cat([cls.expand(b, -1, -1), tokens], 1)
        tokens = tokens.reshape(b, s, w // s, s, h // s, c).transpose(2, 3)
        tokens = tokens.reshape(b * s * s, (h // s) * (w // s), c)
        return torch.cat([cls.expand(b * s * s, -1, -1), tokens], 1)

    def _map(self, x: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        """Windowed tokens -> (B, C, h, w), undoing the flavour's windows."""
        s, c = self.side, x.shape[-1]
        if self.flavour == "cae":
            x = x.reshape(b, s, s, h // s, w // s, c).permute(0, 5, 1, 3, 2, 4)
            return x.reshape(b, c, h, w)
        x = self.norm(x)[:, 1:]
        x = x.reshape(b, s, s, h // s, w // s, c).transpose(2, 3)
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


class ViTProjector(nn.Module):
    """A windowed ViT and the multi-scale projector on its maps.

    Returns C1 then the levels the decoder reads: C1 is the finest level resampled
    (bilinear) to stride 4, the stride DetectorOutput.c1 has for every family; the levels
    are (B, dim, H / stride_l, W / stride_l), in the projector's order (``channels``: the
    widths, ``strides``: the levels' strides). Inputs of any size: padded (bottom, right,
    zeros) to a multiple of the ViT's window tiling, and every map cropped to
    ceil(side / stride) afterwards (C1 is resampled before the crop, so its pixel centres
    stay on the stride-4 grid).
    """

    def __init__(self, *, vit: WindowedViT, projector: MultiScaleProjector) -> None:
        super().__init__()
        self.vit, self.projector = vit, projector
        self.channels = [projector.dim] * (1 + len(projector.levels))
        self.strides = [vit.patch / scale for scale in projector.scales]

    def forward(self, images: torch.Tensor, stages: int | None = None) -> list[torch.Tensor]:
        """``stages``: how many maps to return, C1 first (1: C1 alone; None: all)."""
        h, w = images.shape[-2:]
        m = self.vit.size_multiple
        padded = F.pad(images, (0, -w % m, 0, -h % m))
        levels = self.projector(self.vit(padded), levels=max(stages - 1, 1) if stages else None)
        c1 = F.interpolate(levels[0], scale_factor=self.strides[0] / 4, mode="bilinear",
                           align_corners=False)
        maps = list(zip([c1, *levels], [4, *self.strides], strict=False))
        return [f[..., : math.ceil(h / s), : math.ceil(w / s)] for f, s in maps[:stages]]


def build_vit_projector(*, scales: Sequence[float], projector_dim: int, blocks: int,
                        expansion: float, norm: str, norm_eps: float, activation: str,
                        **vit) -> ViTProjector:
    """A backbone spec (flat, so that it survives JSON as tuples): the projector's
    settings and WindowedViT's keywords."""
    model = WindowedViT(**vit)
    projector = MultiScaleProjector(
        scales=scales, in_dims=[vit["dim"]] * len(model.out_layers), dim=projector_dim,
        blocks=blocks, expansion=expansion, norm=norm, norm_eps=norm_eps, activation=activation)
    return ViTProjector(vit=model, projector=projector)
