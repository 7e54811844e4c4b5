"""FocalNet backbone, laid out as FocalNet-DINO's ``models/dino/focal.py`` ``FocalNet``.

Module, parameter and buffer names are the official ones, so the backbone part of a
FocalNet-DINO checkpoint loads with ``load_state_dict(strict=True)`` once the
``backbone.0.`` prefix is stripped::

    patch_embed.proj.{weight,bias}            patch_embed.norm.{weight,bias}
    layers.{i}.blocks.{j}.norm1 / norm2       .{weight,bias}
    layers.{i}.blocks.{j}.gamma_1 / gamma_2   (C,)   only with use_layerscale
    layers.{i}.blocks.{j}.modulation.f        .{weight,bias}   Linear C -> 2C + L + 1
    layers.{i}.blocks.{j}.modulation.h        .{weight,bias}   1x1 conv C -> C
    layers.{i}.blocks.{j}.modulation.proj     .{weight,bias}
    layers.{i}.blocks.{j}.modulation.focal_layers.{l}.0.weight  (C, 1, k_l, k_l), no bias
    layers.{i}.blocks.{j}.modulation.ln       .{weight,bias}   only with use_postln_in_modulation
    layers.{i}.blocks.{j}.mlp.fc1 / fc2       .{weight,bias}
    layers.{i}.downsample.proj / norm         .{weight,bias}   (i < 3)
    norm{i}.{weight,bias}                     only for i in out_indices

There are no buffers. Focal kernel sizes are k_l = focal_window + 2 * l (focal factor 2).
Internally tokens stay channels-last (B, H, W, C) between blocks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from frozenseg.detector.backbones.swin import (
    NUM_STAGES,
    Mlp,
    count_blocks,
    pad_hw,
    stage_outputs,
)

# The official FocalModulation hard-codes a focal factor of 2 (kernel grows by 2 per level).
FOCAL_FACTOR = 2
LAYERSCALE_INIT = 1e-4


class FocalModulation(nn.Module):
    """Focal modulation: (B, H, W, C) -> (B, H, W, C).

    ``f`` splits into query, context and L+1 gates; the context goes through L depthwise
    conv + GELU levels (each on the previous level's output) plus a global average
    level; the gated sum, through the 1x1 conv ``h``, multiplies the query.
    """

    def __init__(
        self, dim: int, focal_level: int, focal_window: int, *, use_postln_in_modulation: bool,
        normalize_modulator: bool,
    ) -> None:
        super().__init__()
        self.focal_level, self.normalize_modulator = focal_level, normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList(
            self._level(dim, focal_window + FOCAL_FACTOR * k) for k in range(focal_level)
        )
        self.ln = nn.LayerNorm(dim) if use_postln_in_modulation else None

    @staticmethod
    def _level(dim: int, kernel: int) -> nn.Sequential:
        # Sequential so the conv's key is "focal_layers.{l}.0.weight", as in the official code.
        conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        return nn.Sequential(conv, nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[-1]
        # Contiguous NCHW before the convs, as in the official code (same conv algorithm).
        q, ctx, gates = torch.split(
            self.f(x).permute(0, 3, 1, 2).contiguous(), (c, c, self.focal_level + 1), 1
        )
        modulator = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            modulator = modulator + ctx * gates[:, level : level + 1]
        # The global level pools the last (widest) level's context.
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        modulator = modulator + ctx_global * gates[:, self.focal_level :]
        if self.normalize_modulator:
            modulator = modulator / (self.focal_level + 1)
        # Contiguous channels-last before proj, as in the official code (the gemm would copy
        # anyway; this way it sees the same layout and gives the same sums).
        out = (q * self.h(modulator)).permute(0, 2, 3, 1).contiguous()
        if self.ln is not None:
            out = self.ln(out)
        return self.proj(out)


class FocalNetBlock(nn.Module):
    """Focal modulation + MLP with residuals; (B, H, W, C) -> (B, H, W, C).

    Pre-norm by default; with ``use_postln`` the norms move after each branch:
    x + g1 * norm1(mod(x)), then x + g2 * norm2(mlp(x)). g1, g2 are the layer-scale
    vectors ``gamma_1``, ``gamma_2`` (1 without ``use_layerscale``).
    """

    def __init__(
        self, dim: int, focal_level: int, focal_window: int, *, mlp_ratio: float,
        use_postln: bool, use_postln_in_modulation: bool, normalize_modulator: bool,
        use_layerscale: bool,
    ) -> None:
        super().__init__()
        self.use_postln = use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(
            dim, focal_level, focal_window, use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if use_layerscale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), LAYERSCALE_INIT))
            self.gamma_2 = nn.Parameter(torch.full((dim,), LAYERSCALE_INIT))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _scale(self, x: Tensor, gamma: Tensor | None) -> Tensor:
        return x if gamma is None else gamma * x

    def forward(self, x: Tensor) -> Tensor:
        if self.use_postln:
            x = x + self._scale(self.norm1(self.modulation(x)), self.gamma_1)
            return x + self._scale(self.norm2(self.mlp(x)), self.gamma_2)
        x = x + self._scale(self.modulation(self.norm1(x)), self.gamma_1)
        return x + self._scale(self.mlp(self.norm2(x)), self.gamma_2)


class PatchEmbed(nn.Module):
    """Patch embedding conv + optional LayerNorm: (B, C_in, H, W) -> (B, H', W', C), channels-last.

    The input is first zero-padded at the bottom/right to a multiple of ``patch_size``,
    then either a patch_size-strided conv with kernel patch_size, or with ``use_conv_embed``
    an overlapping conv: kernel 7, stride 4, padding 2 for the stem, kernel 3, stride 2,
    padding 1 between stages. Either way H' = ceil(H / patch_size).
    """

    def __init__(
        self, patch_size: int, in_chans: int, embed_dim: int, *, use_conv_embed: bool,
        is_stem: bool, norm: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        if use_conv_embed:
            kernel, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
        else:
            kernel, stride, padding = patch_size, patch_size, 0
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(pad_hw(x, self.patch_size, channels_last=False)).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class FocalNetStage(nn.Module):
    """``depth`` FocalNet blocks, then an optional 2x PatchEmbed downsample."""

    def __init__(
        self, dim: int, depth: int, focal_level: int, focal_window: int, *, downsample: bool,
        use_conv_embed: bool, **block_kwargs,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            FocalNetBlock(dim, focal_level, focal_window, **block_kwargs) for _ in range(depth)
        )
        self.downsample = (
            PatchEmbed(2, dim, 2 * dim, use_conv_embed=use_conv_embed, is_stem=False)
            if downsample else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, H, W, C) -> (stage output (B, H, W, C), next stage input or None)."""
        for block in self.blocks:
            x = block(x)
        if self.downsample is None:
            return x, None
        # A channels-last view, as in the official code (same conv algorithm, same sums).
        return x, self.downsample(x.permute(0, 3, 1, 2))


def _per_stage(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    values = (value,) * NUM_STAGES if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != NUM_STAGES:
        raise ValueError(f"{name} must be an int or have {NUM_STAGES} entries, got {value}")
    return values


class FocalNet(nn.Module):
    """FocalNet backbone returning the four stage maps at strides 4, 8, 16, 32.

    forward: (B, 3, H, W) -> [(B, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) for i in 0..3]
    with C_i = embed_dim * 2^i. Stages in ``out_indices`` pass through their ``norm{i}``
    LayerNorm as in the official code; the others come out raw.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        focal_levels: int | Sequence[int] = 3,
        focal_windows: int | Sequence[int] = 3,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        use_conv_embed: bool = False,
        use_layerscale: bool = False,
        use_postln: bool = False,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
        patch_norm: bool = True,
    ) -> None:
        super().__init__()
        depths = _per_stage(depths, "depths")
        levels = _per_stage(focal_levels, "focal_levels")
        windows = _per_stage(focal_windows, "focal_windows")
        self.out_indices = tuple(sorted(int(i) for i in out_indices))
        if not set(self.out_indices) <= set(range(NUM_STAGES)):
            raise ValueError(f"out_indices must be within 0..3, got {out_indices}")
        self.channels: list[int] = [embed_dim * 2**i for i in range(NUM_STAGES)]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim,
                                      use_conv_embed=use_conv_embed, is_stem=True, norm=patch_norm)
        block_kwargs = dict(
            mlp_ratio=mlp_ratio, use_postln=use_postln,
            use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator, use_layerscale=use_layerscale,
        )
        self.layers = nn.ModuleList(
            FocalNetStage(self.channels[i], depths[i], levels[i], windows[i],
                          downsample=i < NUM_STAGES - 1, use_conv_embed=use_conv_embed,
                          **block_kwargs)
            for i in range(NUM_STAGES)
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.channels[i]))

    def forward(self, images: Tensor, stages: int = 4) -> list[Tensor]:
        return stage_outputs(self, images, stages)


def _large_settings(focal_levels: int) -> dict:
    """FocalNet-L of FocalNet-DINO (``focalnet_L_384_22k`` / ``focalnet_L_384_22k_fl4``)."""
    if focal_levels not in (3, 4):
        raise ValueError(f"FocalNet-L comes with 3 or 4 focal levels, not {focal_levels}")
    return dict(
        embed_dim=192, depths=(2, 2, 18, 2), focal_levels=focal_levels,
        focal_windows=5 if focal_levels == 3 else 3, use_conv_embed=True, use_layerscale=True,
        use_postln=True, use_postln_in_modulation=False, normalize_modulator=focal_levels == 4,
    )


def focalnet_large(*, focal_levels: int = 4, out_indices: Sequence[int] = (0, 1, 2, 3)) -> FocalNet:
    """FocalNet-L as in FocalNet-DINO: embed 192, depths 2-2-18-2, conv embedding, layer
    scale, post-LN; fl4: focal windows 3 (kernels 3, 5, 7, 9) and normalised modulator;
    fl3: focal windows 5 (kernels 5, 7, 9). FocalNet-DINO's fl4 model is 5-scale,
    out_indices (0, 1, 2, 3); its fl3 model is 4-scale, (1, 2, 3).
    """
    return FocalNet(**_large_settings(focal_levels), out_indices=out_indices)


def build_focalnet(**config) -> FocalNet:
    """Build from a config dict such as :func:`focalnet_config_from_state_dict` returns."""
    return FocalNet(**config)


def _focal_level_count(state_dict: Mapping[str, Tensor], stage: int) -> int:
    prefix = f"layers.{stage}.blocks.0.modulation."
    pattern = re.compile(re.escape(prefix) + r"focal_layers\.(\d+)\.0\.weight$")
    levels = 1 + max((int(m[1]) for k in state_dict if (m := pattern.match(k))), default=-1)
    # The gate count in f (2C + L + 1 outputs) must agree with the number of conv levels.
    dim = state_dict[prefix + "h.weight"].shape[0]
    if state_dict[prefix + "f.weight"].shape[0] != 2 * dim + levels + 1:
        raise ValueError(f"stage {stage}: f has no room for {levels} focal levels")
    return levels


def focalnet_config_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict:
    """Infer :class:`FocalNet` keyword arguments from a (prefix-stripped) state dict.

    Read off the weights: embed_dim, in_chans, use_conv_embed (stem kernel 7), depths,
    per-stage focal_levels and focal_windows (first level's kernel), mlp_ratio,
    use_layerscale (``gamma_1``), use_postln_in_modulation (``modulation.ln``),
    patch_norm, out_indices. Two flags change the computation but leave no trace in the
    weights; they follow every published FocalNet (microsoft/FocalNet configs, FocalNet-DINO):
    ``use_postln`` goes with ``use_layerscale`` (L/XL/H have both, T/S/B neither), and
    ``normalize_modulator`` is set only for 4 focal levels without ``modulation.ln``
    (L-fl4, XL-fl4; not H-fl4). Override them in the returned dict if a checkpoint differs.
    """
    proj = state_dict["patch_embed.proj.weight"]  # (embed_dim, in_chans, k, k)
    embed_dim, stem_kernel = int(proj.shape[0]), int(proj.shape[-1])
    use_conv_embed = stem_kernel == 7
    levels = tuple(_focal_level_count(state_dict, i) for i in range(NUM_STAGES))
    windows = tuple(
        int(state_dict[f"layers.{i}.blocks.0.modulation.focal_layers.0.0.weight"].shape[-1])
        for i in range(NUM_STAGES)
    )
    use_layerscale = "layers.0.blocks.0.gamma_1" in state_dict
    postln_in_modulation = "layers.0.blocks.0.modulation.ln.weight" in state_dict
    hidden = int(state_dict["layers.0.blocks.0.mlp.fc1.weight"].shape[0])
    return {
        "embed_dim": embed_dim,
        "depths": count_blocks(state_dict),
        "focal_levels": levels,
        "focal_windows": windows,
        "out_indices": tuple(i for i in range(NUM_STAGES) if f"norm{i}.weight" in state_dict),
        "use_conv_embed": use_conv_embed,
        "use_layerscale": use_layerscale,
        "use_postln": use_layerscale,
        "use_postln_in_modulation": postln_in_modulation,
        "normalize_modulator": all(n == 4 for n in levels) and not postln_in_modulation,
        "mlp_ratio": hidden / embed_dim,
        # With the conv stem the patch size only sets the padding; the official code uses 4.
        "patch_size": 4 if use_conv_embed else stem_kernel,
        "in_chans": int(proj.shape[1]),
        "patch_norm": "patch_embed.norm.weight" in state_dict,
    }
