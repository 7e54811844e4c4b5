"""detrex DINO checkpoints convert to the canonical model and reproduce detrex's outputs.

Without detrex, state dicts in its layout are made from the canonical model by the inverse
renaming and checked, key by key and shape by shape, against the layout recorded from
IDEA-Research/detrex with facebookresearch/detectron2 (``data/detrex_dino_keys.json``).
When ``third_party/detrex`` and ``third_party/detectron2`` hold those repositories (and
detectron2's pure-Python dependencies are installed), converted models also run side by
side with detrex's own DINO, built from its LazyConfigs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import sys
import types
import warnings
from collections.abc import Iterable
from pathlib import Path

import official_detr
import pytest
import torch

from frozenseg.checkpoint import load_checkpoint
from frozenseg.convert import convert_checkpoint, convert_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector
from frozenseg.formats import detect_format, dino
from frozenseg.formats import detrex as detrex_format

RECORDED = json.loads((Path(__file__).parent / "data" / "detrex_dino_keys.json").read_text())
THIRD_PARTY = Path(__file__).resolve().parents[1] / "third_party"
DETREX, DETECTRON2 = THIRD_PARTY / "detrex", THIRD_PARTY / "detectron2"

# Every detrex DINO: the inference settings of its code and of dino_r50.py.
DETREX_DINO = dict(
    variant="dino", query_init="mixed", box_refine=True, proposal_score="max_class",
    decoder_norm=True, ref_point_head=True, pos_temperature=10000.0, pos_offset=-0.5,
    inverse_sigmoid_eps=1e-3, num_select=300,
)
# The small builds the recorded layouts come from (label_enc: num_classes rows).
SMALL = dict(hidden_dim=256, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=64,
             num_queries=30, num_classes=7, dn_labelbook_size=6)
SWIN_T = {"name": "swin", "embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24),
          "window_size": 7, "out_indices": (1, 2, 3), "mlp_ratio": 4.0, "patch_size": 4,
          "in_chans": 3, "qkv_bias": True, "patch_norm": True}
# dino_focalnet_large_lrf_384_fl4_4scale_12ep.py's FocalNet, shrunk: 4 focal levels, and yet
# no normalised modulator (detrex's choice, unlike FocalNet-DINO's fl4 models).
FOCALNET = {"name": "focalnet", "embed_dim": 32, "depths": (1, 1, 1, 1),
            "focal_levels": (4, 4, 4, 4), "focal_windows": (3, 3, 3, 3), "out_indices": (1, 2, 3),
            "use_conv_embed": True, "use_layerscale": True, "use_postln": True,
            "use_postln_in_modulation": False, "normalize_modulator": False, "mlp_ratio": 4.0,
            "patch_size": 4, "in_chans": 3, "patch_norm": True}
FOUR = dict(backbone_levels=(1, 2, 3), num_feature_levels=4)
VARIANTS = {
    "resnet50_4scale": DetectorConfig(**DETREX_DINO, **SMALL, **FOUR,
                                      backbone={"name": "resnet50"}),
    "resnet50_5scale": DetectorConfig(**DETREX_DINO, **SMALL, backbone={"name": "resnet50"},
                                      backbone_levels=(0, 1, 2, 3), num_feature_levels=5),
    "swin_tiny_224_4scale": DetectorConfig(**DETREX_DINO, **SMALL, **FOUR, backbone=SWIN_T),
    "focalnet_large_fl4_4scale": DetectorConfig(**DETREX_DINO, **SMALL, **FOUR,
                                                backbone=FOCALNET),
}
CONFIG = dict(model={"transformer": {"encoder": {"num_heads": 8}},
                     "position_embedding": {"temperature": 10000, "offset": -0.5}})

# --- The detrex layout, generated from a canonical state dict (the inverse renaming) ------

_LAYER = r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\."
_PARTS = {
    "encoder": {"self_attn": "attentions.0", "norm1": "norms.0", "norm2": "norms.1"},
    "decoder": {"self_attn": "attentions.0.attn", "cross_attn": "attentions.1",
                "norm2": "norms.0", "norm1": "norms.1", "norm3": "norms.2"},
}
_RESNET = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "bn1": "conv1.norm",
           "bn2": "conv2.norm", "bn3": "conv3.norm", "downsample.0": "shortcut",
           "downsample.1": "shortcut.norm"}


def detrex_name(key: str, config: DetectorConfig) -> str:
    """Canonical key -> detrex's (detectron2 ResNet, ChannelMapper, mmcv-style layers)."""
    if m := re.match(r"^backbone\.layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.", key):
        return f"backbone.res{int(m[1]) + 1}.{m[2]}.{_RESNET[m[3]]}.{key[m.end():]}"
    if m := re.match(r"^backbone\.(conv1|bn1)\.", key):
        return f"backbone.stem.{_RESNET[m[1]]}.{key[m.end():]}"
    if m := re.match(r"^input_proj\.(\d+)\.([01])\.", key):
        n, i, part = len(config.backbone_levels), int(m[1]), ("conv", "norm")[int(m[2])]
        convs = f"convs.{i}" if i < n else f"extra_convs.{i - n}"
        return f"neck.{convs}.{part}.{key[m.end():]}"
    if m := re.match(_LAYER, key):
        part = {"linear1": "ffns.0.layers.0.0", "linear2": "ffns.0.layers.1",
                **_PARTS[m[1]]}[m[3]]
        return f"transformer.{m[1]}.layers.{m[2]}.{part}.{key[m.end():]}"
    if m := re.match(r"^transformer\.enc_out_(class|bbox)_embed\.", key):
        return f"{m[1]}_embed.{config.dec_layers}.{key[m.end():]}"
    return "transformer.level_embeds" if key == "transformer.level_embed" else key


