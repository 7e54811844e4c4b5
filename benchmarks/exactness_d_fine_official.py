"""How close converted official D-FINE and DEIM checkpoints come to the official code, side
by side.

Where ``third_party/D-FINE`` holds Peterande/D-FINE and ``third_party/DEIM``
ShihuaHuang95/DEIM, each model below is built by that repository's own modules (``DFINE`` or
``DEIM`` of ``HGNetv2``, ``HybridEncoder`` and ``DFINETransformer``) from one YAML dict,
randomised, saved as the solver saves it with the YAML beside it, converted with
``frozenseg.convert_checkpoint`` and run beside the official model on two 128 x 160 images
(fp32, CPU): exactness_deimv2_official's procedure and helpers. The architectures are the
released N and S (HGNetV2 B0; two levels at strides 16 and 32, or three), with narrower
encoders and decoders than released; S with the released per-level points [3, 6, 3] and
with four on every level. DEIM's D-FINE models add SiLU in the decoder (``activation``) and
its MLP heads (``mlp_act``), which its code applies to the quality heads too. Printed: the
largest absolute difference of the last layer's logits and boxes. A repository that is
absent gives a line saying so instead of its rows.

Run (from the repository root):
    PYTHONPATH=. python benchmarks/exactness_d_fine_official.py

The output is a markdown table.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

from benchmarks.exactness_deimv2_official import (
    NUM_CLASSES,
    bypass_packages,
    load,
    randomised,
    row,
)

THIRD_PARTY = Path(__file__).resolve().parents[1] / "third_party"
HGNETV2 = {"name": "B0", "freeze_at": -1, "freeze_norm": False, "pretrained": False,
           "use_lab": True}
DECODER = {"num_layers": 3, "eval_idx": -1, "num_queries": 50, "reg_max": 32, "reg_scale": 4,
           "num_denoising": 100, "hidden_dim": 64, "dim_feedforward": 128}
# D-FINE's N and S configs (configs/dfine/dfine_hgnetv2_{n,s}_coco.yml), 64 wide.
N = {
    "HGNetv2": {"return_idx": [2, 3], **HGNETV2},
    "HybridEncoder": {"in_channels": [512, 1024], "feat_strides": [16, 32], "hidden_dim": 64,
                      "use_encoder_idx": [1], "dim_feedforward": 128, "expansion": 0.34,
                      "depth_mult": 0.5},
    "DFINETransformer": {**DECODER, "feat_channels": [64, 64], "feat_strides": [16, 32],
                         "num_levels": 2, "num_points": [6, 6]},
}
S = {
    "HGNetv2": {"return_idx": [1, 2, 3], **HGNETV2},
    "HybridEncoder": {"in_channels": [256, 512, 1024], "feat_strides": [8, 16, 32],
                      "hidden_dim": 64, "use_encoder_idx": [2], "dim_feedforward": 128,
                      "expansion": 0.5, "depth_mult": 0.34},
    "DFINETransformer": {**DECODER, "feat_channels": [64] * 3, "feat_strides": [8, 16, 32],
                         "num_levels": 3, "num_points": [3, 6, 3]},
}
FOUR_POINTS = {**S["DFINETransformer"], "num_points": 4}
SILU = {"activation": "silu", "mlp_act": "silu"}  # DEIM's configs/base/deim.yml


def dfine(sections: dict) -> dict:
    return {"model": "DFINE", "DFINE": {}, **sections}


def deim(sections: dict) -> dict:
    return {"model": "DEIM", "DEIM": {},
            **sections, "DFINETransformer": {**sections["DFINETransformer"], **SILU}}


# repository -> name -> the YAML the official classes are built from
MODELS = {
    "D-FINE": {
        "D-FINE N (2 levels, points [6, 6])": dfine(N),
        "D-FINE S (3 levels, points [3, 6, 3])": dfine(S),
        "D-FINE S (points 4 on every level)": dfine({**S, "DFINETransformer": FOUR_POINTS}),
    },
    "DEIM": {
        "DEIM D-FINE N (SiLU, mlp_act)": deim(N),
        "DEIM D-FINE S (SiLU, mlp_act, points [3, 6, 3])": deim(S),
    },
}


def load_d_fine(repo: Path) -> types.SimpleNamespace:
    """Peterande/D-FINE's model classes (its ``src`` package)."""
    bypass_packages(repo, ("src", "src.zoo", "src.zoo.dfine", "src.nn", "src.nn.backbone"),
                    "src.core")
    return types.SimpleNamespace(
        model=load("src.zoo.dfine.dfine", "DFINE"),
        HGNetv2=load("src.nn.backbone.hgnetv2", "HGNetv2"),
        HybridEncoder=load("src.zoo.dfine.hybrid_encoder", "HybridEncoder"),
        DFINETransformer=load("src.zoo.dfine.dfine_decoder", "DFINETransformer"))


def load_deim(repo: Path) -> types.SimpleNamespace:
    """ShihuaHuang95/DEIM's model classes (its ``engine`` package)."""
    bypass_packages(repo, ("engine", "engine.deim", "engine.backbone"), "engine.core")
    return types.SimpleNamespace(
        model=load("engine.deim.deim", "DEIM"),
        HGNetv2=load("engine.backbone.hgnetv2", "HGNetv2"),
        HybridEncoder=load("engine.deim.hybrid_encoder", "HybridEncoder"),
        DFINETransformer=load("engine.deim.dfine_decoder", "DFINETransformer"))


# repository -> (a file that says it is there, its loader)
REPOS = {"D-FINE": ("src/zoo/dfine/dfine_decoder.py", load_d_fine),
         "DEIM": ("engine/deim/dfine_decoder.py", load_deim)}


def build(official: types.SimpleNamespace, settings: dict) -> torch.nn.Module:
    backbone = official.HGNetv2(**settings["HGNetv2"])
    encoder = official.HybridEncoder(**settings["HybridEncoder"])
    decoder = official.DFINETransformer(num_classes=NUM_CLASSES,
                                        **settings["DFINETransformer"])
    return randomised(official.model(backbone, encoder, decoder)).eval()


def main() -> None:
    torch.manual_seed(0)
    print("| model | reference | logits | boxes |\n| --- | --- | --- | --- |")
    for repo_name, models in MODELS.items():
        marker, loader = REPOS[repo_name]
        repo = THIRD_PARTY / repo_name
        if not (repo / marker).is_file():
            print(f"(no {repo}: its side-by-side rows need the official repository there)")
            continue
        official = loader(repo)
        for name, settings in models.items():
            print(row(name, build(official, settings), settings))


if __name__ == "__main__":
    main()
