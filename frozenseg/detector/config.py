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
EncoderKind = Literal["deformable", "hybrid", "lite", "plain", "fusion", "none"]
DecoderKind = Literal["deformable", "fdr", "plain", "conditional", "anchor"]
BoxDelta = Literal["logit", "scaled"]

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
                    D-FINE's fuses with RepNCSPELAN4 / SCDown (``hybrid_fusion``).
      ``lite``      DEIMv2 Atto / Femto / Pico's (``hybrid.LiteEncoder``): no attention; one
                    backbone map and its pooled half become two levels, fused by one FPN
                    and one PAN step of ``hybrid_fusion`` blocks; otherwise as ``hybrid``.
      ``plain``     DETR's (``plain.py``): standard multi-head self-attention over one stride-32
                    level (a 1x1 projection of the last backbone stage) with sine positions;
                    ``decoder`` then says which of the plain-attention decoders reads it.
      ``fusion``    Grounding DINO's feature enhancer: before each deformable layer, image-text
                    cross-attention and a text self-attention layer (``detector.grounding``).
      ``none``      LW-DETR's and RF-DETR's: no encoder; the backbone's levels (a ViT's maps
                    through the multi-scale projector) are the memory the decoder reads.

    Decoder: ``deformable`` (Deformable DETR's layers), ``fdr`` (D-FINE's Fine-grained
    Distribution Refinement, ``fdr.py``), or one of the plain-attention decoders
    (``plain``, ``conditional``, ``anchor``: below).

    Open vocabulary (Grounding DINO): ``text_encoder`` holds the BERT config of the text
    backbone; the decoder layers then attend to the text and the class heads are dot
    products with it, over ``max_text_len`` token slots.
    """

    variant: Literal["deformable_detr", "h_deformable_detr", "dino", "rt_detr", "d_fine",
                     "detr", "conditional_detr", "dab_detr", "grounding_dino", "lw_detr"] = (
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
    # Plain-attention DETRs (encoder "plain", ``plain.py``). decoder: "plain" (DETR: learned
    # query positions, zero content), "conditional" (Conditional DETR: 2-d reference points
    # from the query positions, conditional cross-attention), "anchor" (DAB-DETR: learned 4-d
    # anchors refined layer by layer, width/height-modulated cross-attention).
    decoder: DecoderKind = "deformable"
    # DAB-DETR: the encoder scales its positions by an MLP of the content; PReLU activations;
    # the query-position projection kept in every cross-attention (not only the first);
    # num_patterns learned contents, each paired with every anchor.
    encoder_pos_scale: bool = False
    # The decoder layers' FFN activation (DAB-DETR's PReLU; DEIM's SiLU in the FDR decoder).
    activation: Literal["relu", "prelu", "silu"] = "relu"
    keep_query_pos: bool = False
    num_patterns: int = 0
    # DETR: a softmax classifier with a last "no object" logit (num_classes + 1 outputs), one
    # detection per query; the others score every class by a sigmoid.
    no_object_class: bool = False
    # D-FINE (and DEIM): the hybrid encoder fuses with RepNCSPELAN4 blocks (their branches
    # csp_expansion * encoder width wide) and SCDown ("elan") instead of CSP blocks ("csp");
    # its maps reach the decoder as they are when the widths agree (hybrid_projections off).
    # The decoder is "fdr" (Fine-grained Distribution Refinement): gated cross-attention
    # without value/output projections, boxes as distributions over fdr_bins + 1 edge
    # offsets weighted by a function of fdr_up and fdr_reg_scale, refined layer on layer
    # from the first layer's box, and logits raised by a quality head (LQE: an MLP of
    # lqe_layers, lqe_hidden_dim wide, over each edge's lqe_top_k probabilities and mean).
    # DEIMv2 (HGNetV2 and DINOv3 models): "elan5" fusion (RepNCSPELAN5, whose CSP blocks split one
    # convolution, with a trailing 3x3 when csp_trailing_conv) on levels merged by a sum;
    # decoder layers ("deimv2") with RMSNorm and a SwiGLU FFN, a gate or not
    # (fdr_gateway), and a query_pos head of ref_point_layers, ref_point_hidden_dim wide
    # (None: twice hidden_dim).
    hybrid_fusion: Literal["csp", "elan", "elan5"] = "csp"
    hybrid_projections: bool = True
    csp_trailing_conv: bool = True
    fdr_bins: int = 32
    fdr_reg_scale: float = 4.0
    fdr_up: float = 0.5
    lqe_top_k: int = 4
    lqe_hidden_dim: int = 64
    lqe_layers: int = 2
    fdr_layer: Literal["d_fine", "deimv2"] = "d_fine"
    fdr_gateway: bool = True
    ref_point_layers: int = 2
    ref_point_hidden_dim: int | None = None
    # DEIMv2's official decoder embeds only the first layer's references and every layer
    # reads that query_pos; D-FINE's (and transformers' DEIMv2) re-embed each layer's.
    fdr_query_pos_once: bool = False
    # The FDR decoder's MLP heads (query_pos, proposal box, first-layer box and distribution
    # heads) and its quality heads: ReLU in D-FINE and transformers; DEIM's configs take SiLU
    # for the heads (``mlp_act``) and its quality heads follow the FFN (``activation``).
    mlp_activation: Literal["relu", "silu"] = "relu"
    lqe_activation: Literal["relu", "silu"] = "relu"
    enc_n_points: int = 4
    # The decoder's cross-attention heads where they differ from its self-attention's
    # (LW-DETR, RF-DETR: 16 and 8; None: nheads).
    dec_cross_heads: int | None = None
    # How a box head's delta moves its reference: ``logit`` (Deformable DETR on): add in
    # inverse-sigmoid space, then sigmoid; ``scaled`` (LW-DETR, RF-DETR): centre + delta_xy
    # * size, size * exp(delta_wh), in box space, for the proposals, the anchors and the
    # heads alike (the scaled kind also ranks only valid proposals: others score -inf).
    box_delta: BoxDelta = "logit"
    # LW-DETR / RF-DETR: each query has a learned box delta (``transformer.refpoint_embed``)
    # that moves its selected proposal (``scaled``) into the reference the decoder reads.
    anchor_delta: bool = False
    # Sampling points per head on every decoder level, or one count per level (D-FINE's
    # released [3, 6, 3]: padded to the largest in the attention, ``ops.MSDeformAttn``).
    dec_n_points: int | tuple[int, ...] = 4
    num_queries: int = 300
    num_classes: int = 91
    query_init: QueryInit = "learned"
    box_refine: bool = False
    # Which class scores the encoder proposals: Deformable DETR and H-DETR take class 0,
    # DINO the best class.
    proposal_score: ProposalScore = "first_class"
    # Two-stage: the encoder tokens pass a Linear + LayerNorm (``enc_output``) before the
    # proposal heads read them; DEIMv2's official decoder has none and scores them as they are.
    proposal_projection: bool = True
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
    # mmdetection 3's DINO refines with 1e-3 but its head adds inverse_sigmoid(ref) at 1e-5;
    # its DAB-DETR refines the anchors at 1e-5 and its head adds them at 1e-3.
    head_inverse_sigmoid_eps: float | None = None
    # DINO's denoising label embedding ``label_enc`` has dn_labelbook_size + 1 rows (91 + 1
    # for COCO; RT-DETR's num_classes + 1): unused at inference, kept to embed external
    # boxes' labels as the denoising queries are built.
    dn_labelbook_size: int = 91
    # Post-processing: top-k over queries x classes, as each original PostProcess.
    num_select: int = 100
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    # Grounding DINO: the BERT config of the text backbone (None: a closed-set detector)
    # and the token slots of its class logits.
    text_encoder: dict[str, Any] | None = None
    max_text_len: int = 256

    @property
    def two_stage(self) -> bool:
        return self.query_init != "learned"

    @property
    def look_forward_twice(self) -> bool:
        """DINO's (and RT-DETR's) box refinement lets a layer's box loss reach the previous
        layer's box head (through the reference it refined); Deformable DETR's stops it
        there. Only training sees the difference."""
        return self.variant in ("dino", "rt_detr", "d_fine")

    @property
    def open_vocabulary(self) -> bool:
        """Whether classes come from a text prompt (Grounding DINO)."""
        return self.text_encoder is not None

    @property
    def has_label_enc(self) -> bool:
        """Whether the model keeps a denoising label embedding (DINO, RT-DETR, D-FINE)."""
        return self.variant in ("dino", "rt_detr", "d_fine")

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
        for key in ("image_mean", "image_std", "backbone_levels", "aifi_levels",
                    "dec_n_points"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if "backbone" in data:  # JSON turns the backbone's tuples into lists
            data["backbone"] = {k: tuple(v) if isinstance(v, list) else v
                                for k, v in data["backbone"].items()}
        return cls(**data)