def detrex_layout(state_dict: dict, config: DetectorConfig) -> dict:
    """A canonical state dict as detrex saves it, heads again under transformer.decoder."""
    out = {detrex_name(k, config): v for k, v in state_dict.items()}
    for key in [k for k in out if re.match(r"^(class|bbox)_embed\.\d+\.", k)]:
        out[f"transformer.decoder.{key}"] = out[key].clone()
    return out


@functools.cache
def _random_canonical(variant: str) -> dict:
    return official_detr.perturb(build_detector(VARIANTS[variant]).eval()).state_dict()


def random_detrex_state_dict(variant: str) -> tuple[dict, dict]:
    """(detrex-layout state dict, the canonical one it was made from), random weights.
    Both share tensors with every other call: replace tensors, never change them in place."""
    canonical = _random_canonical(variant)
    return detrex_layout(canonical, VARIANTS[variant]), dict(canonical)


@pytest.mark.parametrize("variant", VARIANTS)
def test_detrex_layout_is_the_recorded_one(variant):
    with torch.device("meta"):
        model = build_detector(VARIANTS[variant])
    layout = detrex_layout(model.state_dict(), VARIANTS[variant])
    assert {k: list(v.shape) for k, v in layout.items()} == RECORDED[variant]


def test_full_size_config_is_derived_from_shapes_with_or_without_the_lazy_config():
    """DINO-4scale R50 on COCO: 900 queries, 80 contiguous classes, label_enc 80 rows."""
    config = DetectorConfig(**DETREX_DINO, **FOUR, hidden_dim=256, nheads=8, enc_layers=6,
                            dec_layers=6, dim_feedforward=2048, num_queries=900, num_classes=80,
                            dn_labelbook_size=79, backbone={"name": "resnet50"})
    with torch.device("meta"):
        layout = detrex_layout(build_detector(config).state_dict(), config)
    assert detect_format(layout).name == "detrex_dino"
    assert detrex_format.derive_config(layout, CONFIG) == (config, [])
    derived, notes = detrex_format.derive_config(layout, {})
    assert derived == config
    assert [n.split(":")[0] for n in notes] == [
        "attention heads (head dim 32)", "position embedding"]


@pytest.mark.parametrize("config", [
    {"model": {"position_embedding": {"temperature": 20, "offset": 0.0}}},
    {"model.position_embedding.temperature": 20, "model.position_embedding.offset": 0.0},
])
def test_the_24_epoch_position_embedding_comes_from_the_config(config):
    """dino_r50_4scale_24ep.py: DINO's temperature 20 without offset; nothing in the weights
    shows it. The LazyConfig (nested) or dotted paths (flat) say so."""
    derived, _ = detrex_format.derive_config(random_detrex_state_dict("resnet50_4scale")[0],
                                             config)
    assert (derived.pos_temperature, derived.pos_offset) == (20.0, 0.0)


def test_official_dino_and_detrex_layouts_are_told_apart():
    from test_convert_dino import VARIANTS as DINO_VARIANTS

    config = DINO_VARIANTS["resnet50_4scale"]
    with torch.device("meta"):
        canonical = build_detector(config).state_dict()
    assert detect_format(dino.official_state_dict(canonical, config)).name == "dino"
    assert detect_format(detrex_layout(canonical, config)).name == "detrex_dino"


