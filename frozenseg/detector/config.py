"""DetectorConfig: every difference between DETR variants, as data.

One canonical deformable DETR (``model.py``) is built from this config. A format
module derives it from a checkpoint's tensor shapes (and ``ckpt['args']``); it
is saved as ``config.json`` beside the converted weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

QueryInit = Literal["learned", "proposals", "mixed", "selected"]
ProposalScore = Literal["first_class", "max_class"]
EncoderKind = Literal["deformable", "hybrid"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, padding_mask: torch.Tensor | None,
              mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
              ) -> torch.Tensor:
    """(B, 3, H, W) float RGB in [0, 1] -> (images - mean) / std per channel, with the
    padding (``padding_mask`` (B, H, W), True at padding) set to 0 afterwards: normalise,
    then pad, as DETR and every detector frozenseg loads. Models take their inputs this way
    (the frozen detector, Mask DINO, the ONNX graph); ``mean``/``std`` are the detector's
    (``DetectorConfig.image_mean`` / ``image_std``)."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    normalised = (images - mean) / std
    if padding_mask is None:
        return normalised
    return normalised.masked_fill(padding_mask[:, None], 0.0)


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and post-processing of a deformable DETR.

    Queries:
      ``learned``   Deformable DETR single-stage: a learned (query_pos, content) pair per
                    query and a linear layer predicting 2-d reference points from query_pos.
      ``proposals`` Deformable DETR two-stage: the top-scoring encoder proposals give the
                    4-d reference boxes, and query_pos and content both come from them.
      ``mixed``     mixed query selection (DINO, H-Deformable-DETR): the proposals give the
                    reference boxes (and, for H-DETR, query_pos); the content is learned.
      ``selected``  unified query selection (Mask DINO, RT-DETR): the proposals give the
                    reference boxes and the selected encoder tokens themselves the content.

    Encoder:
      ``deformable`` Deformable DETR's: deformable self-attention over every level, with sine
                    position and level embeddings.
      ``hybrid``    RT-DETR's: AIFI (one plain transformer layer stack on the coarsest level,
                    ``aifi_levels``) then CCFM, a top-down and bottom-up fusion of the levels
                    by CSP blocks of RepVGG convolutions; its maps are ``encoder_dim`` wide and
                    the decoder reads them through 1x1 conv + batch norm projections.
    """

    variant: Literal["deformable_detr", "h_deformable_detr", "dino", "rt_detr"] = (
        "deformable_detr")
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "resnet50"})
    hidden_dim: int = 256
    # Backbone stages (0..3 = strides 4..32) projected into the transformer; levels beyond
    # them come from stride-2 3x3 convolutions on the last one.
    backbone_levels: tuple[int, ...] = (1, 2, 3)
    num_feature_levels: int = 4
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    # The encoder's FFN width where it differs from the decoder's (None: dim_feedforward).
    encoder_ffn_dim: int | None = None
    encoder: EncoderKind = "deformable"
    # Hybrid encoder: width (None: hidden_dim), the levels AIFI runs on (indices into the
    # backbone levels), RepVGG blocks per CSP block and the CSP hidden-width ratio.
    encoder_dim: int | None = None
    aifi_levels: tuple[int, ...] = (2,)
    # AIFI's position embedding on a non-square grid: transformers 5's row-major layout, or
    # the official code's (and transformers 4's) transposed one (the same on square grids).
    aifi_transposed_grid: bool = False
    csp_blocks: int = 3
    csp_expansion: float = 1.0
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    num_classes: int = 91
    query_init: QueryInit = "learned"
    box_refine: bool = False
    # Which class scores the encoder proposals: Deformable DETR and H-DETR take class 0,
    # DINO the best class.
    proposal_score: ProposalScore = "first_class"
    # DINO: LayerNorm on every decoder output, query_pos from an MLP over the sine
    # embedding of the current reference box, separate encoder-proposal heads.
    decoder_norm: bool = False
    ref_point_head: bool = False
    # What the reference-point head reads: the sine embedding of the box (DINO) or the
    # normalised box itself (RT-DETR's query_pos_head).
    ref_point_input: Literal["sine", "box"] = "sine"
    # Whether the model masks padding (Deformable DETR and DINO) or, as RT-DETR does, sees a
    # padded batch as one canvas: no memory mask, valid ratios of one, boxes relative to it.
    mask_padding: bool = True
    # Sine positional encoding of the feature maps: DINO uses temperature 20 and no
    # offset; Deformable DETR, H-DETR and detrex use 10000 with a -0.5 offset.
    pos_temperature: float = 10000.0
    pos_offset: float = -0.5
    # inverse_sigmoid clamp: 1e-5 in Deformable DETR and H-DETR, 1e-3 in DINO.
    inverse_sigmoid_eps: float = 1e-5
    # The clamp the heads' boxes use where it differs from the refinement's (None: the same):
    # mmdetection 3's DINO refines with 1e-3 but its head adds inverse_sigmoid(ref) at 1e-5.
    head_inverse_sigmoid_eps: float | None = None
    # DINO's denoising label embedding ``label_enc`` has dn_labelbook_size + 1 rows (91 + 1
    # for COCO; RT-DETR's num_classes + 1): unused at inference, kept to embed external
    # boxes' labels as the denoising queries are built.
    dn_labelbook_size: int = 91
    # Post-processing: top-k over queries x classes, as each original PostProcess.
    num_select: int = 100
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    @property
    def two_stage(self) -> bool:
        return self.query_init != "learned"

    @property
    def look_forward_twice(self) -> bool:
        """DINO's (and RT-DETR's) box refinement lets a layer's box loss reach the previous
        layer's box head (through the reference it refined); Deformable DETR's stops it
        there. Only training sees the difference."""
        return self.variant in ("dino", "rt_detr")

    @property
    def has_label_enc(self) -> bool:
        """Whether the model keeps a denoising label embedding (DINO, RT-DETR)."""
        return self.variant in ("dino", "rt_detr")

    @property
    def encoder_width(self) -> int:
        return self.encoder_dim or self.hidden_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown detector config keys: {', '.join(unknown)}")
        data = dict(data)
        for key in ("image_mean", "image_std", "backbone_levels", "aifi_levels"):
            if key in data:
                data[key] = tuple(data[key])
        if "backbone" in data:  # JSON turns the backbone's tuples into lists
            data["backbone"] = {k: tuple(v) if isinstance(v, list) else v
                                for k, v in data["backbone"].items()}
        return cls(**data)
