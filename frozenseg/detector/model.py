"""The canonical deformable DETR: backbone, input projections, transformer, heads.

One class covers Deformable DETR (single-stage, two-stage, box refinement),
H-Deformable-DETR, DINO, RT-DETR (v1 and v2: a hybrid encoder under
``transformer.encoder``, whose maps reach the decoder through ``input_proj``, 1x1 conv +
batch norm), D-FINE / DEIM (the hybrid encoder with ELAN fusion, and the FDR decoder of
``fdr.py``, whose per-layer boxes come from distributions), Grounding DINO (open
vocabulary: a BERT ``text_backbone``, a fusion encoder, text cross-attention in the decoder
layers and dot-product class heads, from ``detector/grounding.py``; the prompt travels in
``Encoded.text``) and LW-DETR / RF-DETR (no encoder: the backbone's projector levels are
the memory, boxes move by ``scaled`` deltas); :class:`DetectorConfig` says which. Parameter
names
follow the official repositories (``backbone.``, ``input_proj.``, ``transformer.``,
``query_embed``, ``class_embed.i``, ``bbox_embed.i``), with every tensor stored once:
per-layer heads are separate modules (shared ones in a checkpoint are simply copied)
and the encoder-proposal heads of two-stage models live in ``transformer.enc_out_*``.
DINO's (and RT-DETR's) denoising label embedding is kept as ``label_enc``: inference does
not use it, but it embeds class labels as the denoising queries do (content =
label_enc(class id), reference box = the box itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from frozenseg.detector import grounding
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.fdr import FDRDecoder, GatedDecoderLayer, QualityHead
from frozenseg.detector.hybrid import (
    AIFI,
    AttentionEncoderLayer,
    HybridEncoder,
    LiteEncoder,
    csp_fusion,
    elan5_fusion,
    elan_fusion,
)
from frozenseg.detector.position import box_position_embedding, feature_position_embedding
from frozenseg.detector.transformer import (
    MLP,
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    encoder_proposals,
    inverse_sigmoid,
)
from frozenseg.ops import MSDeformAttn


@dataclass
class Encoded:
    """The encoder's side of a forward: stage maps, encoder outputs and the level layout.

    encoder_states: one (B, S, C) per encoder layer; mask: (B, S), True at padding;
    shapes: the (H, W) of each level, int pairs read off the maps (traced sizes under the
    TorchScript tracer, symbolic ones under torch.compile); valid_ratios (B, L, 2) as
    Deformable DETR; text: the encoded prompt of an open-vocabulary detector (else None).
    """

    features: list[torch.Tensor]
    encoder_states: list[torch.Tensor]
    mask: torch.Tensor
    shapes: list[tuple[int, int]]
    valid_ratios: torch.Tensor
    text: grounding.Text | None = None


@dataclass
class RawDetection:
    """Everything one forward computes. Boxes are normalised (cx, cy, w, h).

    logits, boxes, decoder_states: one entry per decoder layer, (B, Q, K), (B, Q, 4),
    (B, Q, C); encoded: the backbone and encoder side.
    """

    logits: list[torch.Tensor]
    boxes: list[torch.Tensor]
    decoder_states: list[torch.Tensor]
    encoded: Encoded

    @property
    def encoder_states(self) -> list[torch.Tensor]:
        return self.encoded.encoder_states


@dataclass
class Proposals:
    """The top-Q encoder proposals (two-stage): tokens (B, Q, C) (the encoder output, after
    enc_output and its norm where the config has them), class_logits (B, Q, K), box_logits
    (B, Q, 4) (inverse sigmoid space), with gradients; index (B, Q) their positions in the
    memory."""

    tokens: torch.Tensor
    class_logits: torch.Tensor
    box_logits: torch.Tensor | None
    index: torch.Tensor
    # The boxes themselves (normalised cx, cy, w, h) where deltas are ``scaled`` (LW-DETR):
    # they may leave [0, 1], so there is no logit for them (box_logits is None).
    boxes: torch.Tensor | None = None


@dataclass
class Queries:
    """Decoder input: content (B, Q, C), reference (B, Q, 2|4), query_pos (B, Q, C) or None."""

    content: torch.Tensor
    reference: torch.Tensor
    query_pos: torch.Tensor | None


def class_head(config: DetectorConfig) -> nn.Module:
    """A linear classifier, or for an open-vocabulary detector the dot product with the text."""
    if config.open_vocabulary:
        return grounding.ContrastiveHead(max_text_len=config.max_text_len)
    return nn.Linear(config.hidden_dim, config.num_classes)


def build_encoder(config: DetectorConfig, channels: list[int]) -> nn.Module:
    """The encoder the config names: deformable (over the projected levels), hybrid or lite
    (over the backbone's maps, ``channels`` wide each)."""
    ffn_dim = config.encoder_ffn_dim or config.dim_feedforward
    if config.encoder == "fusion":
        return grounding.FusionEncoder(layers=[
            grounding.FusionEncoderLayer(dim=config.hidden_dim, ffn_dim=ffn_dim,
                                         levels=config.num_feature_levels, heads=config.nheads,
                                         points=config.enc_n_points)
            for _ in range(config.enc_layers)
        ], dim=config.hidden_dim)
    if config.encoder == "deformable":
        return Encoder(layers=[
            EncoderLayer(dim=config.hidden_dim, ffn_dim=ffn_dim, levels=config.num_feature_levels,
                         heads=config.nheads, points=config.enc_n_points)
            for _ in range(config.enc_layers)
        ])
    dim = config.encoder_width
    aifi = {level: AIFI(layers=[AttentionEncoderLayer(dim=dim, ffn_dim=ffn_dim,
                                                      heads=config.nheads)
                                for _ in range(config.enc_layers)],
                        temperature=config.pos_temperature,
                        transposed_grid=config.aifi_transposed_grid)
            for level in config.aifi_levels}
    fusion = {"csp": csp_fusion, "elan": elan_fusion,
              "elan5": partial(elan5_fusion, trailing=config.csp_trailing_conv),
              }[config.hybrid_fusion](dim, config.csp_blocks, config.csp_expansion)
    in_channels = [channels[s] for s in config.backbone_levels]
    if config.encoder == "lite":  # DEIMv2's small models: its blocks, no attention
        return LiteEncoder(in_channels=in_channels, dim=dim,
                           fusion_block=fusion["fusion_block"])
    return HybridEncoder(in_channels=in_channels, dim=dim, aifi=aifi, **fusion)


def build_decoder(config: DetectorConfig) -> nn.Module:
    """The decoder the config names: deformable (DINO's, RT-DETR's, Grounding DINO's with
    text cross-attention) or D-FINE's FDR."""
    c = config.hidden_dim
    if config.decoder == "fdr":
        return FDRDecoder(
            layers=[GatedDecoderLayer(dim=c, ffn_dim=config.dim_feedforward,
                                      levels=config.num_feature_levels, heads=config.nheads,
                                      points=config.dec_n_points, style=config.fdr_layer,
                                      gateway=config.fdr_gateway, activation=config.activation)
                    for _ in range(config.dec_layers)],
            ref_point_head=MLP(in_dim=4, hidden_dim=config.ref_point_hidden_dim or 2 * c,
                               out_dim=c, num_layers=config.ref_point_layers,
                               activation=config.mlp_activation),
            dim=c, bins=config.fdr_bins, reg_scale=config.fdr_reg_scale, up=config.fdr_up,
            quality=[QualityHead(bins=config.fdr_bins, top_k=config.lqe_top_k,
                                 hidden_dim=config.lqe_hidden_dim, layers=config.lqe_layers,
                                 activation=config.lqe_activation)
                     for _ in range(config.dec_layers)],
            activation=config.mlp_activation, query_pos_once=config.fdr_query_pos_once)
    # Grounding DINO's layers attend to the text before the image.
    layer = grounding.TextDecoderLayer if config.open_vocabulary else DecoderLayer
    return Decoder(
        layers=[layer(dim=c, ffn_dim=config.dim_feedforward, levels=config.num_feature_levels,
                      heads=config.nheads, points=config.dec_n_points,
                      cross_heads=config.dec_cross_heads)
                for _ in range(config.dec_layers)],
        dim=c, norm=config.decoder_norm, ref_point_head=config.ref_point_head,
        inverse_sigmoid_eps=config.inverse_sigmoid_eps,
        look_forward_twice=config.look_forward_twice,
        ref_point_input=config.ref_point_input,
    )


class DeformableTransformer(nn.Module):
    """Level embeddings, encoder, decoder, and the parts that initialise the queries."""

    def __init__(self, config: DetectorConfig, channels: list[int]) -> None:
        super().__init__()
        c = config.hidden_dim
        if config.encoder in ("deformable", "fusion"):  # the encoders that read level_embed
            self.level_embed = nn.Parameter(torch.zeros(config.num_feature_levels, c))
        if config.encoder != "none":
            self.encoder = build_encoder(config, channels)
        self.decoder = build_decoder(config)
        if not config.two_stage:
            self.reference_points = nn.Linear(c, 2)
            return
        if config.proposal_projection:
            self.enc_output = nn.Linear(c, c)
            self.enc_output_norm = nn.LayerNorm(c)
        self.enc_out_class_embed = class_head(config)
        self.enc_out_bbox_embed = MLP(in_dim=c, hidden_dim=c, out_dim=4, num_layers=3,
                                      activation=config.mlp_activation)
        if not config.ref_point_head:
            self.pos_trans = nn.Linear(2 * c, 2 * c)
            self.pos_trans_norm = nn.LayerNorm(2 * c)
        if config.query_init == "mixed":
            self.tgt_embed = nn.Embedding(config.num_queries, c)
        if config.anchor_delta:  # LW-DETR: per-query box deltas moving the selected proposals
            self.refpoint_embed = nn.Embedding(config.num_queries, 4)


class DeformableDETR(nn.Module):
    def __init__(self, *, config: DetectorConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_dim
        self.backbone = backbone
        self.input_proj = nn.ModuleList(self._input_projections(config, backbone.channels))
        self.transformer = DeformableTransformer(config, backbone.channels)
        if config.query_init == "learned":
            self.query_embed = nn.Embedding(config.num_queries, 2 * c)
        if config.has_label_enc:  # row = class id (DINO's training never reads the last)
            self.label_enc = nn.Embedding(config.dn_labelbook_size + 1, c)
        self.class_embed = nn.ModuleList(class_head(config) for _ in range(config.dec_layers))
        if config.open_vocabulary:
            self.text_backbone = grounding.TextBackbone(bert=config.text_encoder, dim=c)
        # D-FINE's box heads predict a distribution over fdr_bins + 1 offsets per edge.
        box_dim = 4 * (config.fdr_bins + 1) if config.decoder == "fdr" else 4
        self.bbox_embed = nn.ModuleList(
            MLP(in_dim=c, hidden_dim=c, out_dim=box_dim, num_layers=3,
                activation=config.mlp_activation)
            for _ in range(config.dec_layers)
        )

    @property
    def encoder_layers(self) -> int:
        """How many encoder states ``encode`` returns: one per deformable (or fusion) encoder
        layer; one for the hybrid encoder (its fused maps) and for none (the backbone's
        levels)."""
        return self.config.enc_layers if self.config.encoder in ("deformable", "fusion") else 1

    def init_for_training(self, prior_prob: float = 0.01) -> None:
        """Deformable DETR's and DINO's initialisation, for training from random weights.

        A module's default init suits loading weights, not learning: classifiers start at
        the focal loss's prior (p = 0.01 for every class, so the first losses are not
        swamped by confident false positives), box heads' last layers at zero (each
        prediction starts at its reference box, which box refinement then corrects),
        transformer matrices Xavier-uniform with the deformable attention's sampling
        grid, level embeddings normal, input projections Xavier with zero bias.
        """
        for p in self.transformer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.transformer.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if hasattr(self.transformer, "level_embed"):
            nn.init.normal_(self.transformer.level_embed)
        classifiers, box_heads = list(self.class_embed), list(self.bbox_embed)
        if self.config.two_stage:
            classifiers.append(self.transformer.enc_out_class_embed)
            box_heads.append(self.transformer.enc_out_bbox_embed)
        for classifier in (c for c in classifiers if isinstance(c, nn.Linear)):
            nn.init.constant_(classifier.bias, -math.log((1 - prior_prob) / prior_prob))
        for head in box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for projection in self.input_proj:
            if isinstance(projection, nn.Identity):  # D-FINE's maps reach the decoder as is
                continue
            nn.init.xavier_uniform_(projection[0].weight)
            if projection[0].bias is not None:
                nn.init.zeros_(projection[0].bias)

    @staticmethod
    def _input_projections(config: DetectorConfig, channels: list[int]) -> list[nn.Module]:
        c = config.hidden_dim
        if config.encoder == "none":  # the backbone's levels are the memory as they are
            return []
        hybrid = config.encoder in ("hybrid", "lite")  # one decoder level per encoder map
        if hybrid and not config.hybrid_projections:  # D-FINE's, same widths
            return [nn.Identity() for _ in range(config.num_feature_levels)]
        if hybrid:  # the decoder's: 1x1 conv + batch norm per encoder map
            return [nn.Sequential(nn.Conv2d(config.encoder_width, c, kernel_size=1, bias=False),
                                  FrozenBatchNorm2d(c))
                    for _ in range(config.num_feature_levels)]
        projections = [
            nn.Sequential(nn.Conv2d(channels[i], c, kernel_size=1), nn.GroupNorm(32, c))
            for i in config.backbone_levels
        ]
        in_channels = channels[config.backbone_levels[-1]]
        for _ in range(config.num_feature_levels - len(config.backbone_levels)):
            projections.append(nn.Sequential(
                nn.Conv2d(in_channels, c, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, c)
            ))
            in_channels = c
        return projections

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor,
                prompt: grounding.Prompt | None = None) -> RawDetection:
        """images: (B, 3, H, W) normalised; padding_mask: (B, H, W), True on padding;
        prompt: the tokenized text of an open-vocabulary detector."""
        encoded = self.encode(images, padding_mask, prompt=prompt)
        memory = encoded.encoder_states[-1]
        return self.decode(self.initial_queries(memory, encoded.mask, encoded.shapes,
                                                text=encoded.text), encoded)

    def encode(self, images: torch.Tensor, padding_mask: torch.Tensor,
               features: list[torch.Tensor] | None = None,
               prompt: grounding.Prompt | None = None) -> Encoded:
        """Backbone, input projections and encoder: everything before the queries.
        ``features``: the backbone's maps when already computed (activation checkpointing);
        ``prompt``: the text an open-vocabulary detector reads with the image."""
        features = self.backbone(images) if features is None else features
        if self.config.encoder in ("hybrid", "lite"):
            return self._encode_hybrid(features, padding_mask)
        if self.config.encoder == "none":
            return self._encode_levels(features, padding_mask)
        srcs, masks = self._levels(features, padding_mask)
        flat = self._flatten(srcs, masks)
        pos = self._positions(masks, flat["src"].dtype)
        args = (flat["src"], pos, flat["shapes"], flat["valid_ratios"], flat["mask"])
        text = None
        if self.config.open_vocabulary:
            if prompt is None:
                raise ValueError("an open-vocabulary detector needs a prompt, e.g. 'cat . dog .'")
            encoder_states, text = self.transformer.encoder(
                *args, self.text_backbone(prompt, len(images)), prompt)
        else:
            encoder_states = self.transformer.encoder(*args)
        return Encoded(features=features, encoder_states=encoder_states, mask=flat["mask"],
                       shapes=flat["shapes"], valid_ratios=flat["valid_ratios"], text=text)

    def _encode_hybrid(self, features: list[torch.Tensor], padding_mask: torch.Tensor) -> Encoded:
        """RT-DETR: the hybrid encoder fuses the backbone maps; the decoder's projections of
        its maps, flattened, are the memory (one state: there are no per-layer outputs)."""
        maps = self.transformer.encoder([features[s] for s in self.config.backbone_levels])
        srcs = [proj(m) for proj, m in zip(self.input_proj, maps, strict=True)]
        masks = [F.interpolate(padding_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
                 for src in srcs]
        flat = self._flatten(srcs, masks)
        return Encoded(features=features, encoder_states=[flat["src"]], mask=flat["mask"],
                       shapes=flat["shapes"], valid_ratios=flat["valid_ratios"])

    def _encode_levels(self, features: list[torch.Tensor], padding_mask: torch.Tensor) -> Encoded:
        """LW-DETR / RF-DETR (no encoder): the backbone's levels (its projector's), flattened,
        are the memory, one state."""
        srcs = [features[s] for s in self.config.backbone_levels]
        flat = self._flatten(srcs, [F.interpolate(padding_mask[None].float(), size=src.shape[-2:])
                                    .to(torch.bool)[0] for src in srcs])
        return Encoded(features=features, encoder_states=[flat["src"]], mask=flat["mask"],
                       shapes=flat["shapes"], valid_ratios=flat["valid_ratios"])

    def decoder_view(self, encoded: Encoded) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The memory mask and valid ratios the decoder attends with: the padding's, or for
        a model that does not mask padding (RT-DETR) none and ones (the whole canvas)."""
        if self.config.mask_padding:
            return encoded.mask, encoded.valid_ratios
        return None, torch.ones_like(encoded.valid_ratios)

    def decode(self, queries: Queries, encoded: Encoded) -> RawDetection:
        """Run the decoder from given queries and apply the heads to every layer."""
        if self.config.decoder == "fdr":
            return self._decode_fdr(queries, encoded)
        memory_mask, valid_ratios = self.decoder_view(encoded)
        text = {} if encoded.text is None else {"text": encoded.text}
        states, references = self.transformer.decoder(
            queries.content, queries.reference, encoded.encoder_states[-1], memory_mask,
            encoded.shapes, valid_ratios, query_pos=queries.query_pos,
            bbox_embed=self.bbox_embed if self.config.box_refine else None, **text,
        )
        logits = [head(s, **text) if text else head(s)
                  for head, s in zip(self.class_embed, states, strict=True)]
        boxes = [self._box(head(s), ref)
                 for head, s, ref in zip(self.bbox_embed, states, references, strict=True)]
        return RawDetection(logits=logits, boxes=boxes, decoder_states=states, encoded=encoded)

    def decode_boxes(self, boxes: torch.Tensor, labels: torch.Tensor | None,
                     encoded: Encoded) -> RawDetection:
        """The decoder's outputs for (N, 4) normalised cxcywh boxes of one image (a batch of
        one), each box a query built as this variant builds its own: two-stage models take
        the box's position embedding as query_pos and content, learned-query models the
        mean learned query; ``labels`` (N,), where given, become the content through the
        label embedding (DINO's denoising queries)."""
        t, c = self.transformer, self.config.hidden_dim
        query_pos = content = None
        if hasattr(t, "pos_trans"):  # two-stage: query_pos and content from the box itself
            sine = box_position_embedding(boxes, num_feats=c // 2).to(boxes.dtype)
            query_pos, content = t.pos_trans_norm(t.pos_trans(sine)).split(c, dim=-1)
        elif self.config.query_init == "learned":
            query_pos, content = self.query_embed.weight.mean(0).split(c)
            query_pos = query_pos.expand(len(boxes), -1)
        if self.config.query_init == "mixed":
            content = t.tgt_embed.weight.mean(0)
        if content is None:  # selected tokens as content (RT-DETR): the mean label embedding
            content = self.label_enc.weight[: self.config.num_classes].mean(0)
        if labels is not None and hasattr(self, "label_enc"):
            content = self.label_enc(labels)
        content = content.expand(len(boxes), -1)
        reference = inverse_sigmoid(boxes, self.config.inverse_sigmoid_eps).sigmoid()
        queries = Queries(content[None], reference[None],
                          None if query_pos is None else query_pos[None])
        return self.decode(queries, encoded)

    def _decode_fdr(self, queries: Queries, encoded: Encoded) -> RawDetection:
        """D-FINE: the decoder gives each layer's boxes (from its distributions); the class
        logits of a layer are raised by its quality head."""
        decoder = self.transformer.decoder
        memory_mask, _ = self.decoder_view(encoded)
        states, boxes, corners = decoder(
            queries.content, queries.reference, encoded.encoder_states[-1], memory_mask,
            encoded.shapes, bbox_embed=self.bbox_embed)
        logits = [quality(head(s), c) for head, quality, s, c in
                  zip(self.class_embed, decoder.lqe_layers, states, corners, strict=True)]
        return RawDetection(logits=logits, boxes=boxes, decoder_states=states, encoded=encoded)

    def _box(self, delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.config.box_delta == "scaled":
            return scaled_box(reference, delta)
        logits = delta.clone()
        eps = self.config.head_inverse_sigmoid_eps
        logits[..., : reference.shape[-1]] += inverse_sigmoid(
            reference, self.config.inverse_sigmoid_eps if eps is None else eps
        )
        return logits.sigmoid()

    def _levels(self, features, padding_mask):
        """Projected multi-scale maps and their padding masks (True on padding)."""
        srcs = [self.input_proj[i](features[s]) for i, s in enumerate(self.config.backbone_levels)]
        for i in range(len(srcs), self.config.num_feature_levels):
            previous = features[self.config.backbone_levels[-1]] if i == len(srcs) else srcs[-1]
            srcs.append(self.input_proj[i](previous))
        masks = [
            F.interpolate(padding_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            for src in srcs
        ]
        return srcs, masks

    def _flatten(self, srcs, masks) -> dict:
        """Concatenate the levels: src and mask over S positions, and the level layout."""
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        valid_ratios = torch.stack([self._valid_ratio(m) for m in masks], 1).to(srcs[0].dtype)
        return {
            "src": torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1),
            "mask": torch.cat([mask.flatten(1) for mask in masks], 1), "shapes": shapes,
            "valid_ratios": valid_ratios,
        }

    def _positions(self, masks, dtype: torch.dtype) -> torch.Tensor:
        """(B, S, C) sine position of every pixel in its level's valid area + level embedding."""
        cfg, flat_pos = self.config, []
        for level, mask in enumerate(masks):
            pos = feature_position_embedding(
                ~mask, num_feats=cfg.hidden_dim // 2, temperature=cfg.pos_temperature,
                offset=cfg.pos_offset,
            ).to(dtype)
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.transformer.level_embed[level])
        return torch.cat(flat_pos, 1)

    @staticmethod
    def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) padding mask -> (B, 2) valid fraction of width and height."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        return torch.stack([valid_w, valid_h], -1)

    def initial_queries(self, memory, memory_mask, shapes, text=None) -> Queries:
        """The decoder's first queries, as the variant initialises them."""
        cfg, t = self.config, self.transformer
        b, _, c = memory.shape
        if cfg.query_init == "learned":
            query_pos, content = self.query_embed.weight.split(c, dim=1)
            query_pos = query_pos[None].expand(b, -1, -1)
            reference = t.reference_points(query_pos).sigmoid()
            return Queries(content[None].expand(b, -1, -1), reference, query_pos)
        proposals = self.select_proposals(memory, memory_mask, shapes, text=text)
        if proposals.boxes is not None:
            reference = proposals.boxes.detach()
        else:
            reference = proposals.box_logits.detach().sigmoid()
        if cfg.anchor_delta:
            reference = scaled_box(reference, t.refpoint_embed.weight[None, : reference.shape[1]])
        query_pos = content = None
        if not cfg.ref_point_head:
            sine = box_position_embedding(reference, num_feats=c // 2).to(memory.dtype)
            embedded = t.pos_trans_norm(t.pos_trans(sine))
            query_pos, content = embedded.split(c, dim=2)
        if cfg.query_init in ("mixed", "selected"):
            content = self.selected_content(proposals)
        return Queries(content, reference, query_pos)

    def selected_content(self, proposals: Proposals) -> torch.Tensor:
        """Content queries (B, Q, C) beside the selected anchors: DINO's learned embedding
        ("mixed") or the selected encoder tokens, without gradient ("selected")."""
        if self.config.query_init == "mixed":
            b, q = proposals.tokens.shape[:2]
            return self.transformer.tgt_embed.weight[None, :q].expand(b, -1, -1)
        return proposals.tokens.detach()

    def select_proposals(self, memory, memory_mask, shapes, text=None) -> Proposals:
        """Two-stage: score every encoder position as a proposal, keep the top num_queries
        (by class 0 or the best class, as the variant ranks them; an open-vocabulary
        detector by the best token of ``text``)."""
        cfg, t = self.config, self.transformer
        if not cfg.mask_padding:  # RT-DETR: every position of the canvas may propose
            memory_mask = torch.zeros_like(memory_mask)
        proposal_logits, valid = encoder_proposals(memory, memory_mask, shapes)
        tokens = memory.masked_fill(~valid, 0.0)
        if cfg.proposal_projection:
            tokens = t.enc_output_norm(t.enc_output(tokens))
        class_logits = (t.enc_out_class_embed(tokens) if text is None
                        else t.enc_out_class_embed(tokens, text))
        scaled = cfg.box_delta == "scaled"
        if scaled:  # LW-DETR: only valid positions compete
            class_logits = class_logits.masked_fill(~valid, float("-inf"))
        scores = (class_logits[..., 0] if cfg.proposal_score == "first_class"
                  else class_logits.max(-1).values)
        deltas = t.enc_out_bbox_embed(tokens)
        # Images too small to offer num_queries positions get one query per position.
        top = torch.topk(scores, min(cfg.num_queries, scores.shape[1]), dim=1).indices

        def gather(x: torch.Tensor) -> torch.Tensor:
            return torch.gather(x, 1, top[..., None].expand(-1, -1, x.shape[-1]))

        if scaled:  # the proposals in box space (0 where invalid), moved by scaled deltas
            boxes = scaled_box(proposal_logits.sigmoid().masked_fill(~valid, 0.0), deltas)
            return Proposals(gather(tokens), gather(class_logits), None, top, gather(boxes))
        return Proposals(gather(tokens), gather(class_logits), gather(deltas + proposal_logits),
                         top)


def scaled_box(reference: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """LW-DETR's box update: (cx, cy) + delta_xy * (w, h), (w, h) * exp(delta_wh), on
    normalised (cx, cy, w, h) boxes (B, Q, 4); the gradient reaches both."""
    centre = reference[..., :2] + delta[..., :2] * reference[..., 2:]
    return torch.cat([centre, reference[..., 2:] * delta[..., 2:].exp()], -1)


def build_detector(config: DetectorConfig) -> DeformableDETR:
    """The detector a config describes, with random weights (a plain encoder: the
    plain-attention DETRs of ``plain.py``, with the same interface)."""
    from frozenseg.detector.backbones import build_backbone

    if config.encoder == "plain":
        from frozenseg.detector.plain import PlainDETR

        return PlainDETR(config=config, backbone=build_backbone(config.backbone))
    return DeformableDETR(config=config, backbone=build_backbone(config.backbone))