@pytest.mark.parametrize("variant", VARIANTS)
def test_conversion_loads_strictly_and_gives_back_the_canonical_weights(variant):
    source, canonical = random_detrex_state_dict(variant)
    converted, report = convert_state_dict(source)
    assert report.format == "detrex_dino" and report.ok, report.problem()
    assert report.config.to_dict() == VARIANTS[variant].to_dict()
    assert {k for k, _ in report.dropped} == {
        k for k in source if k.startswith(("transformer.decoder.class_embed.",
                                           "transformer.decoder.bbox_embed."))}
    assert converted.keys() == canonical.keys()
    assert all(torch.equal(converted[k], canonical[k]) for k in canonical)
    official_detr.load_converted(report.config, converted)  # strictly


def test_a_batch_of_two_images_of_different_sizes_equals_two_singles():
    converted, report = convert_state_dict(random_detrex_state_dict("resnet50_4scale")[0])
    official_detr.assert_batch_equals_singles(
        official_detr.load_converted(report.config, converted))


def test_a_renamed_key_and_a_changed_shape_are_reported_by_name():
    source, _ = random_detrex_state_dict("resnet50_4scale")
    renamed = dict(source)
    renamed["transformer.encoder.layers.1.attentions.0.value_projection.weight"] = renamed.pop(
        "transformer.encoder.layers.1.attentions.0.value_proj.weight")
    _, report = convert_state_dict(renamed)
    assert report.missing == ["transformer.encoder.layers.1.self_attn.value_proj.weight"]
    assert report.unexpected == [
        "transformer.encoder.layers.1.attentions.0.value_projection.weight"]

    reshaped = dict(source, **{"neck.convs.1.norm.weight": torch.zeros(32)})
    _, report = convert_state_dict(reshaped)
    assert report.mismatched == [("neck.convs.1.norm.weight", (32,), (256,))]
    assert "neck.convs.1.norm.weight" in report.problem()
    assert ("neck.convs.1.norm.weight", "input_proj.1.1.weight") in report.renamed


def test_the_decoder_head_copies_must_equal_the_heads():
    source, _ = random_detrex_state_dict("resnet50_4scale")
    key = "transformer.decoder.class_embed.2.bias"  # the encoder-proposal head's copy
    source[key] = source[key] + 1.0
    with pytest.raises(ValueError, match=r"transformer\.decoder\.class_embed\.2\.bias"):
        convert_state_dict(source)


def test_a_head_saved_only_as_the_decoder_copy_is_used():
    source, canonical = random_detrex_state_dict("resnet50_4scale")
    del source["bbox_embed.2.layers.0.weight"]
    converted, report = convert_state_dict(source)
    assert report.ok and torch.equal(converted["transformer.enc_out_bbox_embed.layers.0.weight"],
                                     canonical["transformer.enc_out_bbox_embed.layers.0.weight"])


@pytest.mark.parametrize("path, value", [
    ("model.backbone.stages.stride_in_1x1", True),
    ("dataloader.test.mapper.img_format", "BGR"),
    ("model.transformer.encoder.post_norm", True),
    ("model.position_embedding.normalize", False),
])
def test_config_entries_frozenseg_does_not_reproduce_are_refused(path, value):
    source, _ = random_detrex_state_dict("resnet50_4scale")
    with pytest.raises(ValueError, match=re.escape(path)):
        convert_state_dict(source, args={path: value})


