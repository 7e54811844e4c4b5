"""The official Deformable DETR and H-Deformable-DETR models, run on the CPU side by side.

Their repositories are fetched into ``third_party/`` (git-ignored; frozenseg never imports
them). Both name their packages ``models`` and ``util``, so each is imported with those
names shadowed and then put back. Their compiled ``MultiScaleDeformableAttention`` is
stubbed, and every deformable attention is routed to the repository's own
``ms_deform_attn_core_pytorch``. Backbones are built without pretrained weights.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import re
import sys
import types
import warnings
from argparse import Namespace
from pathlib import Path

import torch
import torchvision
from weights import perturb

from frozenseg.convert import convert_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import build_detector

THIRD_PARTY = Path(__file__).resolve().parents[1] / "third_party"
REPOS = {
    "deformable_detr": THIRD_PARTY / "Deformable-DETR",
    "h_deformable_detr": THIRD_PARTY / "H-Deformable-DETR",
}
SHADOWED = ("models", "util", "MultiScaleDeformableAttention", "mmcv_custom", "mmdet",
            "fairscale")


def available(name: str) -> bool:
    return (REPOS[name] / "models" / "deformable_transformer.py").is_file()


def _stubs() -> dict[str, types.ModuleType]:
    """Stand-ins for the compiled op, for mmcv/mmdet (used only to load pretrained Swin) and
    for fairscale (LW-DETR's activation checkpointing, which inference never turns on)."""
    stubs = {name: types.ModuleType(name) for name in
             ("MultiScaleDeformableAttention", "mmcv_custom", "mmdet", "mmdet.utils",
              "fairscale", "fairscale.nn", "fairscale.nn.checkpoint")}
    stubs["mmcv_custom"].load_checkpoint = lambda *a, **k: None
    stubs["mmdet.utils"].get_root_logger = lambda *a, **k: None
    stubs["fairscale.nn.checkpoint"].checkpoint_wrapper = lambda module, **k: module
    return stubs


class _PytorchCore:
    """Replaces MSDeformAttnFunction: ``apply`` calls the pure-PyTorch reference."""

    def __init__(self, core):
        self.core = core

    def apply(self, value, shapes, level_start_index, locations, weights, im2col_step):
        return self.core(value, shapes, locations, weights)


class _Anything(types.ModuleType):
    """A stand-in module: every public attribute is a class that takes any arguments (to
    subclass, call or annotate with at import time)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of the given packages (and their submodules) give :class:`_Anything`."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots

    def find_spec(self, name, path, target=None):
        if any(name == root or name.startswith(root + ".") for root in self.roots):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Anything(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@contextlib.contextmanager
def stubbed_imports(*roots: str):
    """While inside, importing any of ``roots`` (packages an official repository imports
    only for data, logging or evaluation) gives an inert stand-in; the real modules, if
    any were imported, are put back afterwards."""
    def ours(key: str) -> bool:
        return any(key == root or key.startswith(root + ".") for root in roots)

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for key in saved:
        del sys.modules[key]
    finder = _StubFinder(roots)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for key in [k for k in sys.modules if ours(k)]:
            del sys.modules[key]
        sys.modules.update(saved)


@contextlib.contextmanager
def _importing_from(root: Path):
    """sys.path starts at ``root``, whose ``models``/``util`` shadow any others (and stubs
    stand in for what cannot be imported); everything is put back afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in SHADOWED}
    for key in saved:
        del sys.modules[key]
    sys.modules.update(_stubs())
    sys.path.insert(0, str(root))
    version = torchvision.__version__
    torchvision.__version__ = "0.99"  # util/misc.py reads float(version[:3]): "0.2" < 0.5
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torchvision.__version__ = version
        sys.path.remove(str(root))
        for key in [k for k in sys.modules if k.split(".")[0] in SHADOWED]:
            del sys.modules[key]
        sys.modules.update(saved)


