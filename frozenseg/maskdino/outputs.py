"""What the Mask DINO model gives its loss and its inference: predictions of a set of
queries, at every decoder layer and for the encoder's selected proposals.

Frames. B images are padded to one (H, W) batch (zeros bottom and right). Boxes are
normalised (cx, cy, w, h) relative to each image's own unpadded size ``image_sizes``
(as DETR's); masks are logits on the stride-4 grid of the *padded* batch, (H/4, W/4)
rounded up, so a mask's pixel (y, x) covers image pixels [4y, 4y + 4) x [4x, 4x + 4)
and everything beyond an image's size is padding.

Training targets, one dict per image (what the joint mode's collate gives the loss):
``labels`` (n,) int64 contiguous class indices (things and stuff), ``boxes`` (n, 4)
normalised cxcywh of the unpadded image, ``masks`` (n, H, W) bool on the padded batch
grid at full resolution, ``isthing`` (n,) bool (stuff: no box loss, no box cost).
An image may have n = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frozenseg.maskdino.denoising import DenoisingQueries


@dataclass
class Predictions:
    """logits (B, Q, K) class logits (sigmoid, no background class); boxes (B, Q, 4)
    normalised cxcywh; masks (B, Q, H/4, W/4) mask logits on the padded grid."""

    logits: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor


@dataclass
class MaskDINOOutput:
    """layers: the matching queries' predictions after every decoder layer (the last is
    the model's answer); encoder: the top-Q encoder proposals the queries started from
    (unified query selection; their masks from the same mask head); denoising: per
    decoder layer, the denoising queries' predictions, with ``dn`` their construction
    (None outside training or when no image has a target); image_sizes: (B, 2) unpadded
    (H, W) in pixels; padded_size: (H, W) of the batch."""

    layers: list[Predictions]
    encoder: Predictions
    denoising: list[Predictions] | None
    dn: DenoisingQueries | None
    image_sizes: torch.Tensor
    padded_size: tuple[int, int]

    @property
    def final(self) -> Predictions:
        return self.layers[-1]
