"""The deformable transformer: encoder, decoder and the two-stage proposal machinery.

Every deformable attention here is :class:`frozenseg.ops.MSDeformAttn`. Parameter
names follow the official Deformable DETR / DINO code (``self_attn``, ``norm1``,
``linear1`` ... in the encoder; ``cross_attn``, ``norm1``, ``self_attn``, ``norm2`` ...
in the decoder), so official checkpoints need no renaming below ``transformer.``.

Shapes: B batch, S flattened multi-scale positions, Q queries, C hidden width, L levels.
Boxes are normalised (cx, cy, w, h) in [0, 1] unless called "logits" (inverse sigmoid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from frozenseg.detector.position import box_position_embedding
from frozenseg.ops import MSDeformAttn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head; DEIM's heads
    take SiLU: ``activation``)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int,
                 activation: str = "relu") -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else self.activation(layer(x))
        return x


class GatedFFN(nn.Module):
    """down(act(gate(x)) * up(x)), ``hidden_dim`` wide: SwiGLU with SiLU (DEIMv2's decoder
    FFN), DINOv3's gated MLP with its ``hidden_act``."""

    def __init__(self, *, dim: int, hidden_dim: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim)
        self.up_proj = nn.Linear(dim, hidden_dim)
        self.down_proj = nn.Linear(hidden_dim, dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def inverse_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))



def run_layer(stack: nn.Module, layer: nn.Module, *args):
    """``layer(*args)``, through activation checkpointing when the stack asks for it
    (``stack.checkpointing``, set by the joint mode to fit one GPU) and is training:
    the layer's activations are recomputed in the backward pass instead of kept."""
    if getattr(stack, "checkpointing", False) and stack.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class EncoderLayer(nn.Module):
    """MSDeformAttn -> add & LayerNorm -> FFN (Linear, activation, Linear) -> add & LayerNorm.

    ``activation`` is "relu" (Deformable DETR and every detector it loads) or "gelu" (the
    Mask Frozen-DETR head's deformable blocks); it has no parameters, so checkpoints load
    the same either way.
    """

    def __init__(
        self, *, dim: int, ffn_dim: int, levels: int, heads: int, points: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation is {activation!r}; one of {', '.join(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[activation]
        self.self_attn = MSDeformAttn(d_model=dim, n_levels=levels, n_heads=heads, n_points=points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference_points, shapes, padding_mask):
        """src, pos: (B, S, C); reference_points: (B, S, L, 2); shapes: (H, W) int pairs;
        padding_mask: (B, S) True at pad."""
        attended = self.self_attn(src + pos, reference_points, src, shapes, None, padding_mask)
        src = self.norm1(src + attended)
        return self.norm2(src + self.linear2(self.activation(self.linear1(src))))


class DecoderLayer(nn.Module):
    """``cross_heads``: the deformable cross-attention's heads where they differ from the
    self-attention's ``heads`` (LW-DETR)."""

    def __init__(self, *, dim: int, ffn_dim: int, levels: int, heads: int, points: int,
                 cross_heads: int | None = None) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model=dim, n_levels=levels,
                                       n_heads=cross_heads or heads, n_points=points)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, memory_mask,
                self_attn_mask=None):
        """tgt, query_pos: (B, Q, C); reference_points: (B, Q, L, 2 or 4); memory: (B, S, C);
        self_attn_mask: (Q, Q) bool, True where query i may not see query j (denoising)."""
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, k, tgt, attn_mask=self_attn_mask,
                                              need_weights=False)[0])
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, shapes, None, memory_mask
        )
        tgt = self.norm1(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Encoder(nn.Module):
    def __init__(self, *, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], valid_ratios: torch.Tensor):
        """Pixel centres of every level, (B, S, L, 2), in the valid-area frame of each level."""
        points = []
        for level, (h, w) in enumerate(shapes):
            like = {"dtype": valid_ratios.dtype, "device": valid_ratios.device}
            ref_y, ref_x = torch.meshgrid(
                unit_steps(0.5, h, **like), unit_steps(0.5, w, **like), indexing="ij"
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, shapes, valid_ratios, padding_mask) -> list[torch.Tensor]:
        """shapes: the (H, W) int pairs of the levels. Returns every layer's output (B, S, C)."""
        reference_points = self.reference_points(shapes, valid_ratios)
        outputs = []
        for layer in self.layers:
            src = run_layer(self, layer, src, pos, reference_points, shapes, padding_mask)
            outputs.append(src)
        return outputs