@functools.cache
def load(name: str) -> types.SimpleNamespace:
    """The repository's modules deformable_detr, deformable_transformer, backbone,
    position_encoding and util.misc, with the attention routed to the PyTorch core."""
    with _importing_from(REPOS[name]):
        mods = types.SimpleNamespace(**{
            key: importlib.import_module(f"models.{key}")
            for key in ("deformable_detr", "deformable_transformer", "backbone",
                        "position_encoding")
        })
        mods.misc = importlib.import_module("util.misc")
        attn = importlib.import_module("models.ops.modules.ms_deform_attn")
        core = importlib.import_module("models.ops.functions.ms_deform_attn_func")
        attn.MSDeformAttnFunction = _PytorchCore(core.ms_deform_attn_core_pytorch)
    return mods


def official_args(name: str, **overrides) -> Namespace:
    """The training script's defaults (main.py), with overrides."""
    args = dict(
        hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dropout=0.1,
        num_feature_levels=4, dec_n_points=4, enc_n_points=4, two_stage=False,
        with_box_refine=False, backbone="resnet50", position_embedding="sine", masks=False,
    )
    if name == "deformable_detr":
        args.update(dim_feedforward=1024, num_queries=300)
    else:
        args.update(dim_feedforward=2048, num_queries_one2one=300, num_queries_one2many=0,
                    mixed_selection=False, look_forward_twice=False, use_checkpoint=False,
                    drop_path_rate=0.2, pretrained_backbone_path=None)
    args.update(overrides)
    return Namespace(**args)


def _backbone(mods, args):
    """Joiner(backbone body, sine position encoding), without pretrained weights."""
    position = mods.position_encoding.build_position_encoding(args)
    interm = args.num_feature_levels > 1
    if args.backbone.startswith("resnet"):
        net = getattr(torchvision.models, args.backbone)(
            weights=None, norm_layer=mods.backbone.FrozenBatchNorm2d)
        body = mods.backbone.BackboneBase(net, True, interm)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body = mods.backbone.TransformerBackbone(args.backbone, True, interm, args)
    return mods.backbone.Joiner(body, position)


def build_official(name: str, args: Namespace, num_classes: int) -> torch.nn.Module:
    """The official DeformableDETR as its build() makes it, in eval (inference) mode."""
    mods = load(name)
    kwargs = dict(num_classes=num_classes, num_feature_levels=args.num_feature_levels,
                  aux_loss=True, with_box_refine=args.with_box_refine, two_stage=args.two_stage)
    if name == "deformable_detr":
        kwargs["num_queries"] = args.num_queries
    else:
        kwargs.update(num_queries_one2one=args.num_queries_one2one,
                      num_queries_one2many=args.num_queries_one2many,
                      mixed_selection=args.mixed_selection)
    model = mods.deformable_detr.DeformableDETR(
        _backbone(mods, args), mods.deformable_transformer.build_deforamble_transformer(args),
        **kwargs)
    if name == "h_deformable_detr":  # what engine.inference does: one-to-one queries only
        model.num_queries = model.num_queries_one2one
        model.transformer.two_stage_num_proposals = model.num_queries
    return perturb(model.eval())


def run_official(name: str, model, images: torch.Tensor, padding_mask: torch.Tensor):
    """Forward on a padded batch; returns the output dict plus encoder memory and decoder
    states (hooked), as ``memory`` (B, S, C) and ``states`` (layers, B, Q, C)."""
    mods = load(name)
    captured = {}

    def keep(key):
        return lambda _m, _i, out: captured.__setitem__(key, out)

    hooks = [model.transformer.encoder.register_forward_hook(keep("memory")),
             model.transformer.decoder.register_forward_hook(keep("decoder"))]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(mods.misc.NestedTensor(images, padding_mask))
    finally:
        for hook in hooks:
            hook.remove()
    out["memory"], out["states"] = captured["memory"], captured["decoder"][0]
    return out


# --- The official key layout, generated from a canonical state dict (needs no repository) ---

HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")


