"""DetectorOutput: the one contract between the frozen detector and the trainable head."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class DetectorOutput:
    """What the frozen detector gives the mask head, for a batch of B images.

    queries         (B, K, C)  last decoder layer hidden states of the K predictions
    boxes           (B, K, 4)  normalised (cx, cy, w, h) relative to each image's own,
                               unpadded size (multiply by image_sizes to get pixels)
    scores          (B, K)     class probability of the prediction (sigmoid)
    labels          (B, K)     class index (contiguous, as the detector's classifier)
    query_mask      (B, K)     True for real predictions (False pads ragged batches)
    memory          (B, S, C)  output of the chosen encoder layer, all levels flattened
    memory_mask     (B, S)     True at padding positions of the memory
    spatial_shapes  (L, 2)     (H, W) of each level; level_start_index (L,); valid_ratios
                               (B, L, 2) the unpadded fraction (w, h) of each level
    c1              (B, C1, H/4, W/4) the backbone's stride-4 map
    image_sizes     (B, 2)     unpadded (H, W) of each input image, in pixels
    """

    queries: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    query_mask: torch.Tensor
    memory: torch.Tensor
    memory_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    c1: torch.Tensor
    image_sizes: torch.Tensor

    def to(self, device: torch.device | str) -> DetectorOutput:
        """The same output on another device (dtypes unchanged)."""
        return DetectorOutput(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def boxes_xyxy_pixels(self) -> torch.Tensor:
        """(B, K, 4) absolute (x0, y0, x1, y1) in each image's pixels."""
        cx, cy, w, h = self.boxes.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        height, width = self.image_sizes.unbind(-1)
        scale = torch.stack([width, height, width, height], -1)[:, None].to(xyxy)
        return xyxy * scale
