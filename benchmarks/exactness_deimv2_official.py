"""How close converted official DEIMv2 checkpoints come to the official code, side by side.

Where ``third_party/DEIMv2`` holds the official repository (Intellindust-AI-Lab/DEIMv2),
each model below is built by the official modules themselves (``DEIM`` of ``HGNetv2`` or
``DINOv3STAs``, ``HybridEncoder`` or ``LiteEncoder``, ``DEIMTransformer``) from one YAML
dict, its weights randomised (matrices at unit gain, norms and biases off their init,
DINOv3's key bias masked out by its ``bias_mask``); the solver's checkpoint dict (the EMA
copy under ``ema.module``) is saved with that YAML beside it, converted with
``frozenseg.convert_checkpoint`` as ``frozenseg convert`` does, and both run on the same
two 128 x 160 images (fp32, CPU; the DINOv3 models take them as ImageNet-normalised
pixels). Printed: the largest absolute difference of the last layer's logits and boxes.
The architectures are the released ones (HGNetV2 B0 / Atto, the distilled ViT-Tiny,
DINOv3 ViT-S/16 and ViT-S+/16: the official code fixes them by name), with narrower
encoders and decoders than released. Then the same against transformers' own
``Deimv2ForObjectDetection`` where it can hold the weights (see BENCHMARKS.md).

The official code imports tensorboard and faster_coco_eval through its package
``__init__``s; this script registers empty packages for ``engine``, ``engine.core``,
``engine.deim`` and ``engine.backbone`` so that only the model files load (a shim here,
never in frozenseg). Without the repository it says so and exits.

Run (from the repository root):
    PYTHONPATH=. python benchmarks/exactness_deimv2_official.py

The output is a markdown table.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import types
from pathlib import Path

import torch
import yaml

from frozenseg.convert import convert_checkpoint
from frozenseg.detector.frozen import load_detector

REPO = Path(__file__).resolve().parents[1] / "third_party" / "DEIMv2"
DECODER = {"num_layers": 3, "eval_idx": -1, "num_queries": 50, "reg_max": 32, "reg_scale": 4,
           "activation": "silu", "mlp_act": "silu", "num_denoising": 100}
HGNETV2 = {"freeze_at": -1, "freeze_norm": False, "pretrained": False, "use_lab": True}
# name -> the YAML sections the official classes are built from (DEIMv2's configs, narrower)
MODELS = {
    "N (HGNetV2 B0, hybrid encoder, 2 levels)": {
        "DEIM": {"backbone": "HGNetv2", "encoder": "HybridEncoder"},
        "HGNetv2": {"name": "B0", "return_idx": [2, 3], **HGNETV2},
        "HybridEncoder": {"in_channels": [512, 1024], "feat_strides": [16, 32], "hidden_dim": 64,
                          "use_encoder_idx": [1], "dim_feedforward": 128, "expansion": 0.34,
                          "depth_mult": 0.5, "version": "dfine", "csp_type": "csp2",
                          "fuse_op": "sum"},
        "DEIMTransformer": {**DECODER, "feat_channels": [64, 64], "feat_strides": [16, 32],
                            "hidden_dim": 64, "num_levels": 2, "num_points": [6, 6],
                            "dim_feedforward": 128}},
    "Atto (HGNetV2 Atto, lite encoder, shared box head, no gate)": {
        "DEIM": {"backbone": "HGNetv2", "encoder": "LiteEncoder"},
        "HGNetv2": {"name": "Atto", "return_idx": [2], **HGNETV2},
        "LiteEncoder": {"in_channels": [256], "feat_strides": [16], "hidden_dim": 64,
                        "expansion": 0.34, "depth_mult": 0.5},
        "DEIMTransformer": {**DECODER, "feat_channels": [64, 64], "feat_strides": [16, 32],
                            "hidden_dim": 64, "num_levels": 2, "num_points": [4, 2],
                            "dim_feedforward": 160, "share_bbox_head": True,
                            "use_gateway": False}},
    "S (distilled ViT-Tiny + STA)": {
        "DEIM": {"backbone": "DINOv3STAs", "encoder": "HybridEncoder"},
        "DINOv3STAs": {"name": "vit_tiny", "embed_dim": 192, "num_heads": 3,
                       "interaction_indexes": [3, 7, 11], "weights_path": None},
        "HybridEncoder": {"in_channels": [192] * 3, "hidden_dim": 192, "dim_feedforward": 256,
                          "expansion": 0.34, "depth_mult": 0.67, "version": "deim",
                          "csp_type": "csp2", "fuse_op": "sum"},
        "DEIMTransformer": {**DECODER, "feat_channels": [192] * 3, "hidden_dim": 192,
                            "num_points": [3, 6, 3], "dim_feedforward": 256}},
    "L (DINOv3 ViT-S/16 + STA)": {
        "DEIM": {"backbone": "DINOv3STAs", "encoder": "HybridEncoder"},
        "DINOv3STAs": {"name": "dinov3_vits16", "interaction_indexes": [5, 8, 11],
                       "conv_inplane": 32, "hidden_dim": 96, "weights_path": None},
        "HybridEncoder": {"in_channels": [96] * 3, "hidden_dim": 96, "dim_feedforward": 192,
                          "expansion": 0.5, "depth_mult": 0.34, "version": "deim",
                          "csp_type": "csp2", "fuse_op": "sum"},
        "DEIMTransformer": {**DECODER, "feat_channels": [96] * 3, "hidden_dim": 96,
                            "num_points": [3, 6, 3], "dim_feedforward": 192}},
    "X (DINOv3 ViT-S+/16, SwiGLU, + STA)": {
        "DEIM": {"backbone": "DINOv3STAs", "encoder": "HybridEncoder"},
        "DINOv3STAs": {"name": "dinov3_vits16plus", "interaction_indexes": [5, 8, 11],
                       "conv_inplane": 16, "hidden_dim": 64, "weights_path": None},
        "HybridEncoder": {"in_channels": [64] * 3, "hidden_dim": 64, "dim_feedforward": 128,
                          "expansion": 1.25, "depth_mult": 0.34, "version": "deim",
                          "csp_type": "csp2", "fuse_op": "sum"},
        "DEIMTransformer": {**DECODER, "feat_channels": [64] * 3, "hidden_dim": 64,
                            "num_points": [3, 6, 3], "dim_feedforward": 128}},
}
NUM_CLASSES = 7


def bypass_packages(repo: Path, packages: tuple[str, ...], core: str) -> None:
    """Empty packages for ``packages`` (their ``__init__``s, and what those import, never
    run) and a ``core`` module whose ``register`` is a no-op decorator: the official model
    files of ``repo`` import without the training stack. The RT-DETR family's layout."""
    for name in packages:
        package = types.ModuleType(name)
        package.__path__ = [str(repo / name.replace(".", "/"))]
        sys.modules[name] = package
    registry = types.ModuleType(core)
    registry.register = lambda *args, **kwargs: (lambda cls: cls)
    sys.modules[core] = registry
    sys.path.insert(0, str(repo))