def test_a_backbone_frozenseg_does_not_have_is_refused():
    source, _ = random_detrex_state_dict("resnet50_4scale")
    vit = {k: v for k, v in source.items() if not k.startswith("backbone.")}
    vit["backbone.net.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    with pytest.raises(ValueError, match="unsupported detrex DINO backbone"):
        convert_state_dict(vit)


def test_convert_checkpoint_reads_a_detectron2_checkpoint_file(tmp_path):
    """As detectron2's Checkpointer saves it: {'model': state_dict, 'iteration': ...}."""
    path = tmp_path / "model_final.pth"
    torch.save({"model": random_detrex_state_dict("resnet50_4scale")[0], "iteration": 89999},
               path)
    report = convert_checkpoint(path, tmp_path / "out")
    assert report.format == "detrex_dino" and report.config == VARIANTS["resnet50_4scale"]
    assert [n.split(":")[0] for n in report.notes] == [
        "attention heads (head dim 32)", "position embedding"]
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["format"] == "detrex_dino" and meta["config"]["pos_offset"] == -0.5


# --- side by side with detrex (third_party/detrex + third_party/detectron2) -------------------

CONFIG_FILES = {
    "resnet50_4scale": "dino-resnet/dino_r50_4scale_12ep.py",
    "resnet50_4scale_24ep": "dino-resnet/dino_r50_4scale_24ep.py",
    "resnet50_5scale": "dino-resnet/dino_r50_5scale_12ep.py",
    "swin_tiny_224_4scale": "dino-swin/dino_swin_tiny_224_4scale_12ep.py",
    "focalnet_large_fl4_4scale": "dino-focal/dino_focalnet_large_lrf_384_fl4_4scale_12ep.py",
}
STUBS = ("detectron2._C", "detrex._C", "fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
         "wandb", "pkg_resources")


@pytest.fixture(scope="module")
def detrex():
    """detectron2's LazyConfig and detrex's modules on the CPU.

    Nothing is compiled: ``detectron2._C`` is only used by deformable convolutions, and with
    ``detrex._C`` importable detrex's attention runs its own PyTorch code off the GPU.
    fairscale (activation checkpointing) and wandb are stubbed; ``pkg_resources`` points
    detrex's ``get_config`` at the repository's ``configs/``.
    """
    if not ((DETREX / "projects" / "dino" / "modeling" / "dino.py").is_file()
            and (DETECTRON2 / "detectron2" / "__init__.py").is_file()):
        pytest.skip("third_party/detrex (IDEA-Research/detrex) or third_party/detectron2 "
                    "(facebookresearch/detectron2) is not there")
    for name in ("fvcore", "iopath", "omegaconf", "cv2", "einops", "scipy", "timm"):
        pytest.importorskip(name, reason=f"detectron2/detrex need {name}")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.syspath_prepend(str(DETECTRON2))
        mp.syspath_prepend(str(DETREX))
        for name in STUBS:
            mp.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["fairscale.nn.checkpoint"].checkpoint_wrapper = lambda module: module
        sys.modules["pkg_resources"].resource_filename = lambda _, path: str(DETREX / path)
        yield types.SimpleNamespace(
            config=importlib.import_module("detectron2.config"),
            structures=importlib.import_module("detectron2.structures"),
            layers=importlib.import_module("detectron2.layers"),
        )
    roots = (str(DETREX), str(DETECTRON2))
    for name in [n for n, m in sys.modules.items() if _loaded_from(m, roots)]:
        sys.modules.pop(name, None)


def _loaded_from(module: types.ModuleType, roots: tuple[str, ...]) -> bool:
    """Whether a module, or a namespace package (it has only ``__path__``), is under roots."""
    path = getattr(module, "__path__", None)
    try:
        entries = list(path) if isinstance(path, Iterable) else []
    except KeyError:  # a namespace path recomputed after another harness removed its parent
        entries = []
    files = [getattr(module, "__file__", None), *entries]
    return any(str(f).startswith(roots) for f in files if f)


def detrex_model(detrex, variant: str):
    """detrex's DINO from its config file, small (SMALL), eval mode, random weights."""
    cfg = detrex.config.LazyConfig.load(str(DETREX / "projects/dino/configs" /
                                            CONFIG_FILES[variant]))
    m = cfg.model
    m.device, m.num_queries, m.num_classes = "cpu", 30, 7
    m.select_box_nums_for_evaluation = 100  # of 30 x 7 candidates
    for part in (m.transformer.encoder, m.transformer.decoder):
        part.num_layers, part.feedforward_dim = 2, 64
    if "focalnet" in variant:
        m.backbone.embed_dim, m.backbone.depths = 32, (1, 1, 1, 1)
        m.neck.input_shapes = {f"p{i}": detrex.layers.ShapeSpec(channels=32 * 2**i)
                               for i in (1, 2, 3)}
    model = official_detr.perturb(detrex.config.instantiate(m).eval())
    if variant == "resnet50_4scale":
        # Layer 0's head pushes reference w, h past 1 - 1e-3 and layer 1's pulls them back:
        # the final boxes show the inverse_sigmoid clamp (eps 1e-3).
        with torch.no_grad():
            model.bbox_embed[0].layers[2].bias[2:] = 12.0
            model.bbox_embed[1].layers[2].bias[2:] = -8.0
    return model, cfg


def images_0_255():
    """Two RGB images of different sizes, 0..255 as detectron2's mapper gives them."""
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 96, 128, generator=g) * 255, torch.rand(3, 70, 90, generator=g) * 255]


