"""Side by side with the official RT-DETR and RT-DETRv2 code (lyuwenyu/RT-DETR).

Where ``third_party/RT-DETR`` holds the repository (git-ignored; frozenseg never imports
it), each version's model is built by the repository's own ``YAMLConfig`` from its shipped
ResNet-18 config with a few settings made small, given random weights, saved as its
solver saves a training run (``model``, ``ema``, ``optimizer``, ...), converted by
``frozenseg convert`` with the same YAML, and both run on the same images. Its package is
called ``src``, so it is imported with that name shadowed and then put back; what only its
data, logging and evaluation code import (tensorboard, faster_coco_eval) is stubbed.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import sys
import types
import warnings
from pathlib import Path

import official_detr
import pytest
import torch
import yaml
from test_convert_rt_detr import lively
from weights import perturb

from frozenseg.convert import convert_checkpoint
from frozenseg.detector.frozen import load_detector

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1] / "third_party" / "RT-DETR"
# version -> its folder in the repository and its decoder's section in the YAML
VERSIONS = {"v1": ("rtdetr_pytorch", "RTDETRTransformer"),
            "v2": ("rtdetrv2_pytorch", "RTDETRTransformerv2")}
# name -> (version, the shipped config included, settings over it)
VARIANTS = {
    "v1-r18": ("v1", "configs/rtdetr/rtdetr_r18vd_6x_coco.yml", {}),
    "v1-r50-learnt-query": ("v1", "configs/rtdetr/rtdetr_r50vd_6x_coco.yml",
                            {"decoder": {"learnt_init_query": True}}),
    "v2-r18": ("v2", "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml", {}),
    "v2-r50-learnt-query": ("v2", "configs/rtdetrv2/rtdetrv2_r50vd_6x_coco.yml",
                            {"decoder": {"learn_query_content": True}}),
    "v2-r18-any-size": ("v2", "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml",
                        {"eval_spatial_size": None}),
}
# Imported only by data, logging and evaluation code; v1's data package (which the model
# does not use) is written for torchvision 0.15's beta transforms, gone since.
STUBBED = {"v1": ("tensorboard", "torch.utils.tensorboard", "src.data"),
           "v2": ("tensorboard", "torch.utils.tensorboard", "faster_coco_eval")}
SIZE = (128, 160)  # images (height, width); the second is padded below 96 and right of 128


def available(variant: str) -> bool:
    version, config, _ = VARIANTS[variant]
    return (REPO / VERSIONS[version][0] / config).is_file()


@contextlib.contextmanager
def official_src(version: str):
    """The version's ``src`` package imported from the repository (stubs for what cannot
    be imported); sys.modules and sys.path are put back afterwards."""
    root = str(REPO / VERSIONS[version][0])
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "src"}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, root)
    try:
        with official_detr.stubbed_imports(*STUBBED[version]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield importlib.import_module("src")
    finally:
        sys.path.remove(root)
        for key in [k for k in sys.modules if k.split(".")[0] == "src"]:
            del sys.modules[key]
        sys.modules.update(saved)


def small_config(variant: str, folder: Path) -> Path:
    """The variant's shipped config (included, as a user's own config would include it),
    narrower (64), shallower (two decoder layers), 30 queries, v2 with 2, 3 and 4 points per
    level, the anchors and AIFI positions made for the test images' size
    (``eval_spatial_size``), then the variant's own settings."""
    version, config, overrides = VARIANTS[variant]
    folder.mkdir(parents=True, exist_ok=True)
    decoder, size = VERSIONS[version][1], list(SIZE)
    layers, points = (("num_decoder_layers", "num_decoder_points") if version == "v1"
                      else ("num_layers", "num_points"))
    settings = {
        "__include__": [str(REPO / VERSIONS[version][0] / config)],
        "PResNet": {"pretrained": False},
        "HybridEncoder": {"hidden_dim": 64, "nhead": 4, "dim_feedforward": 96,
                          "eval_spatial_size": size},
        decoder: {"feat_channels": [64, 64, 64], "hidden_dim": 64, "nhead": 4,
                  "dim_feedforward": 80, layers: 2, "num_queries": 30,
                  points: 4 if version == "v1" else [2, 3, 4], "eval_spatial_size": size},
    }
    if version == "v2":  # one shared setting (its modules' __share__)
        settings["eval_spatial_size"] = size
        del settings["HybridEncoder"]["eval_spatial_size"], settings[decoder]["eval_spatial_size"]
    for section, values in overrides.items():
        section = decoder if section == "decoder" else section
        settings[section] = {**settings[section], **values} if isinstance(values, dict) \
            else values
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(settings))
    return path


def official_checkpoint(src: types.ModuleType, variant: str, folder: Path):
    """The official model from ``small_config``, with random weights, written as the
    version's solver writes a training run: ``last.pth`` holding ``model`` (one set of
    weights) and ``ema`` (another: the one converted), optimizer and scheduler. Returns
    (its path, its config's path, the EMA model in eval mode)."""
    config = small_config(variant, folder)
    torch.manual_seed(0)
    model = src.core.YAMLConfig(str(config)).model
    ema = src.optim.ModelEMA(model, decay=0.9999, warmups=2000)
    perturb(lively(model, seed=1), seed=1)
    perturb(lively(ema.module, seed=2), seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1000])
    state = {"date": datetime.datetime.now().isoformat(), "last_epoch": 11,
             "model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}
    torch.save(state, folder / "last.pth")
    return folder / "last.pth", config, ema.module.eval()


def images_and_padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Two [0, 1] images of ``SIZE`` (RT-DETR does not normalise); the second is a 96 x 128
    image padded with zeros, which the official code reads as image (it has no mask)."""
    images = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, *SIZE, dtype=torch.bool)
    padding[1, 96:], padding[1, :, 128:] = True, True
    return images.masked_fill(padding[:, None], 0.0), padding


def official_differences(variant: str, folder: Path) -> tuple[float, float]:
    """The official model's training checkpoint, converted with its YAML: the largest
    |difference| of the last layer's logits and boxes (normalised cxcywh) on
    :func:`images_and_padding`."""
    with official_src(VARIANTS[variant][0]) as src:
        path, config, model = official_checkpoint(src, variant, folder)
        images, padding = images_and_padding()
        with torch.no_grad():
            expected = model(images)
    report = convert_checkpoint(path, folder / "out", config=config)
    # the one note: the EMA weights were taken (nothing assumed for want of a setting)
    assert report.format == "rt_detr" and all("ckpt['ema']" in note for note in report.notes)
    with torch.no_grad():
        got = load_detector(folder / "out").model(images, padding)
    return ((got.logits[-1] - expected["pred_logits"]).abs().max().item(),
            (got.boxes[-1] - expected["pred_boxes"]).abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_official_models_training_checkpoint_reproduces_it(variant, tmp_path):
    if not available(variant):
        pytest.skip("third_party/RT-DETR (lyuwenyu/RT-DETR) is not there")
    assert max(official_differences(variant, tmp_path)) < 1e-4
