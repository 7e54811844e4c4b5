"""The plain-attention DETRs: DETR, Conditional DETR and DAB-DETR.

One stride-32 level (a 1x1 projection of the backbone's last stage), a standard multi-head
attention encoder with DETR's normalised sine positions, and one of three decoders
(``DetectorConfig.decoder``):

``plain``        DETR: zero content, learned query positions added to queries and keys.
``conditional``  Conditional DETR: a 2-d reference point per query (an MLP of its learned
                 position), cross-attention whose query and key concatenate, per head, a
                 content part and a spatial part (the sine of the reference point, scaled by
                 an MLP of the content from the second layer on).
``anchor``       DAB-DETR: learned 4-d anchor boxes; each layer's query position is an MLP
                 of the anchor's sine embedding, its spatial query is modulated by a
                 predicted width and height over the anchor's, and the box head refines the
                 anchor after every layer.

The model answers the canonical model's interface (``encode``, ``initial_queries``,
``decode``, ``encoder_layers``, ``backbone``, ``transformer``), so the frozen detector,
the feature cache and the mask head use it unchanged; ``decode_boxes`` gives queries for
external boxes. The encoder gives one state, the memory the decoder reads.

Parameter names follow the official code (``self_attn``, ``norm1``, ``linear1``;
Conditional DETR's ``sa_qcontent_proj`` ... ``ca_qpos_sine_proj``); one class head and one
box head serve every decoder layer, as in all three.
Shapes: B batch, S = H x W memory positions, Q queries, C width. Boxes: normalised
(cx, cy, w, h) of each image's own (unpadded) area.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import Encoded, Queries, RawDetection
from frozenseg.detector.position import box_position_embedding, feature_position_embedding
from frozenseg.detector.transformer import MLP, inverse_sigmoid


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              padding: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention per head: q (B, Q, D), k (B, S, D), v (B, S, Dv), each
    split into ``heads`` equal parts; padding (B, S) True where keys are ignored.
    Returns (B, Q, Dv). The scale is 1 / sqrt(D / heads)."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    mask = None if padding is None else ~padding[:, None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def concat_heads(a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) and (B, N, C) -> (B, N, 2C) with each head's part of ``a`` then of ``b``."""
    return torch.cat([a.unflatten(-1, (heads, -1)), b.unflatten(-1, (heads, -1))],
                     -1).flatten(-2)


class HeadsOut(nn.Module):
    """Attention over already projected q, k, v, then the output projection."""

    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q, k, v, padding=None):
        return self.out_proj(attention(q, k, v, self.heads, padding))


class Attention(HeadsOut):
    """Standard multi-head attention: q, k, v projections, attention, output projection."""

    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__(dim=dim, heads=heads)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, query, key, value, padding=None):
        return super().forward(self.q_proj(query), self.k_proj(key), self.v_proj(value),
                               padding)


class FFN(nn.Module):
    """linear1, activation (ReLU or DAB-DETR's PReLU, one learned slope), linear2."""

    def __init__(self, *, dim: int, ffn_dim: int, activation: str) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.activation = nn.PReLU() if activation == "prelu" else nn.ReLU()

    def forward(self, x):
        return self.linear2(self.activation(self.linear1(x)))


def _ffn_parts(module: nn.Module, dim: int, ffn_dim: int, activation: str) -> None:
    """linear1 / activation / linear2 under the layer itself (the official names)."""
    ffn = FFN(dim=dim, ffn_dim=ffn_dim, activation=activation)
    module.linear1, module.activation, module.linear2 = ffn.linear1, ffn.activation, ffn.linear2


