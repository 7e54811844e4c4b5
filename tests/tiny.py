"""Small things many tests build: a tiny random-weight detector (and a tiny D-FINE) and its
folder, and a recipe for the tiny head on the synthetic shapes. Fixtures that use them:
conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.folder import write_detector
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector
from frozenseg.formats import d_fine
from frozenseg.recipe import load_recipe

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SCALE = 0.25  # synthetic images of 160-320 px -> 120-200 px views: fast on a CPU


def tiny_detector(seed: int = 0) -> FrozenDetector:
    torch.manual_seed(seed)
    config = DetectorConfig(hidden_dim=64, enc_layers=2, dec_layers=2, dim_feedforward=32,
                            num_queries=10, num_classes=5)
    return FrozenDetector(build_detector(config), top_k=7, memory_layer=1)


def tiny_d_fine() -> FrozenDetector:
    """A small random D-FINE: HGNetV2 (light blocks, affines), the ELAN hybrid encoder whose
    maps the decoder reads as they are, the FDR decoder."""
    torch.manual_seed(0)
    backbone = {"name": "hgnetv2", "stem": (8, 16), "in_channels": (16, 32, 48, 64),
                "mid_channels": (8, 16, 16, 32), "out_channels": (32, 48, 64, 96),
                "blocks": (1, 1, 1, 1), "layers": (2, 2, 2, 2), "kernels": (3, 3, 5, 5),
                "light": (False, False, True, True), "downsample": (False, True, True, True),
                "lab": True}
    config = DetectorConfig(**d_fine.FIXED, backbone=backbone, hidden_dim=32, nheads=2,
                            enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=10,
                            num_classes=5, num_feature_levels=3, dn_labelbook_size=5,
                            csp_blocks=1, csp_expansion=0.5, hybrid_projections=False,
                            fdr_bins=8, lqe_hidden_dim=16)
    return FrozenDetector(build_detector(config), top_k=7)


def save_detector(det: FrozenDetector, folder, source: str):
    """The two files ``frozenseg convert`` writes."""
    write_detector(folder, det.model.state_dict(), det.config, format="test", source=source,
                   sha256="0" * 64)
    return folder


def recipe(tmp_path, data, detector_dir, /, *overrides, **sections):
    body = {
        "base": str(REPO_RECIPES / "synth_tiny.yaml"),
        "detector": {"path": str(detector_dir), "top_k": 7, "memory_layer": 1},
        "data": {"train": {"images": str(data / "images" / "train"),
                           "annotations": str(data / "instances_train.json")},
                 "val": {"images": str(data / "images" / "val"),
                         "annotations": str(data / "instances_val.json")},
                 "scale": SCALE, "num_workers": 0},
        "head": {"image_encoder_layers": 1, "box_encoder_layers": 1, "roi_size": 8,
                 "mapper_dim": 32, "ffn_dim": 64, "num_heads": 2},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "iterations": 4,
                  "checkpoint_every": 2, "log_every": 1, "max_minutes": None},
    }
    for key, value in sections.items():
        body[key].update(value)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_recipe(path, overrides)
