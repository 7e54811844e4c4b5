"""DINOv3's ViT (transformers' ``DINOv3ViTBackbone``), as DEIMv2 S, M, L and X read it.

Tokens are the class token, ``registers`` register tokens and the patch embeddings (a
``patch`` x ``patch`` stride-``patch`` convolution), in that order; there is no absolute
position table. Each block is :class:`frozenseg.detector.backbones.vit.Block` (pre-norm,
per-channel layer scales, global attention), with 2-d rotary positions on the patch
tokens' queries and keys (:func:`rope_table`) and a plain or gated MLP. DEIMv2's distilled
ViT-Tiny models (S, M) are the same network as transformers configures them: no
registers, no key bias, layer scales of one.

Output ``out_layers``: the hidden state after that many blocks, the prefix tokens
dropped, as a (B, dim, H / patch, W / patch) map; those flagged in ``normed`` go through
the final LayerNorm first (transformers norms every output with ``apply_layernorm``, and
the last block's output always; the official DEIMv2's ViT-Tiny has no final norm and
norms none: the model then has no ``norm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from frozenseg.detector.backbones.vit import Block, Rope


def rope_table(h: int, w: int, *, head_dim: int, theta: float, device: torch.device
               ) -> Rope:
    """(cos, sin), each (h * w, head_dim), of the patch grid in row-major order.

    Patch centres are normalised to [-1, 1] on each axis separately ((i + 0.5) / h * 2 - 1);
    head_dim / 4 frequencies 1 / theta^(4k / head_dim) turn each: the y angles, then the x
    angles, the pair repeated to cover both halves that :func:`vit.rotate` pairs up.
    Computed in float32, as DINOv3 does, whatever the model's dtype."""
    frequencies = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32,
                                            device=device)
    ys = torch.arange(0.5, h, dtype=torch.float32, device=device) / h
    xs = torch.arange(0.5, w, dtype=torch.float32, device=device) / w
    centres = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    centres = 2.0 * centres - 1.0
    angles = (2 * math.pi * centres[:, :, None] * frequencies[None, None, :]).flatten(1, 2)
    angles = angles.tile(2)
    return angles.cos(), angles.sin()


class DINOv3ViT(nn.Module):
    """(B, 3, H, W) normalised images -> one (B, dim, H // patch, W // patch) map per entry
    of ``out_layers``. Its blocks are those up to the last output layer."""

    def __init__(self, *, dim: int, heads: int, mlp_dim: int, patch: int, registers: int,
                 key_bias: bool, gated_mlp: bool, activation: str, rope_theta: float,
                 out_layers: Sequence[int], normed: Sequence[bool], eps: float) -> None:
        super().__init__()
        self.patch, self.heads, self.rope_theta = patch, heads, rope_theta
        self.out_layers, self.normed = tuple(out_layers), tuple(normed)
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList(
            Block(dim=dim, heads=heads, mlp_dim=mlp_dim, key_bias=key_bias, eps=eps,
                  windowed=False, gated=gated_mlp, activation=activation)
            for _ in range(max(self.out_layers)))
        self.norm = nn.LayerNorm(dim, eps=eps) if any(self.normed) else None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        patches = self.patch_embed(images)
        b, c, h, w = patches.shape
        prefix = torch.cat([self.cls_token, self.register_tokens], 1).expand(b, -1, -1)
        x = torch.cat([prefix, patches.flatten(2).transpose(1, 2)], 1)
        cos, sin = rope_table(h, w, head_dim=c // self.heads, theta=self.rope_theta,
                              device=images.device)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
        maps = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, rope=rope)
            if i in self.out_layers:
                maps.append(self._map(x, self.normed[self.out_layers.index(i)], h, w))
        return maps

    def _map(self, x: torch.Tensor, normed: bool, h: int, w: int) -> torch.Tensor:
        """Tokens after a block -> the patch tokens' (B, C, h, w) map."""
        patches = (self.norm(x) if normed else x)[:, x.shape[1] - h * w:]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
