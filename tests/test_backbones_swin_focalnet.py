"""Swin and FocalNet backbones: official key layout, config inference, shapes, numerics.

Expected key names, shapes, counts and golden outputs below were read off the official
modules: IDEA-Research/DINO ``models/dino/swin_transformer.py`` @ faa8520 and
FocalNet-DINO ``models/dino/focal.py`` @ 23901e0, built with the same configs. The
side-by-side tests at the end run those modules from ``third_party/`` (git-ignored) and
skip when it is absent.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import types
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from frozenseg.detector.backbones.focalnet import (
    build_focalnet,
    focalnet_config_from_state_dict,
    focalnet_large,
)
from frozenseg.detector.backbones.swin import (
    build_swin,
    swin_config_from_state_dict,
    swin_large,
    swin_tiny,
)

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out

# Small variants with the official naming: depths 2-2-2-2, embed 32.
SMALL_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                  out_indices=(1, 2, 3))
# FocalNet-L fl4 settings (FocalNet-DINO) at a small width.
SMALL_FOCAL = dict(embed_dim=32, depths=(2, 2, 2, 2), focal_levels=(4, 4, 4, 4),
                   focal_windows=(3, 3, 3, 3), out_indices=(0, 1, 2, 3), use_conv_embed=True,
                   use_layerscale=True, use_postln=True, use_postln_in_modulation=False,
                   normalize_modulator=True)

SWIN_SMALL_SHAPES = {
    "patch_embed.proj.weight": (32, 3, 4, 4),
    "patch_embed.norm.weight": (32,),
    "layers.0.blocks.1.attn.relative_position_bias_table": (169, 1),
    "layers.0.blocks.1.attn.relative_position_index": (49, 49),
    "layers.1.blocks.0.mlp.fc1.weight": (256, 64),
    "layers.2.downsample.reduction.weight": (256, 512),
    "layers.2.downsample.norm.weight": (512,),
    "layers.3.blocks.1.attn.qkv.weight": (768, 256),
    "norm1.weight": (64,),
    "norm3.bias": (256,),
}
SWIN_TOP_KEYS = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                 "patch_embed.norm.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                 "norm2.bias", "norm3.weight", "norm3.bias"]
SWIN_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
                   "attn.relative_position_index", "attn.qkv.weight", "attn.qkv.bias",
                   "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                   "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
SWIN_DOWNSAMPLE_KEYS = ["downsample.reduction.weight", "downsample.norm.weight",
                        "downsample.norm.bias"]

FOCAL_SMALL_SHAPES = {
    "patch_embed.proj.weight": (32, 3, 7, 7),
    "layers.0.blocks.0.modulation.focal_layers.0.0.weight": (32, 1, 3, 3),
    "layers.0.blocks.1.gamma_1": (32,),
    "layers.0.downsample.proj.weight": (64, 32, 3, 3),
    "layers.1.blocks.0.modulation.f.weight": (133, 64),
    "layers.1.blocks.0.modulation.h.weight": (64, 64, 1, 1),
    "layers.1.blocks.0.modulation.focal_layers.3.0.weight": (64, 1, 9, 9),
    "layers.2.downsample.norm.bias": (256,),
    "norm0.weight": (32,),
}
FOCAL_TOP_KEYS = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                  "patch_embed.norm.bias"] + [f"norm{i}.{p}" for i in range(4)
                                              for p in ("weight", "bias")]
FOCAL_BLOCK_KEYS = (
    ["gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "modulation.f.weight",
     "modulation.f.bias", "modulation.h.weight", "modulation.h.bias", "modulation.proj.weight",
     "modulation.proj.bias"]
    + [f"modulation.focal_layers.{k}.0.weight" for k in range(4)]
    + ["norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
       "mlp.fc2.bias"]
)
FOCAL_DOWNSAMPLE_KEYS = ["downsample.proj.weight", "downsample.proj.bias",
                         "downsample.norm.weight", "downsample.norm.bias"]


def _stage0_keys(block_keys: list[str], downsample_keys: list[str]) -> list[str]:
    blocks = [f"blocks.{j}.{k}" for j in range(2) for k in block_keys]
    return blocks + downsample_keys


def _check_layout(sd, top, block_keys, downsample_keys, shapes, count):
    assert len(sd) == count
    assert [k for k in sd if not k.startswith("layers.")] == top
    stage0 = [k.removeprefix("layers.0.") for k in sd if k.startswith("layers.0.")]
    assert stage0 == _stage0_keys(block_keys, downsample_keys)
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_swin_small_key_layout():
    sd = build_swin(**SMALL_SWIN).state_dict()
    _check_layout(sd, SWIN_TOP_KEYS, SWIN_BLOCK_KEYS, SWIN_DOWNSAMPLE_KEYS, SWIN_SMALL_SHAPES, 131)
    # The index is a persistent int64 buffer in the official module, hence in checkpoints.
    assert sd["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64


def test_focalnet_small_key_layout():
    sd = build_focalnet(**SMALL_FOCAL).state_dict()
    _check_layout(sd, FOCAL_TOP_KEYS, FOCAL_BLOCK_KEYS, FOCAL_DOWNSAMPLE_KEYS,
                  FOCAL_SMALL_SHAPES, 184)


def _numel(sd, skip="relative_position_index"):
    return sum(v.numel() for k, v in sd.items() if skip not in k)


@pytest.mark.parametrize(
    "factory, count, numel, shapes",
    [
        (lambda: swin_tiny(), 189, 27520698,
         {"layers.2.blocks.5.attn.relative_position_bias_table": (169, 12),
          "norm0.weight": (96,)}),
        (lambda: swin_large(window_size=12, out_indices=(1, 2, 3)), 355, 195200820,
         {"layers.2.blocks.17.attn.relative_position_bias_table": (529, 24),
          "layers.3.blocks.1.attn.relative_position_index": (144, 144),
          "norm3.weight": (1536,)}),
        (lambda: swin_large(window_size=7, out_indices=(1, 2, 3)), 355, 194997780,
         {"layers.2.blocks.17.attn.relative_position_bias_table": (169, 24)}),
        (lambda: focalnet_large(focal_levels=4), 504, 205746936,
         {f"layers.3.blocks.1.modulation.focal_layers.{k}.0.weight": (1536, 1, 3 + 2 * k, 3 + 2 * k)
          for k in range(4)}),
        (lambda: focalnet_large(focal_levels=3, out_indices=(1, 2, 3)), 478, 205566048,
         {"layers.0.blocks.0.modulation.focal_layers.2.0.weight": (192, 1, 9, 9),
          "layers.0.blocks.0.modulation.f.weight": (388, 192)}),
    ],
    ids=["swin_T", "swin_L_384", "swin_L_224", "focalnet_L_fl4", "focalnet_L_fl3_4scale"],
)
def test_full_size_layout_on_meta(factory, count, numel, shapes):
    with torch.device("meta"):
        sd = factory().state_dict()
    assert len(sd) == count
    assert _numel(sd) == numel
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


SWIN_CONFIGS = [
    SMALL_SWIN,
    {**SMALL_SWIN, "window_size": 12, "out_indices": (0, 1, 2, 3)},
    {**SMALL_SWIN, "depths": (1, 3, 2, 1), "num_heads": (2, 2, 4, 4), "out_indices": (3,)},
]
FOCAL_CONFIGS = [
    SMALL_FOCAL,
    # FocalNet-L fl3 settings, 4-scale.
    {**SMALL_FOCAL, "focal_levels": (3, 3, 3, 3), "focal_windows": (5, 5, 5, 5),
     "normalize_modulator": False, "out_indices": (1, 2, 3)},
    # FocalNet-T/S/B style: plain patch embedding, pre-norm, no layer scale.
    {**SMALL_FOCAL, "focal_levels": (2, 3, 2, 1), "focal_windows": (3, 3, 5, 3),
     "use_conv_embed": False, "use_layerscale": False, "use_postln": False,
     "normalize_modulator": False, "depths": (1, 2, 1, 1)},
    # FocalNet-H fl4 style: LayerNorm inside the modulation, no normalised modulator.
    {**SMALL_FOCAL, "use_postln_in_modulation": True, "normalize_modulator": False},
]


def _round_trip(config, build, infer):
    model = build(**config)
    inferred = infer(model.state_dict())
    assert {k: inferred[k] for k in config} == config
    rebuilt = build(**inferred)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert infer(rebuilt.state_dict()) == inferred


@pytest.mark.parametrize("config", SWIN_CONFIGS)
def test_swin_config_round_trip(config):
    _round_trip(config, build_swin, swin_config_from_state_dict)


@pytest.mark.parametrize("config", FOCAL_CONFIGS)
def test_focalnet_config_round_trip(config):
    _round_trip(config, build_focalnet, focalnet_config_from_state_dict)


def test_factories_round_trip_on_meta():
    with torch.device("meta"):
        swin_sd = swin_large(window_size=12, out_indices=(1, 2, 3)).state_dict()
        focal_sd = focalnet_large(focal_levels=4).state_dict()
    assert swin_config_from_state_dict(swin_sd) == dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
        out_indices=(1, 2, 3), mlp_ratio=4.0, patch_size=4, in_chans=3, qkv_bias=True,
        patch_norm=True)
    assert focalnet_config_from_state_dict(focal_sd) == dict(
        embed_dim=192, depths=(2, 2, 18, 2), focal_levels=(4, 4, 4, 4),
        focal_windows=(3, 3, 3, 3), out_indices=(0, 1, 2, 3), use_conv_embed=True,
        use_layerscale=True, use_postln=True, use_postln_in_modulation=False,
        normalize_modulator=True, mlp_ratio=4.0, patch_size=4, in_chans=3, patch_norm=True)


def _expected_sizes(h: int, w: int) -> list[tuple[int, int]]:
    # Stride-4 patch embedding, then each stage halves rounding up (bottom/right padding).
    sizes = [(math.ceil(h / 4), math.ceil(w / 4))]
    for _ in range(3):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


MODELS = {
    "swin": lambda: build_swin(**SMALL_SWIN),
    "swin_w12": lambda: build_swin(**SWIN_CONFIGS[1]),
    "focalnet": lambda: build_focalnet(**SMALL_FOCAL),
    "focalnet_plain": lambda: build_focalnet(**FOCAL_CONFIGS[2]),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("size", [(67, 93), (13, 9)])
def test_output_shapes(name, size):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (c, *hw) for c, hw in zip(model.channels, _expected_sizes(*size), strict=True)
    ]
    assert model.channels == [32, 64, 128, 256]
    assert all(o.is_contiguous() and torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_of_two_equals_singles(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    images = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        batched = model(images)
        singles = [model(images[i : i + 1]) for i in range(2)]
    for level, out in enumerate(batched):
        expected = torch.cat([s[level] for s in singles])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build, config", [(build_swin, SMALL_SWIN), (build_focalnet, SMALL_FOCAL)])
def test_stage_outside_out_indices_is_raw(build, config):
    """A stage not in out_indices is the same map as with its norm{i}, minus that norm."""
    torch.manual_seed(0)
    normed = build(**{**config, "out_indices": (0, 1, 2, 3)}).eval()
    raw = build(**{**config, "out_indices": (1, 2, 3)}).eval()
    raw.load_state_dict(normed.state_dict(), strict=False)
    images = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        a, b = normed(images), raw(images)
    torch.testing.assert_close(a[0], normed.norm0(b[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    for x, y in zip(a[1:], b[1:], strict=True):
        torch.testing.assert_close(x, y)


def deterministic_weights(model: torch.nn.Module) -> None:
    """Fill every float tensor with a fixed sine pattern (platform-independent, unlike RNGs).

    LayerNorm weights ~1, biases ~0.1, layer scales ~0.5, weight matrices ~1/sqrt(fan_in).
    """
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(model.state_dict().items())):
            if not t.is_floating_point():
                continue
            wave = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.7 + i).view(t.shape)
            if "gamma" in name:
                value = 0.5 + 0.3 * wave
            elif name.endswith("bias"):
                value = 0.1 * wave
            elif t.ndim == 1:
                value = 1.0 + 0.2 * wave
            elif "relative_position_bias_table" in name:
                value = wave
            else:
                value = wave * math.sqrt(3.0 * t.shape[0] / t.numel())
            t.copy_(value.to(t.dtype))


def deterministic_images(b: int, h: int, w: int) -> torch.Tensor:
    n = torch.arange(b * 3 * h * w, dtype=torch.float64)
    return (torch.sin(n * 0.31) + 0.5 * torch.cos(n * 0.017)).view(b, 3, h, w).float()


def summarise(outs: list[torch.Tensor]) -> list[tuple[float, ...]]:
    """Per map: mean, mean |x|, and the first 3 channels at pixel (0, 0) of image 0."""
    return [(o.double().mean().item(), o.double().abs().mean().item(),
             *o[0, :3, 0, 0].tolist()) for o in outs]


# summarise(official(deterministic_images(1, 37, 51))) with deterministic_weights, computed
# with the official modules (float32, CPU). Stage 0 of SMALL_SWIN is raw (not in
# out_indices); its value comes from the official layers[0] output.
GOLDEN = {
    "swin": [
        (-0.02759694, 1.189488, -1.174868, -0.8850722, 2.901658),
        (-0.01214526, 0.7882773, -2.12161, 0.1196298, -0.1668756),
        (-0.006956331, 0.8406757, -0.6670482, -1.545652, -0.06472429),
        (0.003021111, 0.8873865, -0.9703042, -1.812459, -0.5879108),
    ],
    "swin_w12": [
        (0.006974644, 0.8211094, -0.9459345, 0.3938412, 1.002882),
        (0.002508912, 0.7823789, -1.643871, 0.2512367, -0.3577506),
        (0.006764371, 0.8503396, -1.074531, -2.065119, -0.06110322),
        (0.0007633535, 0.8831407, -0.8674187, -1.49936, -0.4385983),
    ],
    "focalnet": [
        (-0.03979746, 0.7625488, -1.617169, 1.579077, -0.6116834),
        (0.0009993059, 0.8131223, -1.075352, 0.5899517, -1.041075),
        (0.01819314, 0.8279208, -2.309766, -0.9839246, 0.2053048),
        (0.01989128, 0.8248224, 0.3279499, -1.463834, -0.6657888),
    ],
    "focalnet_plain": [
        (-0.007320494, 0.8722177, 0.4353154, -1.738834, 1.410732),
        (-0.007546067, 0.8292077, -2.050328, 1.673288, -0.5540253),
        (0.01552161, 0.8287232, -1.057634, -0.4066007, -1.23518),
        (0.01661507, 0.8483654, -1.846869, -2.135797, -1.914605),
    ],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_matches_golden_outputs(name):
    model = MODELS[name]().eval()
    deterministic_weights(model)
    with torch.no_grad():
        got = summarise(model(deterministic_images(1, 37, 51)))
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(GOLDEN[name], dtype=torch.float64),
                               atol=1e-4, rtol=1e-4)


# --- Side by side with the official code (needs third_party/, skipped otherwise) ----------

THIRD_PARTY = Path(__file__).resolve().parents[1] / "third_party"
OFFICIAL_SWIN = THIRD_PARTY / "DINO" / "models" / "dino" / "swin_transformer.py"
OFFICIAL_FOCAL = THIRD_PARTY / "FocalNet-DINO" / "models" / "dino" / "focal.py"


class _NestedTensor:
    """Stand-in for DINO's util.misc.NestedTensor, which the official files import."""

    def __init__(self, tensors, mask):
        self.tensors, self.mask = tensors, mask


