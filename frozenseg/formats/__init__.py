"""Checkpoint formats frozenseg converts, one module each, registered in one place."""

from __future__ import annotations

from frozenseg.formats import (
    d_fine,
    d_fine_official,
    deformable_detr,
    deimv2,
    deimv2_official,
    detr,
    detrex,
    dino,
    grounding_dino,
    grounding_dino_official,
    h_deformable_detr,
    huggingface,
    huggingface_detr,
    lw_detr,
    lw_detr_official,
    mmdet,
    mmdet_detr,
    rt_detr,
    rt_detr_official,
)
from frozenseg.formats.base import CheckpointFormat, Renamed, StateDict

FORMATS: dict[str, CheckpointFormat] = {
    fmt.name: fmt
    for fmt in (huggingface.FORMAT, dino.FORMAT, deformable_detr.FORMAT, h_deformable_detr.FORMAT,
                detrex.FORMAT, d_fine.FORMAT, deimv2.FORMAT, rt_detr.FORMAT,
                grounding_dino.FORMAT, grounding_dino_official.FORMAT, d_fine_official.FORMAT,
                deimv2_official.FORMAT, rt_detr_official.FORMAT, lw_detr_official.FORMAT,
                *huggingface_detr.FORMATS,
                detr.FORMAT, detr.CONDITIONAL_FORMAT, detr.DAB_FORMAT, lw_detr.FORMAT,
                mmdet.MMDET_FORMAT, mmdet_detr.FORMAT, mmdet.MMDET2_FORMAT,
                mmdet.CO_DINO_FORMAT)
}


def detect_format(state_dict: StateDict) -> CheckpointFormat:
    """The format whose signature the keys match, or ValueError naming the closest one."""
    matching = [fmt for fmt in FORMATS.values() if fmt.matches(state_dict)]
    if matching:
        return matching[0]
    closest = min(FORMATS.values(), key=lambda f: len(f.missing_signature(state_dict)))
    missing = closest.missing_signature(state_dict)
    raise ValueError(
        f"unknown checkpoint format: closest is {closest.name} ({closest.description}), "
        f"but no key matches {', '.join(missing)}"
    )


__all__ = ["FORMATS", "CheckpointFormat", "Renamed", "detect_format"]