def load(name: str, attribute: str):
    return getattr(importlib.import_module(name), attribute)


def load_official() -> types.SimpleNamespace:
    """The official model classes."""
    bypass_packages(REPO, ("engine", "engine.deim", "engine.backbone"), "engine.core")
    return types.SimpleNamespace(
        DEIM=load("engine.deim.deim", "DEIM"),
        HGNetv2=load("engine.backbone.hgnetv2", "HGNetv2"),
        DINOv3STAs=load("engine.backbone.dinov3_adapter", "DINOv3STAs"),
        HybridEncoder=load("engine.deim.hybrid_encoder", "HybridEncoder"),
        LiteEncoder=load("engine.deim.lite_encoder", "LiteEncoder"),
        DEIMTransformer=load("engine.deim.deim_decoder", "DEIMTransformer"))


def build(official, settings: dict) -> torch.nn.Module:
    parts = settings["DEIM"]
    backbone = getattr(official, parts["backbone"])(**settings[parts["backbone"]])
    encoder = getattr(official, parts["encoder"])(**settings[parts["encoder"]])
    decoder = official.DEIMTransformer(num_classes=NUM_CLASSES, **settings["DEIMTransformer"])
    return randomised(official.DEIM(backbone, encoder, decoder)).eval()


@torch.no_grad()
def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Matrices at unit gain, vectors near their init (norm scales near 1): every part of
    the model moves the outputs. DINOv3's key-bias mask as its pretrained weights have it."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() > 1:
            p.copy_(noise / p[0].numel() ** 0.5)
        elif not name.endswith(("up", "reg_scale")):  # the FDR constants stay as built
            p.copy_(noise * 0.1 + (1.0 if name.endswith(("weight", "scale", "gamma")) else 0.0))
    for name, b in model.named_buffers():
        if name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        elif name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        elif name.endswith("bias_mask"):
            dim = b.shape[0] // 3
            b.copy_(torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]))
    return model


def solver_checkpoint(model: torch.nn.Module, settings: dict, folder: Path) -> Path:
    """The solver's dict (model and its EMA) and the YAML beside it (``model: DEIM`` unless
    ``settings`` name another)."""
    folder.mkdir(parents=True)
    state = model.state_dict()
    torch.save({"date": "2025-09-26T12:00:00", "last_epoch": 3, "model": state,
                "ema": {"module": state, "updates": 10}}, folder / "last.pth")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "DEIM", **settings}))
    return folder / "last.pth"


def differences(model: torch.nn.Module, settings: dict, folder: Path
                ) -> tuple[float, float]:
    """The official ``model`` saved as its solver does (``settings`` its YAML), converted
    and both run on two 128 x 160 images: the largest |difference| of the last layer's
    (logits, boxes)."""
    path = solver_checkpoint(model, settings, folder / "run")
    convert_checkpoint(path, folder / "out")
    ours = load_detector(folder / "out").model
    images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(images)
        got = ours(images, torch.zeros(2, 128, 160, dtype=torch.bool))
    return (float((got.logits[-1] - want["pred_logits"]).abs().max()),
            float((got.boxes[-1] - want["pred_boxes"]).abs().max()))


def row(name: str, model: torch.nn.Module, settings: dict) -> str:
    """The table's row for an official ``model`` built from ``settings``."""
    with tempfile.TemporaryDirectory() as tmp:
        logits, boxes = differences(model, settings, Path(tmp))
    return f"| {name} | the official code | {logits:.1e} | {boxes:.1e} |"


def main() -> None:
    if not (REPO / "engine" / "deim" / "deim_decoder.py").is_file():
        print(f"(no {REPO}: the side-by-side rows need the official repository there)")
        return
    torch.manual_seed(0)
    official = load_official()
    print("| model | reference | logits | boxes |\n| --- | --- | --- | --- |")
    for name, settings in MODELS.items():
        print(row(name, build(official, settings), settings))


if __name__ == "__main__":
    main()
