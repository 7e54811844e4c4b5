"""Swin Transformer backbone, laid out as DINO's (mmdet-style) ``SwinTransformer``.

Module, parameter and buffer names are those of IDEA-Research/DINO
``models/dino/swin_transformer.py`` (FocalNet-DINO ships the same file), so the
backbone part of a DINO checkpoint loads with ``load_state_dict(strict=True)`` once
the ``backbone.0.`` prefix is stripped::

    patch_embed.proj.{weight,bias}            patch_embed.norm.{weight,bias}
    layers.{i}.blocks.{j}.norm1 / norm2       .{weight,bias}
    layers.{i}.blocks.{j}.attn.qkv / proj     .{weight,bias}
    layers.{i}.blocks.{j}.attn.relative_position_bias_table   ((2w-1)^2, heads)
    layers.{i}.blocks.{j}.attn.relative_position_index        (w^2, w^2) int64 buffer
    layers.{i}.blocks.{j}.mlp.fc1 / fc2       .{weight,bias}
    layers.{i}.downsample.norm.{weight,bias}  layers.{i}.downsample.reduction.weight (i < 3)
    norm{i}.{weight,bias}                     only for i in out_indices

Internally tokens stay channels-last (B, H, W, C) between blocks; the arithmetic,
including the zero padding to whole windows and the -100 shifted-window mask, is
the official one. Absolute position embeddings (``ape``) and ``dilation`` are not
supported: no DINO configuration uses them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The official shifted-window mask adds -100 (not -inf) between tokens from different
# image regions; keeping the value keeps outputs identical.
MASK_VALUE = -100.0
NUM_STAGES = 4


def pad_hw(x: Tensor, multiple: int, *, channels_last: bool) -> Tensor:
    """Zero-pad H and W at the bottom/right up to multiples of ``multiple``.

    x: (B, H, W, C) if ``channels_last`` else (B, C, H, W). This is how every padding
    in the official Swin and FocalNet backbones is done (never top/left, never centred).
    """
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    # (m - h % m) % m, not -h % m: ONNX export gets remainders of negatives wrong. Traced, the
    # pad is kept (possibly zero wide) so that the graph pads the sizes that need it.
    pad_h, pad_w = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
    if not (pad_h or pad_w) and not torch.jit.is_tracing():
        return x
    pad = (0, 0, 0, pad_w, 0, pad_h) if channels_last else (0, pad_w, 0, pad_h)
    return F.pad(x, pad)


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window^2, C).

    Windows are ordered batch-major, then row-major over the window grid.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window^2, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """(window^2, window^2) int64: row of the bias table for each (query, key) token pair.

    Entry = (dy + window - 1) * (2 * window - 1) + (dx + window - 1), where (dy, dx) is
    the query's position minus the key's inside the window (row-major tokens).
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(
    hp: int, wp: int, window: int, shift: int, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(nW, window^2, window^2) additive mask for the cyclically shifted windows.

    After the roll by -shift, a window at the bottom/right edge mixes tokens from up to
    three bands per axis; a pair of tokens from different bands gets MASK_VALUE. hp, wp:
    the feature map size padded to whole windows.
    """
    region = torch.zeros(1, hp, wp, 1, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            region[:, rows, cols, :] = 3 * i + j
    ids = window_partition(region, window).squeeze(-1)  # nW, N
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(
        different, MASK_VALUE
    )


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> fc2 on the last dim (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    relative_position_index: Tensor

    def __init__(self, dim: int, num_heads: int, window: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent, as in the official module: DINO checkpoints contain it.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> Tensor:
        """(heads, N, N) bias for N = window^2 tokens."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B * nW, N, C); mask: (nW, N, N) additive or None -> (B * nW, N, C)."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, heads, N, d)
        bias = self.position_bias()
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            # Fold windows into the head axis, (B, nW * heads, N, d), so the per-window mask
            # broadcasts over the batch instead of being materialised B times.
            nw = mask.shape[0]
            q, k, v = (t.reshape(bw // nw, nw * self.num_heads, n, -1) for t in (q, k, v))
            bias = (mask.unsqueeze(1) + bias).flatten(0, 1)  # nW * heads, N, N
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
            out = out.view(bw, self.num_heads, n, -1)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP; (B, H, W, C) -> (B, H, W, C)."""

    def __init__(
        self, dim: int, num_heads: int, window: int, shift: int, *, mlp_ratio: float,
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, shift_mask: Tensor) -> Tensor:
        """shift_mask: (nW, N, N) for the padded map; used only by shifted blocks."""
        h, w = x.shape[1:3]
        # Pad after norm1: the padding tokens are exact zeros, and (as in the official code)
        # they are not masked out, so queries still attend to them.
        y = pad_hw(self.norm1(x), self.window, channels_last=True)
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(y, self.window), shift_mask if self.shift else None)
        y = window_merge(windows, self.window, hp, wp)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 space-to-depth, LayerNorm, linear 4C -> 2C.

    (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd H or W is zero-padded at the
    bottom/right first.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Registration order as in the official module, so state dict key order matches too.
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_hw(x, 2, channels_last=True)
        # Official concatenation order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain / shifted windows, then an optional PatchMerging."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window: int, *, downsample: bool,
        mlp_ratio: float, qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if j % 2 == 0 else self.shift,
                      mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, H, W, C) -> (stage output (B, H, W, C), downsampled input of the next stage)."""
        # Integer ceil (not math.ceil) keeps the traced sizes symbolic for ONNX export.
        hp = (x.shape[1] + self.window - 1) // self.window * self.window
        wp = (x.shape[2] + self.window - 1) // self.window * self.window
        mask = shifted_window_mask(hp, wp, self.window, self.shift, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv + optional LayerNorm.

    (B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C), channels-last. The image is
    zero-padded at the bottom/right to a multiple of the patch size first.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(pad_hw(images, self.patch_size, channels_last=False)).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


def _four(values: Sequence[int], name: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != NUM_STAGES:
        raise ValueError(f"{name} must have {NUM_STAGES} entries, got {values}")
    return values


class SwinTransformer(nn.Module):
    """Swin backbone returning the four stage maps at strides 4, 8, 16, 32.

    forward: (B, 3, H, W) -> [(B, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) for i in 0..3]
    (each stage rounds up, so stage i+1 has ceil(H_i / 2) rows). Stages in
    ``out_indices`` pass through their ``norm{i}`` LayerNorm as in the official code;
    the others come out raw (e.g. stage 0 of a 4-scale DINO, used only as a stride-4 map).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
        qkv_bias: bool = True,
        patch_norm: bool = True,
    ) -> None:
        super().__init__()
        depths, num_heads = _four(depths, "depths"), _four(num_heads, "num_heads")
        self.out_indices = tuple(sorted(int(i) for i in out_indices))
        if not set(self.out_indices) <= set(range(NUM_STAGES)):
            raise ValueError(f"out_indices must be within 0..3, got {out_indices}")
        self.channels: list[int] = [embed_dim * 2**i for i in range(NUM_STAGES)]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        self.layers = nn.ModuleList(
            SwinStage(self.channels[i], depths[i], num_heads[i], window_size,
                      downsample=i < NUM_STAGES - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
            for i in range(NUM_STAGES)
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.channels[i]))

    def forward(self, images: Tensor, stages: int = 4) -> list[Tensor]:
        return stage_outputs(self, images, stages)


def stage_outputs(backbone: nn.Module, images: Tensor, stages: int = 4) -> list[Tensor]:
    """Patch embedding, then the first ``stages`` stages; those in out_indices get their
    ``norm{i}``.

    Shared by Swin and FocalNet, whose stages return (stage output, next stage input)
    in (B, H, W, C) layout. Returns the maps as (B, C, H, W).
    """
    x: Tensor | None = backbone.patch_embed(images)
    outs = []
    for i, layer in enumerate(backbone.layers[:stages]):
        out, x = layer(x)
        if i in backbone.out_indices:
            out = getattr(backbone, f"norm{i}")(out)
        outs.append(out.permute(0, 3, 1, 2).contiguous())
    return outs


def swin_tiny(
    *, window_size: int = 7, out_indices: Sequence[int] = (0, 1, 2, 3)
) -> SwinTransformer:
    """Swin-T as DINO's ``swin_T_224_1k``: embed 96, depths 2-2-6-2, heads 3-6-12-24."""
    return SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                           window_size=window_size, out_indices=out_indices)


def swin_large(
    *, window_size: int = 12, out_indices: Sequence[int] = (0, 1, 2, 3)
) -> SwinTransformer:
    """Swin-L as DINO's ``swin_L_384_22k`` (window 12) or ``swin_L_224_22k`` (window 7).

    embed 192, depths 2-2-18-2, heads 6-12-24-48. DINO-4scale uses out_indices (1, 2, 3),
    DINO-5scale (0, 1, 2, 3).
    """
    return SwinTransformer(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                           window_size=window_size, out_indices=out_indices)


def build_swin(**config) -> SwinTransformer:
    """Build from a config dict such as :func:`swin_config_from_state_dict` returns."""
    return SwinTransformer(**config)


def count_blocks(state_dict: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Number of ``layers.{i}.blocks.{j}`` per stage (max j + 1), for the 4 stages."""
    pattern = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
    depths = [0] * NUM_STAGES
    for key in state_dict:
        match = pattern.match(key)
        if match:
            stage, block = int(match[1]), int(match[2])
            if stage >= NUM_STAGES:
                raise ValueError(f"unexpected stage {stage} in key {key!r}")
            depths[stage] = max(depths[stage], block + 1)
    if not all(depths):
        raise ValueError(f"every stage needs at least one block, found depths {depths}")
    return tuple(depths)


def _window_from_table(rows: int) -> int:
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"relative_position_bias_table has {rows} rows, not (2w-1)^2")
    return (side + 1) // 2


def swin_config_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict:
    """Infer :class:`SwinTransformer` keyword arguments from a (prefix-stripped) state dict.

    Everything is read off shapes and key names: embed_dim/patch_size/in_chans from
    ``patch_embed.proj.weight``, depths from the block indices, num_heads and window_size
    from each stage's ``relative_position_bias_table`` ((2w-1)^2 x heads), mlp_ratio from
    ``fc1``, out_indices from which ``norm{i}`` exist.
    """
    if "absolute_pos_embed" in state_dict:
        raise ValueError("Swin with absolute position embedding (ape=True) is not supported")
    if "layers.2.downsample.reduction.weight" not in state_dict:
        raise ValueError("Swin without stage-2 downsampling (dilation=True) is not supported")
    proj = state_dict["patch_embed.proj.weight"]  # (embed_dim, in_chans, p, p)
    embed_dim = int(proj.shape[0])
    tables = [state_dict[f"layers.{i}.blocks.0.attn.relative_position_bias_table"]
              for i in range(NUM_STAGES)]
    windows = {_window_from_table(int(t.shape[0])) for t in tables}
    if len(windows) != 1:
        raise ValueError(f"stages disagree on the window size: {sorted(windows)}")
    hidden = int(state_dict["layers.0.blocks.0.mlp.fc1.weight"].shape[0])
    return {
        "embed_dim": embed_dim,
        "depths": count_blocks(state_dict),
        "num_heads": tuple(int(t.shape[1]) for t in tables),
        "window_size": windows.pop(),
        "out_indices": tuple(i for i in range(NUM_STAGES) if f"norm{i}.weight" in state_dict),
        "mlp_ratio": hidden / embed_dim,
        "patch_size": int(proj.shape[-1]),
        "in_chans": int(proj.shape[1]),
        "qkv_bias": "layers.0.blocks.0.attn.qkv.bias" in state_dict,
        "patch_norm": "patch_embed.norm.weight" in state_dict,
    }