class EncoderLayer(nn.Module):
    """Self-attention (position added to queries and keys) -> add & norm -> FFN -> add & norm."""

    def __init__(self, *, dim: int, ffn_dim: int, heads: int, activation: str) -> None:
        super().__init__()
        self.self_attn = Attention(dim=dim, heads=heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        _ffn_parts(self, dim, ffn_dim, activation)

    def forward(self, x, pos, padding):
        x = self.norm1(x + self.self_attn(x + pos, x + pos, x, padding))
        return self.norm2(x + self.linear2(self.activation(self.linear1(x))))


class PlainEncoder(nn.Module):
    """The encoder layers; DAB-DETR scales the positions by an MLP of the content
    (``query_scale``) before every layer."""

    def __init__(self, *, layers: list[EncoderLayer], dim: int, pos_scale: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.query_scale = (MLP(in_dim=dim, hidden_dim=dim, out_dim=dim, num_layers=2)
                            if pos_scale else None)

    def forward(self, x, pos, padding):
        for layer in self.layers:
            scaled = pos if self.query_scale is None else pos * self.query_scale(x)
            x = layer(x, scaled, padding)
        return x


class PlainDecoderLayer(nn.Module):
    """DETR's: self-attention and cross-attention with the query position added to the
    queries (and, in self-attention, keys); the memory's position added to its keys."""

    def __init__(self, *, dim: int, ffn_dim: int, heads: int, activation: str) -> None:
        super().__init__()
        self.self_attn = Attention(dim=dim, heads=heads)
        self.cross_attn = Attention(dim=dim, heads=heads)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        _ffn_parts(self, dim, ffn_dim, activation)

    def forward(self, tgt, memory, pos, padding, query_pos, query_sine=None):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt))
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, memory + pos, memory, padding))
        return self.norm3(tgt + self.linear2(self.activation(self.linear1(tgt))))


class ConditionalDecoderLayer(nn.Module):
    """Conditional DETR's (and DAB-DETR's) layer: content and position projected apart.

    Self-attention: q = sa_qcontent(tgt) + sa_qpos(query_pos), k likewise, v = sa_v(tgt).
    Cross-attention: per head, the query is [ca_qcontent(tgt) (+ ca_qpos(query_pos) where
    kept), ca_qpos_sine(query_sine)] and the key [ca_kcontent(memory) (+ ca_kpos(pos) where
    the query position is kept), ca_kpos(pos)]: twice the width, scaled by sqrt(2C / heads).
    """

    def __init__(self, *, dim: int, ffn_dim: int, heads: int, activation: str,
                 query_pos: bool) -> None:
        super().__init__()
        self.heads = heads
        for name in ("sa_qcontent", "sa_qpos", "sa_kcontent", "sa_kpos", "sa_v", "ca_qcontent",
                     "ca_kcontent", "ca_kpos", "ca_v", "ca_qpos_sine"):
            setattr(self, f"{name}_proj", nn.Linear(dim, dim))
        self.ca_qpos_proj = nn.Linear(dim, dim) if query_pos else None
        self.self_attn = HeadsOut(dim=dim, heads=heads)
        self.cross_attn = HeadsOut(dim=dim, heads=heads)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        _ffn_parts(self, dim, ffn_dim, activation)

    def forward(self, tgt, memory, pos, padding, query_pos, query_sine):
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.self_attn(q, k, self.sa_v_proj(tgt)))
        q, k = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
        q = concat_heads(q, self.ca_qpos_sine_proj(query_sine), self.heads)
        k = concat_heads(k, k_pos, self.heads)
        tgt = self.norm2(tgt + self.cross_attn(q, k, self.ca_v_proj(memory), padding))
        return self.norm3(tgt + self.linear2(self.activation(self.linear1(tgt))))