class Decoder(nn.Module):
    """Decoder layers with iterative reference refinement.

    With ``ref_point_head`` (DINO) each layer's query_pos is an MLP of the sine
    embedding of its current reference box; otherwise query_pos is given and fixed.
    With ``ref_point_input="box"`` (RT-DETR) the MLP reads the normalised box itself.
    With ``norm`` (DINO) the outputs that feed the heads are layer-normed; the
    refinement itself uses the raw output, as DINO does. Each layer attends from its
    reference without gradient; with ``look_forward_twice`` (DINO) the reference its head
    is applied to keeps the previous layer's gradient, so a layer's box loss also trains
    the refinement that placed its reference (Deformable DETR detaches it).
    """

    def __init__(
        self,
        *,
        layers: list[DecoderLayer],
        dim: int,
        norm: bool,
        ref_point_head: bool,
        inverse_sigmoid_eps: float,
        look_forward_twice: bool = False,
        ref_point_input: str = "sine",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.look_forward_twice = look_forward_twice
        self.norm = nn.LayerNorm(dim) if norm else None
        self.ref_point_input = ref_point_input
        self.ref_point_head = None
        if ref_point_head and ref_point_input == "box":
            self.ref_point_head = MLP(in_dim=4, hidden_dim=2 * dim, out_dim=dim, num_layers=2)
        elif ref_point_head:
            self.ref_point_head = MLP(in_dim=2 * dim, hidden_dim=dim, out_dim=dim, num_layers=2)
        self.eps = inverse_sigmoid_eps
        self.dim = dim

    def forward(
        self,
        tgt,
        reference,
        memory,
        memory_mask,
        shapes,
        valid_ratios,
        *,
        query_pos=None,
        bbox_embed=None,
        self_attn_mask=None,
        text=None,
    ):
        """Run every layer.

        tgt: (B, Q, C) content queries; reference: (B, Q, 2 or 4) normalised points or boxes.
        bbox_embed: per-layer box heads for iterative refinement, or None (references fixed).
        self_attn_mask: (Q, Q) bool, True where query i may not see query j (denoising).
        text: the encoded prompt, for layers that attend to it (Grounding DINO).
        Returns (states, references): per layer, the output (B, Q, C) and the reference
        (B, Q, 2 or 4) that layer's head is applied relative to (the first is the given
        reference; the others carry their refinement's gradient with look_forward_twice).
        """
        states, references = [], []
        head_reference = reference
        extra = () if text is None else (text,)
        for i, layer in enumerate(self.layers):
            scale = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios] * 2, -1)
            reference_input = reference[:, :, None] * scale[:, None]
            if self.ref_point_head is not None:
                query_pos = self.ref_point_head(self._ref_point_features(reference_input[:, :, 0])
                                                .to(tgt.dtype))
            tgt = run_layer(self, layer, tgt, query_pos, reference_input, memory, shapes,
                            memory_mask, self_attn_mask, *extra)
            states.append(self.norm(tgt) if self.norm is not None else tgt)
            references.append(head_reference)
            if bbox_embed is not None:
                refined = self.refine(reference, bbox_embed[i](tgt))
                reference = refined.detach()
                head_reference = refined if self.look_forward_twice else reference
        return states, references

    def _ref_point_features(self, reference: torch.Tensor) -> torch.Tensor:
        """What the reference-point head reads: the box, or its sine embedding (y first)."""
        if self.ref_point_input == "box":
            return reference
        return box_position_embedding(reference, num_feats=self.dim // 2, order="yxwh")

    def refine(self, reference: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Apply a box head's delta in logit space (the gradient flows into the delta)."""
        # A 2-d reference point becomes a box after its first refinement (Deformable DETR).
        logits = delta.clone()
        logits[..., : reference.shape[-1]] += inverse_sigmoid(reference, self.eps)
        return logits.sigmoid()


def unit_steps(start: float, count, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``count`` values one apart from ``start``, from ``arange`` (exact in float32): ONNX
    has no linspace, and ``count`` may be a traced size."""
    return torch.arange(count, dtype=dtype, device=device) + start


def encoder_proposals(memory, padding_mask, shapes: list[tuple[int, int]]):
    """Two-stage proposals: one box per encoder position, sized 0.05 * 2**level.

    Returns (proposal_logits (B, S, 4) in inverse-sigmoid space, +inf where invalid;
    valid (B, S, 1) bool: inside the image and away from the borders).
    """
    b = memory.shape[0]
    proposals, start = [], 0
    for level, (h, w) in enumerate(shapes):
        pad = padding_mask[:, start : start + h * w].view(b, h, w)
        valid_h = (~pad[:, :, 0]).sum(1)
        valid_w = (~pad[:, 0, :]).sum(1)
        like = {"dtype": memory.dtype, "device": memory.device}
        grid_y, grid_x = torch.meshgrid(
            unit_steps(0, h, **like), unit_steps(0, w, **like), indexing="ij"
        )
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2)
        grid = (grid[None].expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**level)
        proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    logits = torch.log(proposals / (1 - proposals))
    logits = logits.masked_fill(padding_mask[..., None], float("inf"))
    logits = logits.masked_fill(~valid, float("inf"))
    valid = valid & ~padding_mask[..., None]
    return logits, valid