def official_name(key: str, dec_layers: int) -> str:
    """Canonical key -> the official one: the inverse of the format modules' renaming."""
    if key.startswith("backbone."):
        return "backbone.0.body." + key[len("backbone."):]
    if m := re.match(r"^transformer\.enc_out_(class_embed|bbox_embed)\.(.*)$", key):
        return f"{m[1]}.{dec_layers}.{m[2]}"
    return "query_embed.weight" if key == "transformer.tgt_embed.weight" else key


def official_layout(
    canonical: dict, config: DetectorConfig, extra_queries: torch.Tensor | None = None
) -> dict:
    """A canonical state dict as the official code saves it: the heads again under
    transformer.decoder. (bbox_embed with box refinement, class_embed two-stage) and, for
    H-DETR, the one-to-many query rows (``extra_queries``) after the one-to-one ones."""
    out = {official_name(k, config.dec_layers): v for k, v in canonical.items()}
    for key in [k for k in out if HEAD.match(k)]:
        if (key.startswith("bbox") and config.box_refine) or (
                key.startswith("class") and config.two_stage):
            out["transformer.decoder." + key] = out[key]
    if extra_queries is not None:
        out["query_embed.weight"] = torch.cat([out["query_embed.weight"], extra_queries])
    return out


def canonical_model(config: DetectorConfig, seed: int = 0) -> torch.nn.Module:
    """A random canonical detector in eval mode; without box refinement its per-layer heads
    are one head, as in the official model."""
    torch.manual_seed(seed)
    model = perturb(build_detector(config).eval(), seed)
    if not config.box_refine:
        for heads in (model.class_embed, model.bbox_embed):
            for head in heads[1:]:
                head.load_state_dict(heads[0].state_dict())
    return model


# --- Running converted models side by side ---

def load_converted(config: DetectorConfig, state_dict: dict) -> torch.nn.Module:
    """The detector a config describes, holding a converted state dict (strictly)."""
    with torch.device("meta"):
        model = build_detector(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def images_and_padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images padded to 64 x 96: the second is 56 x 80 (zeros below and to the right)."""
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding[1, 56:], padding[1, :, 80:] = True, True
    return images.masked_fill(padding[:, None], 0.0), padding


def assert_batch_equals_singles(model: torch.nn.Module) -> None:
    """The padded batch of two gives each image what it gets alone (same padding)."""
    images, padding = images_and_padding()
    with torch.no_grad():
        batch = model(images, padding)
        singles = [model(images[i : i + 1], padding[i : i + 1]) for i in range(2)]
    for field in ("logits", "boxes"):
        alone = torch.cat([getattr(s, field)[-1] for s in singles])
        torch.testing.assert_close(getattr(batch, field)[-1], alone, atol=1e-4, rtol=0)


def compare_with_official(name: str, args: Namespace) -> dict[str, float]:
    """Convert a random official model; check that the inverse renaming gives back its exact
    state dict; return the max abs errors of the outputs on a padded batch of two."""
    torch.manual_seed(0)
    official = build_official(name, args, num_classes=91)
    state_dict = official.state_dict()
    converted, report = convert_state_dict(state_dict, format=name, args=vars(args))
    assert report.ok, report.problem()
    queries = state_dict.get("query_embed.weight")
    extra = queries[report.config.num_queries:] if queries is not None and name == \
        "h_deformable_detr" else None
    layout = official_layout(converted, report.config, extra)
    assert layout.keys() == state_dict.keys()
    assert all(torch.equal(layout[k], state_dict[k]) for k in state_dict)
    images, padding = images_and_padding()
    expected = run_official(name, official, images, padding)
    with torch.no_grad():
        got = load_converted(report.config, converted)(images, padding)
    errors = {
        "logits": (got.logits[-1] - expected["pred_logits"]).abs().max().item(),
        "boxes": (got.boxes[-1] - expected["pred_boxes"]).abs().max().item(),
        "memory": (got.encoder_states[-1] - expected["memory"]).abs().max().item(),
        "states": (torch.stack(got.decoder_states) - expected["states"]).abs().max().item(),
    }
    print(f"\n{name} max abs errors: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return errors
