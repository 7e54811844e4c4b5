"""Side by side with the official DETR (facebookresearch/detr), Conditional DETR
(Atten4Vis/ConditionalDETR) and DAB-DETR (IDEA-Research/DAB-DETR) code.

Where ``third_party/detr``, ``third_party/ConditionalDETR`` or ``third_party/DAB-DETR``
holds the repository (git-ignored; frozenseg never imports it), its model is built from its
own ``main.py`` arguments (``get_args_parser``, a few settings made small) by its own build
function, given random weights, saved as ``main.py`` saves a checkpoint (``{model,
optimizer, lr_scheduler, epoch, args}``), converted by ``frozenseg convert``, and both run
on the same images. All three name their packages ``models`` and ``util``: they are
imported as ``tests/official_detr.py`` imports Deformable DETR's, with these shims for a
newer torch and a bare environment: Conditional DETR's attention imports torch 1.8's
``_LinearWithBias`` on torch 2 (its version test reads 2.x as older than 1.9) and
``torch._overrides``, given as what replaced them; what only main.py's logging, config and
panoptic evaluation import is stubbed; the backbone's ``is_main_process`` is False while
building, so torchvision downloads no weights.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from argparse import Namespace
from pathlib import Path

import official_detr
import pytest
import torch
from torch.nn.modules import linear
from weights import perturb

from frozenseg.convert import convert_checkpoint
from frozenseg.detector.frozen import load_detector

pytestmark = pytest.mark.usefixtures("one_thread")

THIRD_PARTY = Path(__file__).resolve().parents[1] / "third_party"
# format -> (repository folder, its backbone module, its builder: module and function)
REPOS = {
    "detr": ("detr", "models.backbone", "models", "build_model"),
    "conditional_detr": ("ConditionalDETR", "models.backbone", "models", "build_model"),
    "dab_detr": ("DAB-DETR", "models.DAB_DETR.backbone", "models", "build_DABDETR"),
}
OWN_MODULES = ("main", "engine", "datasets")
# Imported only by main.py's logging, config and panoptic evaluation code.
STUBBED = ("termcolor", "addict", "yapf", "panopticapi")
# Shallower than main.py's defaults. The width stays 256: Conditional DETR and DAB-DETR
# build parts of it 256 wide whatever hidden_dim says (Conditional DETR's query sine
# embedding, DAB-DETR's encoder query_scale). The backbone stays ResNet-50, the converter's
# smallest.
SMALL = dict(enc_layers=2, dec_layers=3, dim_feedforward=96, num_queries=30, device="cpu")
# name -> (format, main.py's command-line arguments beyond SMALL)
VARIANTS = {
    "detr": ("detr", []),
    "conditional_detr": ("conditional_detr", []),
    "dab_detr": ("dab_detr", ["--modelname", "dab_detr"]),
    "dab_detr-3-patterns": ("dab_detr", ["--modelname", "dab_detr", "--num_patterns", "3"]),
    "dab_detr-relu-10k": ("dab_detr", ["--modelname", "dab_detr", "--transformer_activation",
                                       "relu", "--pe_temperatureH", "10000",
                                       "--pe_temperatureW", "10000"]),
}


def available(variant: str) -> bool:
    return (THIRD_PARTY / REPOS[VARIANTS[variant][0]][0] / "main.py").is_file()


@contextlib.contextmanager
def official_code(name: str):
    """The repository's ``main`` (for its arguments) and its model builder, imported with the
    shims in the module's docstring; everything imported from it is forgotten afterwards."""
    folder, backbone, package, builder = REPOS[name]
    root = THIRD_PARTY / folder
    # main.py's own top-level modules, which may shadow installed ones (Hugging Face datasets)
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in OWN_MODULES}
    for key in saved:
        del sys.modules[key]
    try:
        with official_detr._importing_from(root), official_detr.stubbed_imports(*STUBBED), \
                pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "torch._overrides", torch.overrides)
            mp.setattr(linear, "_LinearWithBias", linear.NonDynamicallyQuantizableLinear,
                       raising=False)
            main = importlib.import_module("main")
            mp.setattr(importlib.import_module(backbone), "is_main_process", lambda: False)
            yield main, getattr(importlib.import_module(package), builder)
    finally:
        for key in [k for k, m in list(sys.modules.items())
                    if k.split(".")[0] in OWN_MODULES
                    or str(getattr(m, "__file__", "") or "").startswith(str(root))]:
            del sys.modules[key]
        sys.modules.update(saved)


def official_args(main: types.ModuleType, options: list[str]) -> Namespace:
    """main.py's arguments as its parser gives them, with SMALL and ``options``."""
    small = [f"--{key}={value}" for key, value in SMALL.items()]
    required = ["--coco_path", "coco"] if "--modelname" in options else []  # DAB-DETR's
    return main.get_args_parser().parse_args([*small, *required, *options])


def official_checkpoint(variant: str, folder: Path):
    """The official model, random weights off their init, saved as main.py saves an epoch's
    checkpoint. Returns (its path, the model in eval mode, the repository's NestedTensor)."""
    name, options = VARIANTS[variant]
    folder.mkdir(parents=True, exist_ok=True)
    with official_code(name) as (main, build):
        args = official_args(main, options)
        torch.manual_seed(0)
        model = perturb(build(args)[0])
        nested = importlib.import_module("util.misc").NestedTensor
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 49, "args": args},
               folder / "checkpoint.pth")
    return folder / "checkpoint.pth", model.eval(), nested


def images_and_padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised 128 x 192 images; the second is 96 x 128, padded with zeros: a row and
    two columns of the 4 x 6 stride-32 map are padding."""
    images = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 128, 192, dtype=torch.bool)
    padding[1, 96:], padding[1, :, 128:] = True, True
    return images.masked_fill(padding[:, None], 0.0), padding


def differences(variant: str, folder: Path) -> dict[str, tuple[float, float]]:
    """The largest |difference| of the last layer's logits and boxes (normalised cxcywh)
    between the official model and its converted checkpoint, on :func:`images_and_padding`
    (the official code with its padding mask) and on the same images taken as one size."""
    path, model, nested = official_checkpoint(variant, folder)
    report = convert_checkpoint(path, folder / "out")
    assert report.format == VARIANTS[variant][0] and not report.notes, report.notes
    ours = load_detector(folder / "out").model
    images, padding = images_and_padding()
    rows = {}
    for batch, mask in (("padded", padding), ("same size", torch.zeros_like(padding))):
        with torch.no_grad():
            expected = model(nested(images, mask))
            got = ours(images, mask)
        rows[batch] = ((got.logits[-1] - expected["pred_logits"]).abs().max().item(),
                       (got.boxes[-1] - expected["pred_boxes"]).abs().max().item())
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_official_models_checkpoint_reproduces_it(variant, tmp_path):
    if not available(variant):
        pytest.skip(f"third_party/{REPOS[VARIANTS[variant][0]][0]} is not there")
    for batch, figures in differences(variant, tmp_path).items():
        assert max(figures) < 1e-4, (batch, figures)