@functools.cache
def _load_official(path: Path):
    misc = types.ModuleType("util.misc")
    misc.NestedTensor = _NestedTensor
    util = types.ModuleType("util")
    util.misc = misc
    spec = importlib.util.spec_from_file_location(f"official_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {"util": util, "util.misc": misc}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm.models.layers deprecation
            spec.loader.exec_module(module)
    return module


def official_module(path: Path):
    if not path.exists():
        pytest.skip(f"official source not fetched: {path}")
    pytest.importorskip("timm")
    return _load_official(path)


def _as_official_kwargs(config: dict) -> dict:
    # Our keyword names are the official ones; it takes lists for the per-stage values.
    return {k: list(v) if isinstance(v, tuple) and k != "out_indices" else v
            for k, v in config.items()}


def official_swin(config: dict):
    module = official_module(OFFICIAL_SWIN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid indexing warning
        return module.SwinTransformer(**_as_official_kwargs(config))


def official_focalnet(config: dict):
    return official_module(OFFICIAL_FOCAL).FocalNet(**_as_official_kwargs(config))


def run_official(model, images: torch.Tensor, *, focal: bool) -> list[torch.Tensor | None]:
    """All 4 stage maps of the official model: normed ones from its forward, the others
    (not in out_indices) from its layers[i] output, before any norm."""
    raw = {}

    def keep(i):
        def hook(_module, _inputs, output):
            x_out, h, w = output[:3]
            raw[i] = x_out.view(x_out.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(model.layers)]
    try:
        if focal:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
            outs = model(_NestedTensor(images, mask))
            normed = [outs[k].tensors for k in range(len(outs))]
        else:
            normed = list(model.forward_raw(images))
    finally:
        for handle in handles:
            handle.remove()
    by_stage = dict(zip(model.out_indices, normed, strict=True))
    return [by_stage.get(i, raw[i]) for i in range(4)]


def compare_with_official(ours, official, *, focal, dtype, size=(67, 93)):
    assert list(ours.state_dict()) == list(official.state_dict())  # same keys, same order
    deterministic_weights(official)
    ours.load_state_dict(official.state_dict(), strict=True)
    # The official train() override returns None, so no chaining on it.
    official.eval()
    ours, official = ours.eval().to(dtype), official.to(dtype)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        expected = run_official(official, images, focal=focal)
        got = ours(images)
    errors = [(a - b).abs().max().item() for a, b in zip(got, expected, strict=True)]
    print(f"\n{type(ours).__name__} {dtype} max abs error per stage: "
          + ", ".join(f"{e:.2e}" for e in errors))
    return errors


SWIN_SIDE_BY_SIDE = {
    "small_w7_4scale": SMALL_SWIN,
    "small_w12_5scale": SWIN_CONFIGS[1],
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
}
FOCAL_SIDE_BY_SIDE = {
    "small_fl4": SMALL_FOCAL,
    "small_fl3_4scale": FOCAL_CONFIGS[1],
    "plain": FOCAL_CONFIGS[2],
    "postln_in_modulation": FOCAL_CONFIGS[3],
}
TOLERANCE = {torch.float32: 5e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(SWIN_SIDE_BY_SIDE))
def test_swin_matches_official(name, dtype):
    config = SWIN_SIDE_BY_SIDE[name]
    official = official_swin(config)
    errors = compare_with_official(build_swin(**config), official, focal=False, dtype=dtype)
    assert max(errors) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(FOCAL_SIDE_BY_SIDE))
def test_focalnet_matches_official(name, dtype):
    config = FOCAL_SIDE_BY_SIDE[name]
    official = official_focalnet(config)
    errors = compare_with_official(build_focalnet(**config), official, focal=True, dtype=dtype)
    assert max(errors) < TOLERANCE[dtype]


def test_full_size_factories_match_official():
    """Swin-L 384 (DINO-4scale) and FocalNet-L fl4 (FocalNet-DINO 5-scale), as released."""
    module = official_module(OFFICIAL_SWIN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = module.build_swin_transformer("swin_L_384_22k", 384, out_indices=(1, 2, 3))
    ours = swin_large(window_size=12, out_indices=(1, 2, 3))
    assert max(compare_with_official(ours, official, focal=False, dtype=torch.float32)) < 5e-5
    official = official_module(OFFICIAL_FOCAL).build_focalnet(
        "focalnet_L_384_22k_fl4", focal_levels=4, focal_windows=3, out_indices=(0, 1, 2, 3))
    ours = focalnet_large(focal_levels=4)
    assert max(compare_with_official(ours, official, focal=True, dtype=torch.float32)) < 5e-5


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_values_come_from_official_code(name):
    """Recompute GOLDEN with the official modules (how the table was made)."""
    config = {"swin": SMALL_SWIN, "swin_w12": SWIN_CONFIGS[1], "focalnet": SMALL_FOCAL,
              "focalnet_plain": FOCAL_CONFIGS[2]}[name]
    focal = name.startswith("focalnet")
    official = (official_focalnet if focal else official_swin)(config)
    official.eval()
    deterministic_weights(official)
    with torch.no_grad():
        got = summarise(run_official(official, deterministic_images(1, 37, 51), focal=focal))
    print(f"\n{name!r}: {got!r},")
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(GOLDEN[name], dtype=torch.float64),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build, spec", [(build_swin, SMALL_SWIN), (build_focalnet, SMALL_FOCAL)])
def test_stages_one_is_the_first_map_of_the_full_forward(build, spec):
    torch.manual_seed(0)
    backbone = build(**spec).eval()
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        first, full = backbone(images, stages=1), backbone(images)
    assert len(first) == 1
    torch.testing.assert_close(first[0], full[0], atol=0, rtol=0)