def run_detrex_masked(detrex, model, images):
    """detrex's forward on a padded batch with padding masks, as it trains: its eval forward
    passes no mask. Denoising is off and the criterion only captures the outputs."""
    Instances, Boxes = detrex.structures.Instances, detrex.structures.Boxes
    captured = {}
    hooks = [model.transformer.encoder.register_forward_hook(
                 lambda _m, _i, out: captured.update(memory=out)),
             model.transformer.decoder.register_forward_hook(
                 lambda _m, _i, out: captured.update(states=out[0]))]
    model.dn_number, model.training = 0, True  # the top module only: its layers stay in eval
    model.criterion.forward = lambda out, *_: captured.update(out) or {}
    inputs = [{"image": im, "instances": Instances(
        tuple(im.shape[-2:]), gt_classes=torch.zeros(0, dtype=torch.long),
        gt_boxes=Boxes(torch.zeros(0, 4)))} for im in images]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        model.training = False
        for hook in hooks:
            hook.remove()
    layers = [*captured["aux_outputs"], captured]
    captured["logits"] = torch.stack([o["pred_logits"] for o in layers])
    captured["boxes"] = torch.stack([o["pred_boxes"] for o in layers])
    return captured


def convert_detrex(model, cfg, variant: str):
    converted, report = convert_state_dict(model.state_dict(), args=cfg)
    assert report.format == "detrex_dino" and report.ok, report.problem()
    expected = dataclasses.replace(VARIANTS[variant.replace("_24ep", "")], num_select=100)
    if variant.endswith("_24ep"):
        expected = dataclasses.replace(expected, pos_temperature=20.0, pos_offset=0.0)
    assert report.config == expected and report.notes == []
    layout = detrex_layout(converted, report.config)
    assert layout.keys() == model.state_dict().keys()
    assert all(torch.equal(layout[k], v) for k, v in model.state_dict().items())
    return official_detr.load_converted(report.config, converted)


@pytest.mark.parametrize("variant", CONFIG_FILES)
def test_converted_model_matches_detrex_on_a_padded_batch(detrex, variant):
    theirs, cfg = detrex_model(detrex, variant)
    ours = convert_detrex(theirs, cfg, variant)
    images = images_0_255()
    expected = run_detrex_masked(detrex, theirs, images)
    frozen = FrozenDetector(ours)
    batch, padding, _ = frozen.preprocess([im / 255 for im in images])
    with torch.no_grad():
        got = ours(batch, padding)
    mine = {"memory": got.encoder_states[-1], "states": torch.stack(got.decoder_states),
            "logits": torch.stack(got.logits), "boxes": torch.stack(got.boxes)}
    errors = {k: (mine[k] - expected[k]).abs().max().item() for k in mine}
    print(f"{variant}: max abs error", errors)
    assert max(errors.values()) <= 1e-4, errors


def test_frozen_detector_matches_detrex_evaluation(detrex):
    """detrex's evaluation (one image at a time, 0..255 RGB, top-100 of sigmoid scores,
    boxes in pixels clipped to the image) against FrozenDetector on [0, 1] RGB."""
    theirs, cfg = detrex_model(detrex, "resnet50_4scale")
    frozen = FrozenDetector(convert_detrex(theirs, cfg, "resnet50_4scale"), top_k=100)
    for image in images_0_255():
        with torch.no_grad():
            (result,) = theirs([{"image": image}])
            out = frozen([image / 255])
        instances = result["instances"]
        h, w = image.shape[-2:]
        cx, cy, bw, bh = out.boxes[0].unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h,
                            (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        xyxy = torch.min(xyxy.clamp(min=0), torch.tensor([w, h, w, h]))
        assert len(instances) == 100 and torch.equal(instances.pred_classes, out.labels[0])
        torch.testing.assert_close(instances.scores, out.scores[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(instances.pred_boxes.tensor, xyxy, atol=1e-3, rtol=0)


def test_detectron2_checkpoint_saved_by_detrex_converts(detrex, tmp_path):
    """detectron2's own Checkpointer writes the file; the LazyConfig gives the settings."""
    theirs, cfg = detrex_model(detrex, "resnet50_4scale_24ep")
    checkpointer = importlib.import_module("detectron2.checkpoint").DetectionCheckpointer(
        theirs, save_dir=str(tmp_path))
    checkpointer.save("model_final", iteration=179999)
    ckpt = load_checkpoint(tmp_path / "model_final.pth")  # safely: weights_only
    assert ckpt.args is None
    _, report = convert_state_dict(ckpt.state_dict, args=cfg)
    assert report.ok and (report.config.pos_temperature, report.config.pos_offset) == (20.0, 0.0)
