"""HeadConfig: every switch of the Mask Frozen-DETR head (paper sections 3 and 5).

Defaults are the paper's final model for H-DETR R50 (Table 6, last row; Table 9 32x32):
2 deformable image-encoder layers, neck, RoIAlign 32x32, channel mapper 128,
2 deformable box-encoder layers, box-to-object attention only, dot-product mask,
mask scoring. The large detectors use 3 image-encoder layers (Table 15).

Sizes that belong to the detector (its hidden width, its stage-1 channels, its number
of feature levels) are not here: ``build_mask_head`` takes them from the detector.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCODER_BLOCKS = ("deformable", "swin", "convnext")
MASK_HEADS = ("dot", "segmenter")


@dataclass
class HeadConfig:
    # Table 1: the training-free baseline has no trainable part at all.
    trainable: bool = True
    roi_align: bool = True          # masks inside RoIAlign'ed boxes (else on the whole image)
    fuse_c1: bool = True            # F = neck(C1) + upsample(E); else F = upsample(E)
    # Table 2: image feature encoder on the encoder maps E ("none" or 0 layers: none).
    image_encoder: str = "deformable"
    image_encoder_layers: int = 2
    # Table 6: point-wise conv + GroupNorm on C1.
    neck: bool = True
    # Table 9: RoIAlign output size (16 | 32 | 64).
    roi_size: int = 32
    # Table 4: channel mapper width after RoIAlign (0: no mapper, keep the detector's).
    mapper_dim: int = 128
    # Table 3: box feature encoder over the RoI tokens.
    box_encoder: str = "deformable"
    box_encoder_layers: int = 2
    # Table 5: query feature encoder parts.
    query_ffn: bool = False
    query_self_attention: bool = False      # object-to-object
    query_cross_attention: bool = True      # box-to-object
    # Table 12: "dot" (q . R) or "segmenter" (linear projections + norm, then dot).
    mask_head: str = "dot"
    # Table 6: predicted mask IoU; final score = class score x IoU.
    mask_scoring: bool = True
    # Block internals (Deformable DETR's encoder defaults).
    num_heads: int = 8
    ffn_dim: int = 1024
    num_points: int = 4
    window_size: int = 7            # Swin blocks
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_encoder", "box_encoder"):
            value = getattr(self, name)
            if value not in (*ENCODER_BLOCKS, "none"):
                raise ValueError(f"head.{name} is {value!r}; one of "
                                 f"{', '.join((*ENCODER_BLOCKS, 'none'))}")
        if self.mask_head not in MASK_HEADS:
            raise ValueError(f"head.mask_head is {self.mask_head!r}; one of "
                             f"{', '.join(MASK_HEADS)}")
        if self.roi_size < 2:
            raise ValueError(f"head.roi_size must be at least 2, not {self.roi_size}")
