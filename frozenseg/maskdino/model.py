"""Mask DINO: DINO plus a mask branch, on the detector's own modules.

The detector part is frozenseg's one deformable DETR (:class:`DeformableDETR`, variant
"dino": backbone, input projections, encoder, decoder, class and box heads, label
embedding); nothing of the transformer is copied here. The mask branch adds
(paper sec. 3.1-3.2):

* a pixel embedding map at 1/4: the backbone's stride-4 map through a 1x1 conv to the
  hidden width, plus the 2x-upsampled stride-8 level of the encoder output, through a
  3x3 conv (the segmentation head) and a 1x1 conv to ``mask_dim``;
* a mask embedding per query (an MLP of the normed decoder state); a query's mask is
  its mask embedding dot the pixel map, at every decoder layer;
* unified query selection: the top-Q encoder tokens (by best class score) give the
  content queries (their features), the anchor boxes, and masks of their own (the
  ``encoder`` predictions, supervised like a decoder layer); with
  ``mask_enhanced_boxes`` the anchors are the boxes of those masks (sec. 3.2);
* denoising queries in training (:mod:`frozenseg.maskdino.denoising`): label
  embeddings at noised ground-truth boxes, in front of the matching queries, behind
  the attention mask that keeps the groups apart.

Parameter names: the detector's own under ``detector.`` (so a converted DINO loads as it
is, and the joint model saves back to a converted-detector folder), the mask branch
under ``pixel_lateral``, ``pixel_output``, ``mask_features``, ``mask_embed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import box_convert, masks_to_boxes

from frozenseg.detector.model import DeformableDETR, Encoded
from frozenseg.detector.output import stack_padded
from frozenseg.detector.transformer import MLP
from frozenseg.maskdino.denoising import ContrastiveDenoising, DenoisingQueries
from frozenseg.maskdino.outputs import MaskDINOOutput, Predictions


class MaskDINO(nn.Module):
    """DINO (``detector``, a two-stage DINO-variant :class:`DeformableDETR`) + mask branch.

    forward(images (B, 3, H, W) normalised, padding_mask (B, H, W) True on padding,
    targets=None) -> :class:`MaskDINOOutput`; ``targets`` (training only: the dicts of
    :mod:`frozenseg.maskdino.outputs`) add the denoising queries.
    """

    def __init__(self, detector: DeformableDETR, *, mask_dim: int | None = None,
                 num_denoising: int = 100, label_noise_ratio: float = 0.4,
                 box_noise_scale: float = 0.4, mask_enhanced_boxes: bool = False) -> None:
        super().__init__()
        config = detector.config
        if (config.variant != "dino" or config.query_init not in ("selected", "mixed")
                or not config.box_refine):
            raise ValueError("Mask DINO builds on a DINO detector with box refinement and "
                             "query_init 'selected' (unified query selection) or 'mixed' "
                             f"(DINO's), not {config.variant} with {config.query_init} queries")
        c, mask_dim = config.hidden_dim, mask_dim or config.hidden_dim
        self.detector = detector
        self.pixel_lateral = nn.Sequential(nn.Conv2d(detector.backbone.channels[0], c, 1),
                                           nn.GroupNorm(32, c))
        self.pixel_output = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(32, c),
                                          nn.ReLU())
        self.mask_features = nn.Conv2d(c, mask_dim, 1)
        self.mask_embed = MLP(in_dim=c, hidden_dim=c, out_dim=mask_dim, num_layers=3)
        self.denoising = ContrastiveDenoising(
            num_classes=config.num_classes, num_queries=config.num_queries,
            num_denoising=num_denoising, label_noise_ratio=label_noise_ratio,
            box_noise_scale=box_noise_scale)
        self.mask_enhanced_boxes = mask_enhanced_boxes
        self.checkpoint_backbone = False

    @property
    def config(self):
        return self.detector.config

    def set_checkpointing(self, *, backbone: bool, encoder: bool, decoder: bool) -> None:
        """Activation checkpointing (recompute in backward instead of keeping)."""
        self.checkpoint_backbone = backbone
        self.detector.transformer.encoder.checkpointing = encoder
        self.detector.transformer.decoder.checkpointing = decoder

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor,
                targets: list[dict] | None = None,
                generator: torch.Generator | None = None) -> MaskDINOOutput:
        if not self.training and len(images) > 1:
            return self._one_by_one(images, padding_mask)
        encoded = self._encode(images, padding_mask)
        pixels = self.pixel_map(encoded)
        sizes = self._image_sizes(padding_mask)
        content, reference, encoder_predictions = self.select_queries(encoded, pixels, sizes)
        dn = None
        if self.training and targets is not None:
            dn = self.denoising(targets, generator=generator)
            if dn.pad_size == 0:
                dn = None
        if dn is not None:
            content = torch.cat([self._dn_content(dn).to(content.dtype), content], 1)
            reference = torch.cat([dn.boxes.to(reference.dtype), reference], 1)
        layers = self.decode(content, reference, encoded, pixels,
                             None if dn is None else dn.attn_mask)
        denoising = None
        if dn is not None:
            denoising = [_split(p, dn.pad_size, first=True) for p in layers]
            layers = [_split(p, dn.pad_size, first=False) for p in layers]
        return MaskDINOOutput(layers=layers, encoder=encoder_predictions, denoising=denoising,
                              dn=dn, image_sizes=sizes,
                              padded_size=(images.shape[-2], images.shape[-1]))

    def _one_by_one(self, images: torch.Tensor, padding_mask: torch.Tensor) -> MaskDINOOutput:
        """Inference on each image alone, at its own size, then padded into one output:
        a padded batch would change the backbone's features near the padding (windows
        and convolutions see it), so a batch gives exactly what single images give."""
        sizes = self._image_sizes(padding_mask)
        singles = [self(images[i:i + 1, :, :h, :w], padding_mask[i:i + 1, :h, :w])
                   for i, (h, w) in enumerate(sizes.tolist())]
        layers = [_stack([s.layers[k] for s in singles]) for k in range(len(singles[0].layers))]
        return MaskDINOOutput(layers=layers, encoder=_stack([s.encoder for s in singles]),
                              denoising=None, dn=None, image_sizes=sizes,
                              padded_size=(images.shape[-2], images.shape[-1]))

    # ------------------------------------------------------------------ parts

    def _encode(self, images: torch.Tensor, padding_mask: torch.Tensor) -> Encoded:
        if self.checkpoint_backbone and self.training and torch.is_grad_enabled():
            backbone = self.detector.backbone
            features = checkpoint(lambda x: tuple(backbone(x)), images, use_reentrant=False)
            return self.detector.encode(images, padding_mask, features=list(features))
        return self.detector.encode(images, padding_mask)

    def pixel_map(self, encoded: Encoded) -> torch.Tensor:
        """(B, mask_dim, H/4, W/4): lateral(C1) + up2(encoder level at stride 8), convs."""
        c1 = encoded.features[0]
        h, w = encoded.shapes[0]
        memory = encoded.encoder_states[-1]
        level = memory[:, :h * w].transpose(1, 2).unflatten(2, (h, w))
        up = F.interpolate(level, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.pixel_output(self.pixel_lateral(c1) + up))

    def predict(self, states: torch.Tensor, pixels: torch.Tensor,
                class_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and mask logits of normed query states (B, Q, C)."""
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(states), pixels)
        return class_head(states), masks

    def select_queries(self, encoded: Encoded, pixels: torch.Tensor, sizes: torch.Tensor):
        """Unified query selection -> (content (B, Q, C), reference boxes (B, Q, 4) in
        (0, 1), the selected proposals' Predictions). Content and reference carry no
        gradient into the encoder (as DINO); the proposals' predictions do. With
        query_init "mixed" the content is DINO's learned embedding instead."""
        det = self.detector
        proposals = det.select_proposals(encoded.encoder_states[-1], encoded.mask,
                                         encoded.shapes)
        boxes = proposals.box_logits.sigmoid()
        norm = det.transformer.decoder.norm
        _, masks = self.predict(norm(proposals.tokens) if norm is not None else proposals.tokens,
                                pixels, nn.Identity())
        reference = boxes.detach()
        if self.mask_enhanced_boxes:
            reference = self._mask_boxes(masks.detach(), sizes)
        return (det.selected_content(proposals), reference,
                Predictions(proposals.class_logits, boxes, masks))

    @staticmethod
    def _mask_boxes(masks: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Boxes (normalised cxcywh of each unpadded image) of the masks > 0 (sec. 3.2);
        an empty mask gives a point box, clamped to a tiny one."""
        b, q = masks.shape[:2]
        xyxy = masks_to_boxes((masks > 0).flatten(0, 1)).view(b, q, 4)
        xyxy[..., 2:] += 1  # a grid cell x spans [x, x + 1)
        cells = (sizes.flip(-1).to(xyxy) / 4).repeat(1, 2)[:, None]  # (B, 1, 4) w, h, w, h
        xyxy = (xyxy / cells).clamp(0, 1)
        return box_convert(xyxy, "xyxy", "cxcywh").clamp(1e-4, 1 - 1e-4)

    def _dn_content(self, dn: DenoisingQueries) -> torch.Tensor:
        """Label embeddings of the denoising queries; zero at padding (label -1)."""
        labels = dn.labels.clamp(min=0)
        return self.detector.label_enc(labels) * (dn.labels >= 0)[..., None]

    def decode(self, content: torch.Tensor, reference: torch.Tensor, encoded: Encoded,
               pixels: torch.Tensor, attn_mask: torch.Tensor | None) -> list[Predictions]:
        """The detector's decoder; class, box and mask predictions after every layer."""
        det = self.detector
        states, references = det.transformer.decoder(
            content, reference, encoded.encoder_states[-1], encoded.mask, encoded.shapes,
            encoded.valid_ratios, bbox_embed=det.bbox_embed,
            self_attn_mask=attn_mask)
        predictions = []
        for i, (state, ref) in enumerate(zip(states, references, strict=True)):
            logits, masks = self.predict(state, pixels, det.class_embed[i])
            predictions.append(Predictions(logits, det._box(det.bbox_embed[i](state), ref), masks))
        return predictions

    @staticmethod
    def _image_sizes(padding_mask: torch.Tensor) -> torch.Tensor:
        heights = (~padding_mask[:, :, 0]).sum(1)
        widths = (~padding_mask[:, 0, :]).sum(1)
        return torch.stack([heights, widths], -1)


def _stack(predictions: list[Predictions]) -> Predictions:
    """Predictions of single images -> one batch, zero-padded (queries, mask grid)."""
    return Predictions(*(stack_padded([getattr(p, name) for p in predictions])
                         for name in ("logits", "boxes", "masks")))


def _split(p: Predictions, pad: int, *, first: bool) -> Predictions:
    """The first ``pad`` queries (denoising) or the rest (matching) of a prediction set."""
    part = slice(0, pad) if first else slice(pad, None)
    return Predictions(p.logits[:, part], p.boxes[:, part], p.masks[:, part])