class PlainDecoder(nn.Module):
    """The decoder layers, their shared output norm and the kind's query machinery.

    forward(content (B, Q, C), reference (B, Q, 2|4) or None, query_pos (B, Q, C) or None,
    memory, pos, padding, box_head) -> (states, references): the normed output of every
    layer and the reference each layer read (None for DETR).
    """

    def __init__(self, *, kind: str, layers: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)
        if kind == "plain":
            return
        self.query_scale = MLP(in_dim=dim, hidden_dim=dim, out_dim=dim, num_layers=2)
        anchors = kind == "anchor"
        self.ref_point_head = MLP(in_dim=2 * dim if anchors else dim, hidden_dim=dim,
                                  out_dim=dim if anchors else 2, num_layers=2)
        if anchors:
            self.ref_anchor_head = MLP(in_dim=dim, hidden_dim=dim, out_dim=2, num_layers=2)

    def forward(self, content, reference, query_pos, memory, pos, padding, box_head,
                inverse_sigmoid_eps: float):
        tgt, states, references = content, [], []
        for i, layer in enumerate(self.layers):
            query_pos, sine = self._positions(i, tgt, reference, query_pos)
            tgt = layer(tgt, memory, pos, padding, query_pos, sine)
            states.append(self.norm(tgt))
            references.append(reference)
            if self.kind == "anchor":  # the box head on the raw output refines the anchor
                reference = (box_head(tgt)
                             + inverse_sigmoid(reference, inverse_sigmoid_eps)).sigmoid().detach()
        return states, references

    def _positions(self, i: int, tgt, reference, query_pos):
        """Layer i's query position and spatial query (the reference's sine embedding,
        y before x, scaled by an MLP of the content after the first layer)."""
        if self.kind == "plain":
            return query_pos, None
        c = tgt.shape[-1]
        sine = box_position_embedding(reference, num_feats=c // 2, order="yxwh").to(tgt)
        if self.kind == "anchor":
            query_pos, sine = self.ref_point_head(sine), sine[..., :c]
        if i > 0:
            sine = sine * self.query_scale(tgt)
        if self.kind == "anchor":  # attention modulated by a predicted size over the anchor's
            size = self.ref_anchor_head(tgt).sigmoid() / reference[..., 2:]  # (w, h)
            sine = torch.cat([sine[..., : c // 2] * size[..., 1:],  # y part: by height
                              sine[..., c // 2:] * size[..., :1]], -1)  # x part: by width
        return query_pos, sine


class PlainTransformer(nn.Module):
    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        c, heads, act = config.hidden_dim, config.nheads, config.activation
        ffn = config.encoder_ffn_dim or config.dim_feedforward
        self.encoder = PlainEncoder(
            layers=[EncoderLayer(dim=c, ffn_dim=ffn, heads=heads, activation=act)
                    for _ in range(config.enc_layers)],
            dim=c, pos_scale=config.encoder_pos_scale)
        ffn = config.dim_feedforward
        if config.decoder == "plain":
            layers = [PlainDecoderLayer(dim=c, ffn_dim=ffn, heads=heads, activation=act)
                      for _ in range(config.dec_layers)]
        else:
            layers = [ConditionalDecoderLayer(dim=c, ffn_dim=ffn, heads=heads, activation=act,
                                              query_pos=i == 0 or config.keep_query_pos)
                      for i in range(config.dec_layers)]
        self.decoder = PlainDecoder(kind=config.decoder, layers=layers, dim=c)


class PlainDETR(nn.Module):
    """Backbone, 1x1 input projection, plain transformer, one class head, one box head.

    Class logits: num_classes (+1 "no object" for DETR). Query parameters: ``query_embed``
    (Q, C) learned query positions (DETR, Conditional DETR) or ``refpoint_embed`` (Q, 4)
    anchor logits and ``patterns`` (P, C) contents (DAB-DETR).
    """

    def __init__(self, *, config: DetectorConfig, backbone: nn.Module) -> None:
        super().__init__()
        if config.decoder not in ("plain", "conditional", "anchor"):
            raise ValueError(f"a plain encoder needs a plain, conditional or anchor decoder, "
                             f"not {config.decoder!r}")
        self.config = config
        c = config.hidden_dim
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.channels[config.backbone_levels[-1]], c, 1)
        self.transformer = PlainTransformer(config)
        if config.decoder == "anchor":
            self.refpoint_embed = nn.Embedding(config.num_queries, 4)
            if config.num_patterns:
                self.patterns = nn.Embedding(config.num_patterns, c)
        else:
            self.query_embed = nn.Embedding(config.num_queries, c)
        self.class_embed = nn.Linear(c, config.num_classes + int(config.no_object_class))
        self.bbox_embed = MLP(in_dim=c, hidden_dim=c, out_dim=4, num_layers=3)

    @property
    def encoder_layers(self) -> int:
        """One encoder state: the memory the decoder reads."""
        return 1

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> RawDetection:
        """images: (B, 3, H, W) normalised; padding_mask: (B, H, W), True on padding."""
        encoded = self.encode(images, padding_mask)
        return self.decode(self.initial_queries(encoded.encoder_states[-1]), encoded)

    def encode(self, images: torch.Tensor, padding_mask: torch.Tensor,
               features: list[torch.Tensor] | None = None) -> Encoded:
        """images (B, 3, H, W) normalised, padding_mask (B, H, W) True on padding -> the
        backbone maps and the encoder output over the stride-32 level."""
        features = self.backbone(images) if features is None else features
        src = self.input_proj(features[self.config.backbone_levels[-1]])
        mask = F.interpolate(padding_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
        flat_mask = mask.flatten(1)
        memory = self.transformer.encoder(src.flatten(2).transpose(1, 2),
                                          self._position(mask).to(src.dtype), flat_mask)
        h, w = src.shape[-2:]
        valid = torch.stack([(~mask[:, 0, :]).sum(1) / w, (~mask[:, :, 0]).sum(1) / h], -1)
        return Encoded(features=features, encoder_states=[memory], mask=flat_mask,
                       shapes=[(h, w)], valid_ratios=valid[:, None].to(src.dtype))

    def _position(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) padding -> (B, H*W, C) sine position of each pixel in its valid area."""
        pos = feature_position_embedding(~mask, num_feats=self.config.hidden_dim // 2,
                                         temperature=self.config.pos_temperature,
                                         offset=self.config.pos_offset)
        return pos.flatten(2).transpose(1, 2)

    def initial_queries(self, memory, memory_mask=None, shapes=None, text=None) -> Queries:
        """The learned queries: zero (or pattern) content; query positions (DETR), their
        reference points (Conditional DETR) or the anchors (DAB-DETR). (``text``: the
        canonical model's signature; a closed-set DETR has none.)"""
        b, c = memory.shape[0], self.config.hidden_dim
        if self.config.decoder == "anchor":
            anchors = self.refpoint_embed.weight.sigmoid()
            content = memory.new_zeros(len(anchors), c)
            if self.config.num_patterns:  # pattern p with every anchor, pattern-major
                content = self.patterns.weight.repeat_interleave(len(anchors), 0)
                anchors = anchors.repeat(self.config.num_patterns, 1)
            return Queries(content[None].expand(b, -1, -1), anchors[None].expand(b, -1, -1),
                           None)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        reference = None
        if self.config.decoder == "conditional":
            reference = self.transformer.decoder.ref_point_head(query_pos).sigmoid()
        return Queries(torch.zeros_like(query_pos), reference, query_pos)

    def decode(self, queries: Queries, encoded: Encoded) -> RawDetection:
        """The decoder from given queries; the heads on every layer."""
        (h, w), memory = encoded.shapes[0], encoded.encoder_states[-1]
        pos = self._position(encoded.mask.unflatten(1, (h, w))).to(memory.dtype)
        states, references = self.transformer.decoder(
            queries.content, queries.reference, queries.query_pos, memory, pos, encoded.mask,
            self.bbox_embed, self.config.inverse_sigmoid_eps)
        eps = self.config.head_inverse_sigmoid_eps  # mmdet's DAB-DETR head: 1e-3
        eps = self.config.inverse_sigmoid_eps if eps is None else eps
        boxes = []
        for state, reference in zip(states, references, strict=True):
            delta = self.bbox_embed(state)
            if reference is not None:
                n = reference.shape[-1]
                delta = torch.cat([delta[..., :n] + inverse_sigmoid(reference, eps),
                                   delta[..., n:]], -1)
            boxes.append(delta.sigmoid())
        return RawDetection(logits=[self.class_embed(s) for s in states], boxes=boxes,
                            decoder_states=states, encoded=encoded)

    def decode_boxes(self, boxes: torch.Tensor, labels: torch.Tensor | None,
                     encoded: Encoded) -> RawDetection:
        """Queries for external boxes (N, 4) normalised cxcywh, of one image (a batch of one);
        ``labels`` are not read: no plain DETR embeds a class into a query.

        DAB-DETR takes them as its anchors, with its content as for its own queries: zero,
        or the mean of its learned patterns. DETR's queries carry no box (a learned
        position each) and Conditional DETR's only a point set by a learned position, so
        neither can be built from a box: the decoder runs on the image as usual and each box
        takes the query whose last-layer box overlaps it most (IoU; the first on a tie).
        """
        if self.config.decoder == "anchor":
            content = boxes.new_zeros(len(boxes), self.config.hidden_dim)
            if self.config.num_patterns:
                content = self.patterns.weight.mean(0).expand(len(boxes), -1)
            return self.decode(Queries(content[None], boxes[None], None), encoded)
        memory = encoded.encoder_states[-1]
        raw = self.decode(self.initial_queries(memory), encoded)
        overlap = box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                          box_convert(raw.boxes[-1][0], "cxcywh", "xyxy"))  # (N, Q)
        best = overlap.argmax(1)[None]  # (1, N)

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, best[..., None].expand(-1, -1, x.shape[-1]))

        return RawDetection(logits=[pick(x) for x in raw.logits],
                            boxes=[pick(x) for x in raw.boxes],
                            decoder_states=[pick(x) for x in raw.decoder_states],
                            encoded=encoded)

