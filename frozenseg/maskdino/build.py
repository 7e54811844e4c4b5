"""The Mask DINO a recipe describes (mode maskdino).

From random weights (``maskdino.model``: DetectorConfig fields) or from a converted DINO
(``maskdino.init``, any format ``frozenseg convert`` reads): every tensor whose name and
shape match is loaded, class rows are remapped by name onto the dataset's classes, and
the report says what was new and which detector classes were dropped.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import build_detector
from frozenseg.maskdino.model import MaskDINO

# What every Mask DINO shares with DINO's code (formats/dino.py derives the same for a
# converted DINO), except the queries: unified query selection unless the recipe's
# maskdino.query_init says "mixed" (DINO's).
DINO_FIXED = {"variant": "dino", "query_init": "selected", "box_refine": True,
              "proposal_score": "max_class", "decoder_norm": True, "ref_point_head": True,
              "pos_offset": 0.0, "inverse_sigmoid_eps": 1e-3, "pos_temperature": 20.0}

# Rows indexed by class: remapped by name when the dataset's classes differ.
_CLASS_ROWS = ("class_embed.", "transformer.enc_out_class_embed.", "label_enc.")


def build_maskdino(recipe, class_names: list[str]) -> tuple[MaskDINO, list[str]]:
    """(model, report lines) for ``recipe.maskdino`` and the dataset's classes."""
    section = recipe.maskdino
    shape = {"num_classes": len(class_names), "num_queries": section.num_queries,
             "dec_layers": section.dec_layers, "dn_labelbook_size": len(class_names),
             "query_init": section.query_init}
    if section.init is None:
        base = DetectorConfig.from_dict({**section.model, **DINO_FIXED, **shape})  # shape wins
        detector = build_detector(base)
        detector.init_for_training()
        return assemble(detector, section), [
            f"Mask DINO from random weights ({base.backbone['name']} backbone)"]
    from frozenseg.detector.frozen import load_detector

    source = load_detector(section.init)
    if source.config.variant != "dino" or not source.config.two_stage:
        raise ValueError(f"{section.init}: maskdino.init needs a two-stage DINO detector, "
                         f"not {source.config.variant} ({source.config.query_init} queries)")
    config = dataclasses.replace(source.config, **{**DINO_FIXED, **shape})
    detector = build_detector(config)
    detector.init_for_training()  # what the source lacks (new classes) starts as DINO's
    model = assemble(detector, section)
    report = _load_matching(model.detector, source.model.state_dict(), source.classes["names"],
                            class_names, section.init)
    return model, report


def assemble(detector: nn.Module, section) -> MaskDINO:
    model = MaskDINO(detector, num_denoising=section.num_denoising,
                     box_noise_scale=section.box_noise_scale,
                     mask_enhanced_boxes=section.mask_enhanced_boxes)
    model.set_checkpointing(backbone=section.checkpoint_backbone,
                            encoder=section.checkpoint_encoder,
                            decoder=section.checkpoint_decoder)
    return model


def _load_matching(detector: nn.Module, source: dict, source_names: list, names: list[str],
                   where: str) -> list[str]:
    """Copy what fits from a detector's state dict; class rows by name. Report lines."""
    target = detector.state_dict()
    rows = _class_rows(source_names, names)
    loaded, new = 0, []
    for key, value in target.items():
        if key in source and key.startswith(_CLASS_ROWS) and value.shape[0] != 0:
            _copy_rows(value, source[key], rows)
            loaded += 1
        elif key in source and source[key].shape == value.shape:
            value.copy_(source[key])
            loaded += 1
        else:
            new.append(key)
    detector.load_state_dict(target)
    matched = sum(r is not None for r in rows)
    dropped = sorted({str(n) for n in source_names if n is not None} - set(names))
    report = [f"from {where}: {loaded} tensors loaded, {len(new)} new "
              f"({', '.join(_prefixes(new)) or 'none'})",
              f"classes: {matched} of {len(names)} matched by name"]
    if dropped:
        report.append(f"detector classes dropped ({len(dropped)}): {', '.join(dropped[:10])}"
                      + (" ..." if len(dropped) > 10 else ""))
    return report


def _class_rows(source_names: list, names: list[str]) -> list[int | None]:
    """For each dataset class, the detector's row of the same name (None: new)."""
    index = {str(n).casefold(): i for i, n in enumerate(source_names) if n is not None}
    return [index.get(n.casefold()) for n in names]


def _copy_rows(value: torch.Tensor, source: torch.Tensor, rows: list[int | None]) -> None:
    """Rows of a class-indexed tensor (classifier weight / bias, label embedding)."""
    for k, row in enumerate(rows):
        if row is not None and k < value.shape[0] and row < source.shape[0] \
                and value.shape[1:] == source.shape[1:]:
            value[k] = source[row]


def _prefixes(keys: list[str], depth: int = 2) -> list[str]:
    return sorted({".".join(k.split(".")[:depth]) for k in keys})
