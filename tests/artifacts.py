"""Checkpoints as their own projects write them to disk: the corpus ``convert`` is proven on.

Each writer recreates its project's save call (not its code): the dict ``torch.save`` gets,
the parameter sharing the original modules have (``state_dict()`` of a module registered
twice returns views of one storage, and ``torch.save`` keeps them so), EMA copies, DDP
prefixes, half-precision weights, ``save_pretrained`` folders. Every artifact carries the
reference it must reproduce: the model the file was written from.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import re
import sys
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import official_detr
import torch
import yaml
from weights import perturb

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import build_detector
from frozenseg.formats import dino, rt_detr
from frozenseg.formats.base import rename_key

# (images, padding True on padding) -> last decoder layer's (logits, normalised cxcywh boxes)
Reference = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Artifact:
    path: Path  # what a user passes to --detector: a file or a folder
    format: str
    reference: Reference
    config: DetectorConfig | None = None  # what the conversion must derive (None: not checked)
    prompt: str | None = None  # an open-vocabulary detector's: the reference reads it too


DINO_SMALL = DetectorConfig(
    variant="dino", query_init="mixed", box_refine=True, proposal_score="max_class",
    decoder_norm=True, ref_point_head=True, pos_temperature=20.0, pos_offset=0.0,
    inverse_sigmoid_eps=1e-3, num_select=300, hidden_dim=64, nheads=2, enc_layers=2,
    dec_layers=2, dim_feedforward=64, num_queries=30, num_classes=7, dn_labelbook_size=7,
    backbone={"name": "resnet50"}, backbone_levels=(1, 2, 3), num_feature_levels=4,
)
HEAD = re.compile(r"^(transformer\.decoder\.)?(class|bbox)_embed\.(\d+)\.(.*)$")


# --- the pieces every training script saves beside the model -------------------------------


def training_state(model: torch.nn.Module) -> tuple[dict, dict]:
    """(optimizer, lr_scheduler) state dicts after one AdamW step, as main.py saves them."""
    params = [p for p in model.parameters()][:4]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler.step()
    for p in params:
        p.grad = None
    return optimizer.state_dict(), scheduler.state_dict()


def canonical_reference(model: torch.nn.Module) -> Reference:
    def run(images, padding):
        with torch.no_grad():
            out = model(images, padding)
        return out.logits[-1], out.boxes[-1]
    return run


def tied_heads(model: torch.nn.Module) -> torch.nn.Module:
    """Every decoder layer's class and box head equal to layer 0's: the weights a model
    whose layers share one head has (DINO's default, Deformable DETR without refinement)."""
    with torch.no_grad():
        for heads in (model.class_embed, model.bbox_embed):
            for head in heads[1:]:
                head.load_state_dict(heads[0].state_dict())
    return model


def share_heads(layout: dict, *, across_layers: bool, layers: int) -> dict:
    """The sharing ``state_dict()`` of the original gives: the decoder's reference to every
    head is the head's own tensor, and with ``across_layers`` every layer < ``layers`` is
    layer 0's (``nn.ModuleList([head] * n)``)."""
    out = dict(layout)
    for key in layout:
        m = HEAD.match(key)
        if not m:
            continue
        index = 0 if across_layers and int(m[3]) < layers else int(m[3])
        source = f"{m[2]}_embed.{index}.{m[4]}"
        out[key] = out[source] if source in out else layout[key]
    return out


def converts_like_transformers(hf: torch.nn.Module, layout: dict, args: dict, format: str,
                               **official_fields):
    """An official layout written from the transformers model ``hf`` converts, with nothing
    assumed, to the config and (key by key) the canonical tensors ``hf`` converts to.
    ``official_fields``: the config fields where the official code computes otherwise than
    transformers' port. Returns the layout's conversion report."""
    from frozenseg.convert import convert_state_dict

    expected, hf_report = convert_state_dict(hf.state_dict(), args=hf.config.to_dict())
    got, report = convert_state_dict(layout, args=args)
    assert report.format == format and report.ok, report.problem()
    assert not [n for n in report.notes if "assumed" in n], report.notes
    assert report.config == dataclasses.replace(hf_report.config, **official_fields)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    return report


def on_the_transposed_grid(positions: torch.nn.Module) -> None:
    """Make a transformers AIFI position embedding (RT-DETR's, D-FINE's, DEIMv2's) compute as
    the official code does: it enumerates a h x w map's positions width-major with the
    width's frequencies first, which is transformers' table of the w x h grid."""
    build = sys.modules[type(positions).__module__].build_2d_sinusoidal_position_embedding

    def forward(width, height, device, dtype):
        return build(height=width, width=height, embed_dim=positions.embed_dim,
                     temperature=positions.temperature, device=device, dtype=dtype
                     ).unsqueeze(0)
    positions.forward = forward


def _save(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


# --- official DINO (IDEA-Research/DINO main.py) --------------------------------------------


def dino_checkpoint(folder: Path, *, shared: bool = True, ema: bool = False,
                    ddp: bool = False, half: bool = False, backbone: dict | None = None
                    ) -> Artifact:
    """``checkpoint.pth`` as DINO's main.py writes it: {'model', 'optimizer',
    'lr_scheduler', 'epoch', 'args'} (+ 'ema_model' with --use_ema). ``shared``: the
    default dec_pred_{class,bbox}_embed_share, one head for every layer. ``backbone``:
    another than ResNet-50 (FocalNet-DINO saves in DINO's layout)."""
    config = dataclasses.replace(DINO_SMALL, backbone=backbone or DINO_SMALL.backbone)
    model = perturb(build_detector(config), seed=1)
    if shared:
        tied_heads(model)
    if half:
        model.half().float()  # what a float16 save keeps
    layout = share_heads(dino.official_state_dict(model.state_dict(), config),
                         across_layers=shared, layers=config.dec_layers)
    if half:
        layout = share_heads({k: v.half() for k, v in layout.items()},
                             across_layers=shared, layers=config.dec_layers)
    optimizer, scheduler = training_state(build_detector(config))
    payload = {"model": layout, "optimizer": optimizer, "lr_scheduler": scheduler, "epoch": 11,
               "args": argparse.Namespace(**dino.official_args(config), lr=1e-4,
                                          dec_pred_class_embed_share=shared,
                                          dec_pred_bbox_embed_share=shared, use_ema=ema,
                                          output_dir="logs/DINO/R50-MS4", device="cuda")}
    reference = model
    if ema:
        reference = perturb(build_detector(config), seed=2)
        if shared:
            tied_heads(reference)
        payload["ema_model"] = share_heads(
            dino.official_state_dict(reference.state_dict(), config),
            across_layers=shared, layers=config.dec_layers)
    if ddp:  # model.state_dict() of the DistributedDataParallel wrapper
        payload["model"] = {f"module.{k}": v for k, v in payload["model"].items()}
    path = _save(payload, folder / "checkpoint0011_4scale.pth")
    return Artifact(path, "dino", canonical_reference(reference.eval()), config)


# --- official Deformable DETR and H-Deformable-DETR (main.py) -----------------------------


def deformable_detr_checkpoint(folder: Path, variant: str) -> Artifact:
    """``checkpoint.pth`` of fundamentalvision/Deformable-DETR's main.py, for its three
    model kinds: heads shared across layers without box refinement (``[head] * n``)."""
    from test_convert_deformable_detr import args_of, config_of

    config = config_of(variant)
    model = official_detr.canonical_model(config)
    layout = share_heads(official_detr.official_layout(model.state_dict(), config),
                         across_layers=not config.box_refine, layers=config.dec_layers)
    optimizer, scheduler = training_state(build_detector(config))
    path = _save({"model": layout, "optimizer": optimizer, "lr_scheduler": scheduler,
                  "epoch": 49, "args": argparse.Namespace(**args_of(config), lr=2e-4)},
                 folder / "checkpoint0049.pth")
    return Artifact(path, "deformable_detr", canonical_reference(model), config)


def h_deformable_detr_checkpoint(folder: Path, variant: str = "r50-mixed") -> Artifact:
    """H-Deformable-DETR's main.py checkpoint (two-stage, mixed selection, box refinement,
    one-to-many query rows after the one-to-one ones)."""
    from test_convert_h_deformable_detr import ONE2MANY, args_of, config_of

    config = config_of(variant)
    model = official_detr.canonical_model(config)
    extra = torch.randn(ONE2MANY, config.hidden_dim, generator=torch.Generator().manual_seed(3))
    layout = share_heads(official_detr.official_layout(model.state_dict(), config, extra),
                         across_layers=False, layers=config.dec_layers)
    optimizer, scheduler = training_state(build_detector(config))
    path = _save({"model": layout, "optimizer": optimizer, "lr_scheduler": scheduler,
                  "epoch": 11, "args": argparse.Namespace(**args_of(config))},
                 folder / "checkpoint0011.pth")
    return Artifact(path, "h_deformable_detr", canonical_reference(model), config)


# --- detrex (detectron2's DetectionCheckpointer) -------------------------------------------


def detrex_checkpoint(folder: Path, *, trainer: bool = True, ema: bool = False) -> Artifact:
    """``model_final.pth`` as detectron2's Checkpointer.save writes it in detrex's
    train_net.py: {'model', 'trainer' (its hooks, optimizer, scaler), 'iteration'}, plus
    'ema_state' with EMA on; ``trainer=False``: a released model ({'model'} only). The
    LazyConfig is saved beside it as config.yaml, with its ``_target_`` entries."""
    from test_convert_detrex import VARIANTS, detrex_layout

    config = VARIANTS["resnet50_4scale"]
    model = perturb(build_detector(config), seed=4)
    layout = share_heads(detrex_layout(model.state_dict(), config), across_layers=False,
                         layers=config.dec_layers + 1)
    payload = {"model": layout}
    if trainer:
        optimizer, _ = training_state(build_detector(config))
        payload.update(trainer={"iteration": 89999, "hooks": {"LRScheduler": {}},
                                "optimizer": optimizer}, iteration=89999)
    reference = model
    if ema:
        reference = perturb(build_detector(config), seed=5)
        payload["ema_state"] = detrex_layout(reference.state_dict(), config)
    path = _save(payload, folder / "model_final.pth")
    lazy_config = {"model": {
        "_target_": "projects.dino.modeling.DINO",
        "transformer": {"encoder": {"num_heads": 8, "_target_": "DINOTransformerEncoder"}},
        "position_embedding": {"_target_": "detrex.layers.PositionEmbeddingSine",
                               "temperature": 10000, "offset": -0.5, "normalize": True}},
        "train": {"output_dir": "./output/dino_r50_4scale_12ep", "max_iter": 90000}}
    (folder / "config.yaml").write_text(yaml.safe_dump(lazy_config))
    return Artifact(path, "detrex_dino", canonical_reference(reference.eval()), config)


# --- Hugging Face transformers ---------------------------------------------------------------


def huggingface_reference(folder: Path, architecture: str = "DeformableDetrForObjectDetection"
                          ) -> Reference:
    """transformers itself, reading back the folder it wrote."""
    import transformers

    model = getattr(transformers, architecture).from_pretrained(folder).eval()

    def run(images, padding):
        with torch.no_grad():
            out = model(pixel_values=images, pixel_mask=(~padding).long())
        return out.logits, out.pred_boxes
    return run


def huggingface_folder(folder: Path, variant: str, *, shards: bool = False) -> Artifact:
    """``save_pretrained`` of the installed transformers: model.safetensors + config.json,
    or (``shards``) model-0000k-of-n.safetensors + model.safetensors.index.json."""
    from test_convert_huggingface import VARIANTS, random_hf_model

    model, _ = random_hf_model(**VARIANTS[variant])
    model.save_pretrained(folder, **({"max_shard_size": "2MB"} if shards else {}))
    return Artifact(folder, "huggingface", huggingface_reference(folder))


def huggingface_v4_hub_file(folder: Path) -> Artifact:
    """A transformers 4 hub folder: pytorch_model.bin in v4 names without the weights tied
    to others (v4 saved neither the per-layer copies of a shared head nor the decoder's
    references), and config.json."""
    from test_convert_huggingface import VARIANTS, random_hf_model, to_v4_hub_names

    model, _ = random_hf_model(**VARIANTS["box-refine"])
    model.save_pretrained(folder)  # config.json, and the reference transformers reads back
    reference = huggingface_reference(folder)
    (folder / "model.safetensors").unlink()
    state_dict = {k: v for k, v in to_v4_hub_names(model.state_dict()).items()
                  if not k.startswith("model.decoder.bbox_embed.")}
    torch.save(state_dict, folder / "pytorch_model.bin")
    return Artifact(folder, "huggingface", reference)


def rt_detr_folder(folder: Path, variant: str) -> Artifact:
    """``save_pretrained`` of a transformers RTDetr(V2)ForObjectDetection: model.safetensors
    (its old key names, v2's tied heads once) + config.json."""
    from test_convert_rt_detr import VARIANTS, random_hf_model

    model, _ = random_hf_model(**VARIANTS[variant])
    model.save_pretrained(folder)
    return Artifact(folder, "huggingface_rt_detr",
                    huggingface_reference(folder, type(model).__name__))


def detr_folder(folder: Path, variant: str) -> Artifact:
    """``save_pretrained`` of a transformers Detr-, ConditionalDetr- or DabDetrForObjectDetection:
    model.safetensors (its old key names; DAB-DETR's tied refinement head once) + config.json."""
    from test_convert_detr import VARIANTS, random_hf_model

    model, _ = random_hf_model(**VARIANTS[variant])
    model.save_pretrained(folder)
    return Artifact(folder, f"huggingface_{VARIANTS[variant]['variant']}",
                    huggingface_reference(folder, type(model).__name__))


# --- official DETR (facebookresearch/detr main.py) ------------------------------------------

ATTENTION = re.compile(r"^(transformer\.(?:encoder|decoder)\.layers\.\d+\.)(self_attn|cross_attn)"
                       r"\.([qkv])_proj\.(weight|bias)$")


def detr_official_layout(state_dict: dict, variant: str = "detr") -> dict:
    """A converted plain DETR's state dict in the official names: torchvision's ResNet under
    ``backbone.0.body.``, nn.MultiheadAttention's stacked ``in_proj``; DETR's cross-attention
    ``multihead_attn`` (Conditional DETR's decoder has the plain model's names already)."""
    out, stacks = {}, {}
    cross = "multihead_attn" if variant == "detr" else "cross_attn"
    for key, tensor in state_dict.items():
        if m := ATTENTION.match(key):
            name = m[1] + (cross if m[2] == "cross_attn" else m[2])
            stacks.setdefault(f"{name}.in_proj_{m[4]}", {})[m[3]] = tensor
        else:
            out[re.sub(r"^backbone\.", "backbone.0.body.", key)] = tensor
    for key, parts in stacks.items():
        out[key] = torch.cat([parts[p] for p in "qkv"])
    if variant == "dab_detr":  # bbox_embed is also the decoder's (one module, saved twice)
        out.update({f"transformer.decoder.{k}": v for k, v in out.items()
                    if k.startswith("bbox_embed.")})
    return {re.sub(r"^patterns\.", "transformer.patterns.",
                   k.replace(".cross_attn.", f".{cross}.")): v for k, v in out.items()}


def detr_official_checkpoint(folder: Path, variant: str = "detr", **settings) -> Artifact:
    """``checkpoint.pth`` of DETR's (Conditional DETR's, DAB-DETR's) main.py: {model,
    optimizer, lr_scheduler, epoch, args}, from a random transformers model (the reference:
    transformers running it)."""
    from test_convert_detr import random_hf_model

    from frozenseg.convert import convert_state_dict

    hf, config_json = random_hf_model(variant, **settings)
    canonical, report = convert_state_dict(hf.state_dict(), args=config_json)
    optimizer, scheduler = training_state(build_detector(report.config))
    dab = {"pe_temperatureH": 20, "pe_temperatureW": 20, "transformer_activation": "prelu",
           "num_patterns": report.config.num_patterns, "query_scale_type": "cond_elewise",
           "modulate_hw_attn": True, "iter_update": True} if variant == "dab_detr" else {}
    args = argparse.Namespace(hidden_dim=64, nheads=2, enc_layers=2, dec_layers=2,
                              dim_feedforward=48, num_queries=12, position_embedding="sine",
                              dilation=False, pre_norm=False, masks=False, lr=1e-4, **dab)
    path = _save({"model": detr_official_layout(canonical, variant), "optimizer": optimizer,
                  "lr_scheduler": scheduler, "epoch": 49, "args": args},
                 folder / "checkpoint.pth")

    def run(images, padding):
        with torch.no_grad():
            out = hf(pixel_values=images, pixel_mask=(~padding).long())
        return out.logits, out.pred_boxes
    return Artifact(path, variant, run, report.config)
def d_fine_folder(folder: Path, variant: str, family: str = "d_fine") -> Artifact:
    """``save_pretrained`` of a transformers DFineForObjectDetection (D-FINE, DEIM):
    model.safetensors (old key names, the decoder's heads once) + config.json; or of a
    Deimv2ForObjectDetection (``family="deimv2"``: in-memory names, a shared box head once)."""
    import importlib

    tests = importlib.import_module(f"test_convert_{family}")
    model, _ = tests.random_hf_model(**tests.VARIANTS[variant])
    model.save_pretrained(folder)  # DEIMv2 with DINOv3 (``family="deimv2_dinov3"``) too
    if family == "d_fine":
        return Artifact(folder, "huggingface_d_fine",
                        huggingface_reference(folder, type(model).__name__))

    # transformers 5.25 reads a DEIMv2 folder with a shared box head back with that head
    # re-initialised (the file holds it once, under the last layer's index): the reference
    # is the model the folder was written from.
    def run(images, padding):
        with torch.no_grad():
            out = model(pixel_values=images, pixel_mask=(~padding).long())
        return out.logits, out.pred_boxes
    return Artifact(folder, "huggingface_deimv2", run)

def grounding_dino_folder(folder: Path) -> Artifact:
    """``save_pretrained`` of a transformers GroundingDinoForObjectDetection and of its
    GroundingDinoProcessor into one folder (model.safetensors, config.json, tokenizer.json,
    tokenizer_config.json, processor_config.json)."""
    import transformers
    from test_convert_grounding_dino import PROMPT, grounding_folder

    model, processor = grounding_folder(folder)
    model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder).eval()
    text = processor.tokenizer(PROMPT, return_tensors="pt")

    def run(images, padding):
        with torch.no_grad():
            out = model(pixel_values=images, pixel_mask=(~padding).long(),
                        **{k: v.expand(len(images), -1) for k, v in text.items()})
        return out.logits, out.pred_boxes
    return Artifact(folder, "huggingface_grounding_dino", run, prompt=PROMPT)



# --- official Grounding DINO (IDEA-Research/GroundingDINO) ----------------------------------

_HF_BLOCK = r"^model\.backbone\.model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_BLOCK = r"backbone.0.layers.\1.blocks.\2."
_HF_ENC, _HF_DEC = r"^model\.encoder\.layers\.(\d+)\.", r"^model\.decoder\.layers\.(\d+)\."
_TEXT, _FUSION = r"transformer.encoder.text_layers.\1.", r"transformer.encoder.fusion_layers.\1."
_ENC, _DEC = r"transformer.encoder.layers.\1.", r"transformer.decoder.layers.\1."
# transformers' saved GroundingDino names -> the official modules' (transformers'
# convert_grounding_dino_to_hf.py, read backwards), first matching rule.
GROUNDING_DINO_OFFICIAL = [
    (r"^model\.backbone\.model\.embeddings\.patch_embeddings\.projection\.",
     "backbone.0.patch_embed.proj."),
    (r"^model\.backbone\.model\.embeddings\.norm\.", "backbone.0.patch_embed.norm."),
    (_HF_BLOCK + r"layernorm_before\.", _BLOCK + "norm1."),
    (_HF_BLOCK + r"layernorm_after\.", _BLOCK + "norm2."),
    (_HF_BLOCK + r"attention\.output\.dense\.", _BLOCK + "attn.proj."),
    (_HF_BLOCK + r"attention\.self\.", _BLOCK + "attn."),
    (_HF_BLOCK + r"intermediate\.dense\.", _BLOCK + "mlp.fc1."),
    (_HF_BLOCK + r"output\.dense\.", _BLOCK + "mlp.fc2."),
    (r"^model\.backbone\.model\.encoder\.layers\.(\d+)\.downsample\.",
     r"backbone.0.layers.\1.downsample."),
    (r"^model\.backbone\.model\.hidden_states_norms\.stage(\d)\.",
     lambda m: f"backbone.0.norm{int(m[1]) - 1}."),
    (r"^model\.text_backbone\.", "bert."),
    (r"^model\.text_projection\.", "feat_map."),
    (r"^model\.input_proj_vision\.", "input_proj."),
    (_HF_ENC + r"text_enhancer_layer\.layer_norm_before\.", _TEXT + "norm1."),
    (_HF_ENC + r"text_enhancer_layer\.layer_norm_after\.", _TEXT + "norm2."),
    (_HF_ENC + r"text_enhancer_layer\.fc([12])\.", _TEXT + r"linear\2."),
    (_HF_ENC + r"text_enhancer_layer\.", _TEXT),
    (_HF_ENC + r"fusion_layer\.vision_param$", _FUSION + "gamma_v"),
    (_HF_ENC + r"fusion_layer\.text_param$", _FUSION + "gamma_l"),
    (_HF_ENC + r"fusion_layer\.layer_norm_vision\.", _FUSION + "layer_norm_v."),
    (_HF_ENC + r"fusion_layer\.layer_norm_text\.", _FUSION + "layer_norm_l."),
    (_HF_ENC + r"fusion_layer\.attn\.(values_|out_)?vision_proj\.", _FUSION + r"attn.\2v_proj."),
    (_HF_ENC + r"fusion_layer\.attn\.(values_|out_)?text_proj\.", _FUSION + r"attn.\2l_proj."),
    (_HF_ENC + r"deformable_layer\.self_attn_layer_norm\.", _ENC + "norm1."),
    (_HF_ENC + r"deformable_layer\.final_layer_norm\.", _ENC + "norm2."),
    (_HF_ENC + r"deformable_layer\.fc([12])\.", _ENC + r"linear\2."),
    (_HF_ENC + r"deformable_layer\.", _ENC),
    (_HF_DEC + r"encoder_attn_layer_norm\.", _DEC + "norm1."),
    (_HF_DEC + r"self_attn_layer_norm\.", _DEC + "norm2."),
    (_HF_DEC + r"final_layer_norm\.", _DEC + "norm3."),
    (_HF_DEC + r"encoder_attn_text_layer_norm\.", _DEC + "catext_norm."),
    (_HF_DEC + r"encoder_attn_text\.", _DEC + "ca_text."),
    (_HF_DEC + r"encoder_attn\.", _DEC + "cross_attn."),
    (_HF_DEC + r"fc([12])\.", _DEC + r"linear\2."),
    (_HF_DEC, _DEC),
    (r"^model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"^model\.decoder\.bbox_embed\.", "transformer.decoder.bbox_embed."),
    (r"^model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."),
    (r"^model\.query_position_embeddings\.", "transformer.tgt_embed."),
    (r"^model\.(enc_output|enc_output_norm|level_embed)\b", r"transformer.\1"),
]
# separate q, k, v -> the official stacked ones: Swin's qkv, nn.MultiheadAttention's in_proj
_STACKED = [(re.compile(r"^(backbone\.0\..*\.attn)\.(query|key|value)\.(weight|bias)$"),
             "{}.qkv.{}"),
            (re.compile(r"^(transformer\..*\.(?:self_attn|ca_text))\.(query|key|value)\."
                        r"(weight|bias)$"), "{}.in_proj_{}")]


def grounding_dino_official_layout(hf_state_dict: dict) -> dict:
    """A transformers GroundingDino state dict in the official model's keys, with what the
    official modules also save: each Swin block's relative_position_index, BERT's pooler and
    (older transformers) position_ids buffer; transformers' Swin's final norm, which the
    official backbone does not have, left out. Tied tensors stay tied (the box heads)."""
    from frozenseg.detector.backbones.swin import relative_position_index
    from frozenseg.formats.grounding_dino import SWIN_UNUSED, _saved_names

    out, stacked = {}, collections.defaultdict(dict)
    for key, tensor in _saved_names(hf_state_dict).items():
        if SWIN_UNUSED.match(key):
            continue
        key = rename_key(key, GROUNDING_DINO_OFFICIAL) or key
        for pattern, target in _STACKED:
            if m := pattern.match(key):
                stacked[target.format(m[1], m[3])][m[2]] = tensor
                break
        else:
            out[key] = tensor
    for key, parts in stacked.items():
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    for key, table in list(out.items()):
        if key.endswith(".attn.relative_position_bias_table"):
            index = relative_position_index((math.isqrt(table.shape[0]) + 1) // 2)
            out[key.replace("_bias_table", "_index")] = index
    width = out["bert.embeddings.word_embeddings.weight"].shape[1]
    positions = out["bert.embeddings.position_embeddings.weight"].shape[0]
    pooler = torch.nn.Linear(width, width)
    out.update({"bert.embeddings.position_ids": torch.arange(positions)[None],
                "bert.pooler.dense.weight": pooler.weight.detach(),
                "bert.pooler.dense.bias": pooler.bias.detach()})
    return out


# GroundingDINO_SwinT_OGC.py as released, its model sizes replaced by the tiny model's.
GROUNDING_DINO_CONFIG = dict(
    batch_size=1, modelname="groundingdino", backbone="swin_T_224_1k",
    position_embedding="sine", pe_temperatureH=20, pe_temperatureW=20,
    return_interm_indices=[1, 2, 3], backbone_freeze_keywords=None, enc_layers=2,
    dec_layers=2, pre_norm=False, dim_feedforward=64, hidden_dim=64, dropout=0.0, nheads=8,
    num_queries=20, query_dim=4, num_patterns=0, num_feature_levels=4, enc_n_points=4,
    dec_n_points=4, two_stage_type="standard", two_stage_bbox_embed_share=False,
    two_stage_class_embed_share=False, transformer_activation="relu",
    dec_pred_bbox_embed_share=True, dn_box_noise_scale=1.0, dn_label_noise_ratio=0.5,
    dn_label_coef=1.0, dn_bbox_coef=1.0, embed_init_tgt=True, dn_labelbook_size=2000,
    max_text_len=256, text_encoder_type="bert-base-uncased", use_text_enhancer=True,
    use_fusion_layer=True, use_checkpoint=True, use_transformer_ckpt=True,
    use_text_cross_attention=True, text_dropout=0.0, fusion_dropout=0.0, fusion_droppath=0.1,
    sub_sentence_present=True,
)


def grounding_dino_official_config(settings: dict = GROUNDING_DINO_CONFIG) -> str:
    """The config file's text, one ``name = value`` a line as the official ones are."""
    return "".join(f"{name} = {value!r}\n" for name, value in settings.items())


def grounding_dino_official_checkpoint(folder: Path, *, released: bool = False) -> Artifact:
    """What a DETR-style training run of the official model saves (``{model, optimizer,
    lr_scheduler, epoch, args}``, args an argparse Namespace holding the config's settings
    and the command line's), or a released ``{model}`` file beside its config; written from
    a random transformers model (its keys by the inverse of transformers' mapping), with
    bert-base-uncased's tokenizer files as the hub has them (vocab.txt and a
    tokenizer_config.json naming no class) beside it."""
    import transformers
    from test_convert_grounding_dino import PROMPT, tiny_vocab
    from test_convert_grounding_dino_official import official_size_model

    model = official_size_model()
    layout = grounding_dino_official_layout(model.state_dict())
    if released:
        payload = {"model": layout}
        (folder / "GroundingDINO_SwinT_OGC.py").parent.mkdir(parents=True, exist_ok=True)
        (folder / "GroundingDINO_SwinT_OGC.py").write_text(grounding_dino_official_config())
    else:
        optimizer, scheduler = training_state(torch.nn.Linear(4, 4))
        args = argparse.Namespace(config_file="config/cfg_odvg.py", output_dir="logs/gdino",
                                  device="cuda", seed=42, lr=1e-4, world_size=8,
                                  **GROUNDING_DINO_CONFIG)
        payload = {"model": layout, "optimizer": optimizer, "lr_scheduler": scheduler,
                   "epoch": 3, "args": args}
    name = "groundingdino_swint_ogc.pth" if released else "checkpoint0003.pth"
    path = _save(payload, folder / name)
    tokenizer = transformers.BertTokenizer(vocab=tiny_vocab(folder))
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true, '
                                                  '"model_max_length": 512}')
    text = tokenizer(PROMPT, return_tensors="pt")

    def run(images, padding):
        with torch.no_grad():
            out = model(pixel_values=images, pixel_mask=(~padding).long(),
                        **{k: v.expand(len(images), -1) for k, v in text.items()})
        return out.logits, out.pred_boxes
    return Artifact(path, "grounding_dino", run, prompt=PROMPT)


def lw_detr_folder(folder: Path, variant: str) -> Artifact:
    """``save_pretrained`` of a transformers LwDetrForObjectDetection (its ViT attention
    under the old names) or RfDetrForObjectDetection (Roboflow's own key layout) +
    config.json, group DETR's training groups included."""
    from test_convert_lw_detr import VARIANTS, random_hf_model

    model, _ = random_hf_model(**VARIANTS[variant])
    model.save_pretrained(folder)
    return Artifact(folder, "huggingface_lw_detr",
                    huggingface_reference(folder, type(model).__name__))


# --- official RF-DETR (roboflow/rf-detr's main.py) ------------------------------------------

def rf_detr_official_args(config: dict) -> argparse.Namespace:
    """The training arguments RF-DETR's main.py saves, for a transformers RF-DETR config."""
    bb = config["backbone_config"]
    return argparse.Namespace(
        encoder="dinov2_windowed_small", out_feature_indexes=bb["out_indices"],
        num_windows=bb["num_windows"], dec_layers=config["decoder_layers"], two_stage=True,
        projector_scale=["P4"], hidden_dim=config["d_model"], patch_size=bb["patch_size"],
        sa_nheads=config["decoder_self_attention_heads"],
        ca_nheads=config["decoder_cross_attention_heads"],
        dec_n_points=config["decoder_n_points"], bbox_reparam=True, lite_refpoint_refine=True,
        layer_norm=True, num_classes=len(config["id2label"]), resolution=64,
        group_detr=config["group_detr"], num_queries=config["num_queries"], num_select=12,
        positional_encoding_size=6, segmentation_head=False, use_ema=True, lr=1e-4,
        output_dir=Path("output"), class_names=[f"class {i}" for i in range(5)])


def rf_detr_official_checkpoint(folder: Path, *, released: bool = False) -> Artifact:
    """What RF-DETR's main.py saves (``{'model', 'optimizer', 'lr_scheduler', 'epoch',
    'args', 'ema_model'}``), or a released file (``{'model', 'args'}``): the keys as its
    modules name them, which is the layout transformers' save_pretrained writes (read back
    from a saved folder). DINOv2's heads are 64 channels wide, as RF-DETR's configs have them."""
    from safetensors.torch import load_file
    from test_convert_lw_detr import random_hf_model

    def official(seed: int):
        model, config = random_hf_model(family="rf", windows=2, out_indices=[1, 2, 3],
                                        hidden_size=128, num_attention_heads=2)
        if seed:
            perturb(model, seed=seed)
        model.save_pretrained(folder / f"hf{seed}")
        return model, config, load_file(folder / f"hf{seed}" / "model.safetensors")

    reference, config, layout = official(0)
    payload = {"model": layout, "args": rf_detr_official_args(config)}
    if not released:
        _, _, trained = official(4)
        optimizer, scheduler = training_state(torch.nn.Linear(4, 4))
        payload.update(model=trained, ema_model=layout, optimizer=optimizer,
                       lr_scheduler=scheduler, epoch=11)
    path = _save(payload, folder / ("rf-detr-base.pth" if released else "checkpoint.pth"))
    for seed in (0, 4):
        for file in (folder / f"hf{seed}").glob("*"):
            file.unlink()
        if (folder / f"hf{seed}").exists():
            (folder / f"hf{seed}").rmdir()

    def run(images, padding):
        with torch.no_grad():
            out = reference(pixel_values=images, pixel_mask=(~padding).long())
        return out.logits, out.pred_boxes
    return Artifact(path, "huggingface_lw_detr", run)

# --- official LW-DETR (Atten4Vis/LW-DETR's main.py) -----------------------------------------

# transformers' in-memory LwDetr name -> the official module's (models/backbone/vit.py,
# projector.py, transformer.py, lwdetr.py), first matching rule.
_LW_VIT = r"^model\.backbone\.backbone\."
_LW_BLOCK = _LW_VIT + r"encoder\.layer\.(\d+)\."
_LW_LEVEL = r"^model\.backbone\.projector\.scale_layers\.(\d+)\."
_LW_DEC = r"^model\.decoder\.layers\.(\d+)\."
LW_DETR_OFFICIAL = [
    (_LW_VIT + r"embeddings\.position_embeddings$", "backbone.0.encoder.pos_embed"),
    (_LW_VIT + r"embeddings\.projection\.", "backbone.0.encoder.patch_embed.proj."),
    (_LW_BLOCK + r"layernorm_before\.", r"backbone.0.encoder.blocks.\1.norm1."),
    (_LW_BLOCK + r"layernorm_after\.", r"backbone.0.encoder.blocks.\1.norm2."),
    (_LW_BLOCK + r"attention\.o_proj\.", r"backbone.0.encoder.blocks.\1.attn.proj."),
    (_LW_BLOCK + r"attention\.q_proj\.bias$", r"backbone.0.encoder.blocks.\1.attn.q_bias"),
    (_LW_BLOCK + r"attention\.v_proj\.bias$", r"backbone.0.encoder.blocks.\1.attn.v_bias"),
    (_LW_BLOCK + r"attention\.", r"backbone.0.encoder.blocks.\1.attn."),
    (_LW_BLOCK + r"intermediate\.", r"backbone.0.encoder.blocks.\1.mlp."),
    (_LW_BLOCK, r"backbone.0.encoder.blocks.\1."),
    (_LW_LEVEL + r"sampling_layers\.(\d+)\.layers\.",
     r"backbone.0.projector.stages_sampling.\1.\2."),
    (_LW_LEVEL + r"projector_layer\.bottlenecks\.(\d+)\.conv([12])\.",
     r"backbone.0.projector.stages.\1.0.m.\2.cv\3."),
    (_LW_LEVEL + r"projector_layer\.conv([12])\.", r"backbone.0.projector.stages.\1.0.cv\2."),
    (_LW_LEVEL + r"layer_norm\.", r"backbone.0.projector.stages.\1.1."),
    (_LW_DEC + r"self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (_LW_DEC + r"cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (_LW_DEC + r"layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (_LW_DEC + r"mlp\.fc([12])\.", r"transformer.decoder.layers.\1.linear\2."),
    (_LW_DEC + r"self_attn\.o_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (_LW_DEC, r"transformer.decoder.layers.\1."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.", "transformer.decoder."),
    (r"^model\.(enc_output|enc_output_norm|enc_out_class_embed|enc_out_bbox_embed)\.",
     r"transformer.\1."),
    (r"^model\.reference_point_embed\.", "refpoint_embed."),
    (r"^model\.query_feat\.", "query_feat."),
]
# separate q, k, v -> the ViT's stacked qkv (no bias: CAE's q_bias / v_bias stand apart) and
# nn.MultiheadAttention's in_proj
_LW_STACKED = [(re.compile(r"^(backbone\.0\.encoder\.blocks\.\d+\.attn)\.([qkv])_proj\.weight$"),
                "{}.qkv.weight"),
               (re.compile(r"^(transformer\.decoder\.layers\.\d+\.self_attn)\.([qkv])_proj\."
                           r"(weight|bias)$"), "{}.in_proj_{}")]


def lw_detr_official_layout(hf_state_dict: dict) -> dict:
    """A transformers LwDetr state dict in the official model's keys (ConvX's batch norm is
    ``bn``)."""
    out, stacked = {}, collections.defaultdict(dict)
    for key, tensor in hf_state_dict.items():
        key = rename_key(key, LW_DETR_OFFICIAL) or key
        if key.startswith("backbone.0.projector."):
            key = key.replace(".norm.", ".bn.")
        for pattern, target in _LW_STACKED:
            if m := pattern.match(key):
                stacked[target.format(m[1], *m.groups()[2:])][m[2]] = tensor
                break
        else:
            out[key] = tensor
    for key, parts in stacked.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def lw_detr_official_model(scales=(2.0, 0.5), out_indices=(1, 3, 4), seed: int = 0):
    """A random transformers LwDetr the official code could build: 12 ViT heads and 16
    windows (both fixed there), the last ViT block an output (asserted there)."""
    from test_convert_lw_detr import random_hf_model

    model, config = random_hf_model(family="lw", scales=scales, windows=16,
                                    out_indices=out_indices, num_attention_heads=12)
    return (perturb(model, seed=seed) if seed else model), config


def lw_detr_official_args(config: dict, **overrides) -> argparse.Namespace:
    """What LW-DETR's main.py saves as ``args`` for a model of transformers' ``config``."""
    bb = config["backbone_config"]
    levels = {2.0: "P3", 1.0: "P4", 0.5: "P5"}
    args = dict(
        lr=1e-4, lr_encoder=1.5e-4, batch_size=4, weight_decay=1e-4, epochs=60, lr_drop=60,
        lr_vit_layer_decay=0.8, lr_component_decay=0.7, dropout=0, drop_path=0,
        pretrained_encoder="pretrain_weights/caev2_tiny_300e_objects365.pth",
        encoder="vit_tiny", vit_encoder_num_layers=bb["num_hidden_layers"],
        window_block_indexes=list(bb["window_block_indices"]),
        out_feature_indexes=[i - 1 for i in bb["out_indices"]], position_embedding="sine",
        dec_layers=config["decoder_layers"], dim_feedforward=config["decoder_ffn_dim"],
        hidden_dim=config["d_model"], sa_nheads=config["decoder_self_attention_heads"],
        ca_nheads=config["decoder_cross_attention_heads"], num_queries=config["num_queries"],
        group_detr=config["group_detr"], two_stage=True,
        projector_scale=[levels[s] for s in config["projector_scale_factors"]],
        lite_refpoint_refine=True, num_select=100, dec_n_points=config["decoder_n_points"],
        decoder_norm="LN", bbox_reparam=True, aux_loss=True, ia_bce_loss=True,
        dataset_file="coco", square_resize_div_64=True, output_dir="output/lwdetr_tiny_coco",
        use_ema=True, ema_decay=0.9997, device="cuda", seed=42, resume="", eval=False,
        world_size=8, distributed=True)
    return argparse.Namespace(**{**args, **overrides})


def lw_detr_official_checkpoint(folder: Path, *, released: bool = False,
                                scales=(2.0, 0.5)) -> Artifact:
    """What LW-DETR's main.py saves each epoch (``{'model', 'optimizer', 'lr_scheduler',
    'epoch', 'args', 'ema_model'}``, the EMA copy the one evaluated) or a released file
    (``LWDETR_*_60e_coco.pth``: ``{'model', 'args'}``), written from a random transformers
    LwDetr by the inverse of the official -> transformers mapping."""
    reference, config = lw_detr_official_model(scales)
    layout = lw_detr_official_layout(reference.state_dict())
    payload = {"model": layout, "args": lw_detr_official_args(config)}
    if not released:
        trained, _ = lw_detr_official_model(scales, seed=4)
        optimizer, scheduler = training_state(torch.nn.Linear(4, 4))
        payload.update(model=lw_detr_official_layout(trained.state_dict()), ema_model=layout,
                       optimizer=optimizer, lr_scheduler=scheduler, epoch=3)
    name = "LWDETR_tiny_60e_coco.pth" if released else "checkpoint.pth"
    path = _save(payload, folder / name)

    def run(images, padding):
        with torch.no_grad():
            out = reference(pixel_values=images, pixel_mask=(~padding).long())
        return out.logits, out.pred_boxes
    return Artifact(path, "lw_detr", run)


# --- official D-FINE / DEIM (Peterande/D-FINE's and ShihuaHuang95/DEIM's solver) -----------

def _d_fine_backbone(m: re.Match) -> str:
    key = re.sub(r"^embedder\.", "stem.", m[1])
    key = re.sub(r"^encoder\.stages\.", "stages.", key)
    key = re.sub(r"(^|\.)convolution\.", r"\1conv.", key)
    return "backbone." + re.sub(r"(^|\.)normalization\.", r"\1bn.", key)


# transformers' saved D-FINE names -> the official modules' (HGNetv2, HybridEncoder with
# RepNCSPELAN4 cv1..cv4 and SCDown, DFINETransformer), first matching rule.
D_FINE_OFFICIAL = [
    (r"^model\.backbone\.model\.(.*)$", _d_fine_backbone),
    (r"^model\.(encoder|decoder)_input_proj\.(\d+)\.0\.", r"\1.input_proj.\2.conv."),
    (r"^model\.(encoder|decoder)_input_proj\.(\d+)\.1\.", r"\1.input_proj.\2.norm."),
    (r"^model\.encoder\.encoder\.(\d+)\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"encoder.encoder.\1.layers.\2.norm1."),
    (r"^model\.encoder\.encoder\.(\d+)\.layers\.(\d+)\.final_layer_norm\.",
     r"encoder.encoder.\1.layers.\2.norm2."),
    (r"^model\.encoder\.encoder\.(\d+)\.layers\.(\d+)\.fc([12])\.",
     r"encoder.encoder.\1.layers.\2.linear\3."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv1\.", r"encoder.\1_blocks.\2.cv1."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.csp_rep1\.", r"encoder.\1_blocks.\2.cv2.0."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv2\.", r"encoder.\1_blocks.\2.cv2.1."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.csp_rep2\.", r"encoder.\1_blocks.\2.cv3.0."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv3\.", r"encoder.\1_blocks.\2.cv3.1."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv4\.", r"encoder.\1_blocks.\2.cv4."),
    (r"^model\.encoder\.downsample_convs\.(\d+)\.conv([12])\.",
     r"encoder.downsample_convs.\1.0.cv\2."),
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"decoder.decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.decoder.layers.\1.norm3."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.decoder.layers.\1.cross_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.fc([12])\.", r"decoder.decoder.layers.\1.linear\2."),
    (r"^model\.decoder\.(layers|lqe_layers)\.", r"decoder.decoder.\1."),
    (r"^model\.decoder\.class_embed\.", "decoder.dec_score_head."),
    (r"^model\.decoder\.bbox_embed\.", "decoder.dec_bbox_head."),
    (r"^model\.decoder\.", "decoder."),
    (r"^model\.enc_output\.0\.", "decoder.enc_output.proj."),
    (r"^model\.enc_output\.1\.", "decoder.enc_output.norm."),
    (r"^model\.weight_embedding\.", "decoder.tgt_embed."),
    (r"^model\.", "decoder."),
]
QKV_SPLIT = re.compile(r"^(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$")


def d_fine_official_layout(hf_state_dict: dict) -> dict:
    """A transformers D-FINE state dict in the official solver's keys: q, k, v stacked into
    ``in_proj``, the FDR constants also under ``decoder.decoder`` (the decoder registers the
    transformer's parameters again), the backbone's batch-norm counters, and the anchors of
    eval_spatial_size; the top-level copies of the heads dropped (the official model has
    them once)."""
    from frozenseg.formats.base import substitute_keys
    from frozenseg.formats.d_fine import IN_MEMORY

    out, qkv = {}, collections.defaultdict(dict)
    for key, tensor in substitute_keys(hf_state_dict, IN_MEMORY).items():
        if key.startswith(("class_embed.", "bbox_embed.")):
            continue
        key = rename_key(key, D_FINE_OFFICIAL) or key
        if m := QKV_SPLIT.match(key):
            qkv[f"{m[1]}.in_proj_{m[3]}"][m[2]] = tensor
            continue
        out[key] = tensor
        if key.startswith("backbone.") and key.endswith("running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for name in ("up", "reg_scale"):
        out[f"decoder.decoder.{name}"] = out[f"decoder.{name}"]
    out["decoder.anchors"], out["decoder.valid_mask"] = torch.zeros(1, 8400, 4), torch.ones(
        1, 8400, 1, dtype=torch.bool)
    return out


def d_fine_official_yaml(args: dict, family: str = "D-FINE") -> dict:
    """The YAML sections of the config a transformers D-FINE ``args`` (config.json) was
    made from, as D-FINE's (and DEIM's) configs spell them; DEIM's ``mlp_act`` is its
    ``activation`` (both SiLU in its released configs: the model was made with
    ``test_convert_d_fine.DEIM``)."""
    levels = args["num_feature_levels"]
    return {
        "model": "DEIM" if family == "DEIM" else "DFINE",
        "HGNetv2": {"name": "B0", "use_lab": True, "return_idx": [1, 2, 3][3 - levels:]},
        "HybridEncoder": {"hidden_dim": args["encoder_hidden_dim"],
                          "use_encoder_idx": args["encode_proj_layers"],
                          "nhead": args["encoder_attention_heads"],
                          "dim_feedforward": args["encoder_ffn_dim"],
                          "enc_act": "gelu", "act": "silu", "pe_temperature": 10000,
                          "expansion": args["hidden_expansion"],
                          "depth_mult": args["depth_mult"]},
        "DFINETransformer": {"hidden_dim": args["d_model"], "num_levels": levels,
                             "num_layers": args["decoder_layers"], "eval_idx": -1,
                             "num_queries": args["num_queries"],
                             "nhead": args["decoder_attention_heads"],
                             "num_points": [args["decoder_n_points"]] * levels
                             if isinstance(args["decoder_n_points"], int)
                             else args["decoder_n_points"],
                             "reg_max": args["max_num_bins"], "reg_scale": args["reg_scale"],
                             "activation": args["decoder_activation_function"],
                             **({"mlp_act": args["decoder_activation_function"]}
                                if family == "DEIM" else {}),
                             "cross_attn_method": "default",
                             "query_select_method": "default"},
    }


def d_fine_official_checkpoint(folder: Path, variant: str = "s", *, family: str = "D-FINE",
                               released: bool = False) -> Artifact:
    """What D-FINE's (DEIM's) solver saves (``{'date', 'last_epoch', 'model', 'ema':
    {'module', 'updates'}, 'optimizer', 'lr_scheduler'}``), or a released file (``{'model'}``
    only), written from a random transformers model, with its YAML config beside it. The
    model runs AIFI's positions on the official code's transposed grid."""
    from test_convert_d_fine import DEIM, VARIANTS, random_hf_model

    activations = DEIM if family == "DEIM" else {}
    hf, args = random_hf_model(**VARIANTS[variant], **activations)
    for aifi in hf.model.encoder.aifi:
        on_the_transposed_grid(aifi.position_embedding)
    layout = d_fine_official_layout(hf.state_dict())
    if released:
        payload = {"model": layout}
    else:
        other, _ = random_hf_model(**VARIANTS[variant], **activations)
        optimizer, scheduler = training_state(torch.nn.Linear(4, 4))
        payload = {"date": "2024-10-18T12:00:00", "last_epoch": 71, "optimizer": optimizer,
                   "lr_scheduler": scheduler, "ema": {"module": layout, "updates": 5000},
                   "model": d_fine_official_layout(perturb(other, seed=3).state_dict())}
    path = _save(payload, folder / ("dfine_hgnetv2_s_coco.pth" if released else "last.pth"))
    (folder / "config.yaml").write_text(yaml.safe_dump(d_fine_official_yaml(args, family)))

    def run(images, padding):
        with torch.no_grad():
            out = hf(pixel_values=images)
        return out.logits, out.pred_boxes
    return Artifact(path, "d_fine", run)

# --- official DEIMv2 (Intellindust-AI-Lab/DEIMv2's solver) ---------------------------------

_V2_VIT = r"^model\.conv_encoder\.backbone\."
_V2_BLOCK = _V2_VIT + r"model\.layer\.(\d+)\."
_V2_ADAPTER = r"^model\.conv_encoder\.spatial_tuning_adapter\."
_V2_ELAN = r"^model\.encoder\.((?:fpn|pan)_blocks?(?:\.\d+)?)\."
_V2_LAYER = r"^model\.decoder\.layers\.(\d+)\."
_V2_DEC = r"decoder.decoder.layers.\1."
# transformers' DEIMv2 names -> the official modules' (HGNetv2 or DINOv3STAs, HybridEncoder or
# LiteEncoder with RepNCSPELAN4/5 cv1..cv4, DEIMTransformer with RMSNorm ``scale`` and
# ``swish_ffn``), first matching rule; ``{vit}`` is the ViT's prefix and ``{up}``, ``{down}``
# its MLP's names (fc1 / fc2, or w2 / w3 beside a gated w1).
DEIMV2_OFFICIAL = [
    (r"^model\.conv_encoder\.model\.(.*)$", _d_fine_backbone),
    (_V2_VIT + r"embeddings\.patch_embeddings\.", "{vit}patch_embed.proj."),
    (_V2_VIT + r"embeddings\.(cls_token|mask_token)$", r"{vit}\1"),
    (_V2_VIT + r"embeddings\.register_tokens$", "{vit}storage_tokens"),
    (_V2_BLOCK + r"attention\.o_proj\.", r"{vit}blocks.\1.attn.proj."),
    (_V2_BLOCK + r"attention\.", r"{vit}blocks.\1.attn."),
    (_V2_BLOCK + r"layer_scale([12])\.lambda1$", r"{vit}blocks.\1.ls\2.gamma"),
    (_V2_BLOCK + r"mlp\.gate_proj\.", r"{vit}blocks.\1.mlp.w1."),
    (_V2_BLOCK + r"mlp\.up_proj\.", r"{vit}blocks.\1.mlp.{up}."),
    (_V2_BLOCK + r"mlp\.down_proj\.", r"{vit}blocks.\1.mlp.{down}."),
    (_V2_BLOCK, r"{vit}blocks.\1."),
    (_V2_VIT + r"norm\.", "{vit}norm."),
    (_V2_ADAPTER + r"stem_conv\.conv\.", "backbone.sta.stem.0."),
    (_V2_ADAPTER + r"stem_conv\.norm\.", "backbone.sta.stem.1."),
    (_V2_ADAPTER + r"conv2\.conv\.", "backbone.sta.conv2.0."),
    (_V2_ADAPTER + r"conv2\.norm\.", "backbone.sta.conv2.1."),
    (_V2_ADAPTER + r"conv([34])\.conv\.", r"backbone.sta.conv\1.1."),
    (_V2_ADAPTER + r"conv([34])\.norm\.", r"backbone.sta.conv\1.2."),
    (r"^model\.conv_encoder\.fusion_proj\.(\d+)\.conv\.", r"backbone.convs.\1."),
    (r"^model\.conv_encoder\.fusion_proj\.(\d+)\.norm\.", r"backbone.norms.\1."),
    (r"^model\.conv_encoder\.encoder_input_proj\.", "encoder.input_proj."),
    (r"^model\.encoder\.aifi\.(\d+)\.layers\.(\d+)\.self_attn\.o_proj\.",
     r"encoder.encoder.\1.layers.\2.self_attn.out_proj."),
    (r"^model\.encoder\.aifi\.(\d+)\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"encoder.encoder.\1.layers.\2.norm1."),
    (r"^model\.encoder\.aifi\.(\d+)\.layers\.(\d+)\.final_layer_norm\.",
     r"encoder.encoder.\1.layers.\2.norm2."),
    (r"^model\.encoder\.aifi\.(\d+)\.layers\.(\d+)\.mlp\.layers\.([01])\.",
     lambda m: f"encoder.encoder.{m[1]}.layers.{m[2]}.linear{int(m[3]) + 1}."),
    (r"^model\.encoder\.aifi\.", "encoder.encoder."),
    (_V2_ELAN + r"conv1\.", r"encoder.\1.cv1."),
    (_V2_ELAN + r"csp_rep([12])\.conv2\.", lambda m: f"encoder.{m[1]}.cv{int(m[2]) + 1}.1."),
    (_V2_ELAN + r"csp_rep([12])\.", lambda m: f"encoder.{m[1]}.cv{int(m[2]) + 1}.0."),
    (_V2_ELAN + r"conv2\.", r"encoder.\1.cv4."),
    (r"^model\.encoder\.downsample_convs\.(\d+)\.conv([12])\.",
     r"encoder.downsample_convs.\1.0.cv\2."),
    (r"^model\.encoder\.down_conv([12])\.conv\.", r"encoder.down_sample\1.1."),
    (r"^model\.encoder\.down_conv([12])\.norm\.", r"encoder.down_sample\1.2."),
    (r"^model\.encoder\.bi_fusion_conv\.", "encoder.bi_fusion.cv."),
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.decoder_input_proj\.", "decoder.input_proj."),
    (_V2_LAYER + r"self_attn\.o_proj\.", _V2_DEC + "self_attn.out_proj."),
    (_V2_LAYER + r"self_attn_layer_norm\.weight$", _V2_DEC + "norm1.scale"),
    (_V2_LAYER + r"encoder_attn_layer_norm\.weight$", _V2_DEC + "norm2.scale"),
    (_V2_LAYER + r"final_layer_norm\.weight$", _V2_DEC + "norm3.scale"),
    (_V2_LAYER + r"gateway\.norm\.weight$", _V2_DEC + "gateway.norm.scale"),
    (_V2_LAYER + r"encoder_attn\.", _V2_DEC + "cross_attn."),
    (_V2_LAYER + r"mlp\.down_proj\.", _V2_DEC + "swish_ffn.w3."),
    (_V2_LAYER + r"mlp\.", _V2_DEC + "swish_ffn."),
    (r"^model\.decoder\.(layers|lqe_layers)\.", r"decoder.decoder.\1."),
    (r"^model\.decoder\.class_embed\.", "decoder.dec_score_head."),
    (r"^model\.decoder\.bbox_embed\.", "decoder.dec_bbox_head."),
    (r"^model\.decoder\.", "decoder."),
    (r"^model\.weight_embedding\.", "decoder.tgt_embed."),
    (r"^model\.", "decoder."),
]
# separate projections -> the official stacked ones: (pattern, target, parts in order)
_V2_STACKED = [
    (re.compile(r"^(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$"), "{}.in_proj_{}", "qkv"),
    (re.compile(r"^(.*\.attn)\.([qkv])_proj\.(weight|bias)$"), "{}.qkv.{}", "qkv"),
    (re.compile(r"^(.*\.swish_ffn)\.(gate|up)_proj\.(weight|bias)$"), "{}.w12.{}",
     ("gate", "up")),
]
# What transformers' DEIMv2 has and the official ViT-Tiny does not (tests make them moot).
_TINY_ABSENT = re.compile(r"embeddings\.(register_tokens|mask_token)$|layer_scale[12]\.")


def deimv2_official_layout(hf_state_dict: dict, vit: str | None = None,
                           heads: int | None = None) -> dict:
    """A transformers DEIMv2 state dict (of a model made to compute as the official one:
    no ``enc_output``) in the official solver's keys. ``vit``: "tiny" (the distilled
    ViT-Tiny, ``backbone.dinov3._model.``) or "dinov3" (with ``heads``); their RoPE periods,
    DINOv3's key-bias mask (a saved key bias of noise, masked out), batch-norm counters, the
    FDR constants registered twice, the anchors of eval_spatial_size."""
    gated = any(k.endswith("mlp.gate_proj.weight") and "backbone" in k for k in hf_state_dict)
    names = {"{vit}": "backbone.dinov3._model." if vit == "tiny" else "backbone.dinov3.",
             "{up}": "w2" if gated else "fc1", "{down}": "w3" if gated else "fc2"}
    out, stacked = {}, collections.defaultdict(dict)
    for key, tensor in hf_state_dict.items():
        if key.startswith(("class_embed.", "bbox_embed.")) or (
                vit == "tiny" and _TINY_ABSENT.search(key)):
            continue
        key = rename_key(key, DEIMV2_OFFICIAL) or key
        for placeholder, name in names.items():
            key = key.replace(placeholder, name)
        for pattern, target, _ in _V2_STACKED:
            if m := pattern.match(key):
                stacked[target.format(m[1], m[3])][m[2]] = tensor
                break
        else:
            out[key] = tensor
    for key, tensors in stacked.items():
        parts = next(p for _, _, p in _V2_STACKED if set(tensors) == set(p))
        out[key] = torch.cat([tensors[p] for p in parts])
    _deimv2_official_buffers(out, names["{vit}"], vit, heads)
    return out


def _deimv2_official_buffers(out: dict, prefix: str, vit: str | None, heads: int | None):
    """What the official modules register beside the weights."""
    for key in [k for k in out if k.endswith("running_var")]:
        out.setdefault(key.replace("running_var", "num_batches_tracked"), torch.tensor(0))
    for name in ("up", "reg_scale"):
        out[f"decoder.decoder.{name}"] = out[f"decoder.{name}"]
    out["decoder.anchors"], out["decoder.valid_mask"] = torch.zeros(1, 8400, 4), torch.ones(
        1, 8400, 1, dtype=torch.bool)
    if vit is None:
        return
    dim = out[prefix + "cls_token"].shape[-1]
    head_dim = dim // heads
    out[prefix + "rope_embed.periods"] = 100.0 ** (torch.arange(head_dim // 4) * 4 / head_dim)
    if vit == "dinov3":
        out[prefix + "mask_token"] = out[prefix + "mask_token"].reshape(1, dim)
        g = torch.Generator().manual_seed(5)
        for key in [k for k in out if k.endswith("attn.qkv.bias")]:
            out[key] = out[key].clone()
            out[key][dim:2 * dim] = torch.randn(dim, generator=g)  # trained, then masked
            out[key + "_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])


def deimv2_official_yaml(args: dict, *, mlp_act: str = "silu", vit_name: str | None = None
                         ) -> dict:
    """The YAML sections of the config a transformers DEIMv2 ``args`` (config.json) was
    made from, as DEIMv2's configs spell them (``vit_name``: DINOv3STAs's name)."""
    lite = args["encoder_type"] == "lite"
    encoder = {"in_channels": args["encoder_in_channels"], "feat_strides": args["feat_strides"],
               "hidden_dim": args["encoder_hidden_dim"], "expansion": args["hidden_expansion"],
               "depth_mult": args["depth_mult"], "act": "silu"}
    if not lite:
        encoder.update(use_encoder_idx=args["encode_proj_layers"], num_encoder_layers=1,
                       nhead=args["encoder_attention_heads"],
                       dim_feedforward=args["encoder_ffn_dim"], enc_act="gelu",
                       version="dfine" if args["encoder_has_trailing_conv"] else "deim",
                       csp_type="csp2", fuse_op="sum")
    levels = args["num_feature_levels"]
    points = args["decoder_n_points"]
    yaml_ = {"model": "DEIM",
             "DEIM": {"backbone": "DINOv3STAs" if vit_name else "HGNetv2",
                      "encoder": "LiteEncoder" if lite else "HybridEncoder",
                      "decoder": "DEIMTransformer"},
             "LiteEncoder" if lite else "HybridEncoder": encoder,
             "DEIMTransformer": {
                 "feat_channels": args["decoder_in_channels"], "hidden_dim": args["d_model"],
                 "num_levels": levels, "num_layers": args["decoder_layers"], "eval_idx": -1,
                 "num_queries": args["num_queries"], "nhead": args["decoder_attention_heads"],
                 "num_points": [points] * levels if isinstance(points, int) else points,
                 "reg_max": args["max_num_bins"], "reg_scale": args["reg_scale"],
                 "dim_feedforward": args["decoder_ffn_dim"], "activation": "silu",
                 "mlp_act": mlp_act, "share_bbox_head": args["share_bbox_head"],
                 "use_gateway": args["use_gateway"], "cross_attn_method": "default",
                 "query_select_method": "default"}}
    backbone = args["backbone_config"]
    if vit_name:
        yaml_["DINOv3STAs"] = {
            "name": vit_name, "embed_dim": backbone["hidden_size"],
            "num_heads": backbone["num_attention_heads"],
            "interaction_indexes": [i - 1 for i in backbone["out_indices"]],
            "conv_inplane": args["spatial_tuning_adapter_inplanes"],
            "hidden_dim": args["encoder_hidden_dim"]}
    else:
        yaml_["HGNetv2"] = {"name": "B0", "use_lab": backbone["use_learnable_affine_block"],
                            "return_idx": [i - 1 for i in backbone["out_indices"]]}
    return yaml_


def deimv2_official_checkpoint(folder: Path, variant: str, *, released: bool = False
                               ) -> Artifact:
    """What DEIMv2's solver saves (``{'date', 'last_epoch', 'model', 'criterion',
    'postprocessor', 'ema': {'module', 'updates'}, 'optimizer', 'lr_scheduler',
    'lr_warmup_scheduler', 'scaler'}``) or a released file (``{'model'}``), written from a
    random transformers DEIMv2 made to compute as the official model, with its YAML beside
    it as the repository's configs are: a file that includes the shared base."""
    from test_convert_deimv2_official import official

    hf, layout, settings = official(variant)
    if released:
        payload = {"model": layout}
    else:
        _, other, _ = official(variant, seed=3)
        optimizer, scheduler = training_state(torch.nn.Linear(4, 4))
        payload = {"date": "2025-09-26T12:00:00", "last_epoch": 131, "model": other,
                   "criterion": {}, "postprocessor": {},
                   "ema": {"module": layout, "updates": 5000}, "optimizer": optimizer,
                   "lr_scheduler": scheduler, "scaler": {"scale": 65536.0, "_growth_tracker": 7},
                   "lr_warmup_scheduler": {"warmup_end_values": [4e-4], "last_step": 2000,
                                           "warmup_duration": 2000}}
    path = _save(payload, folder / (f"deimv2_{variant}_coco.pth" if released else "last.pth"))
    deimv2_official_yaml_files(folder, settings)

    def run(images, padding):
        with torch.no_grad():
            out = hf(pixel_values=images)
        return out.logits, out.pred_boxes
    return Artifact(path, "deimv2", run)


def deimv2_official_yaml_files(folder: Path, settings: dict) -> None:
    """``settings`` as the repository writes a config: ``configs/base/deimv2.yml`` with the
    decoder's activations, included by ``config.yaml`` beside the weights."""
    decoder = dict(settings["DEIMTransformer"])
    base = {"model": "DEIM", "DEIMTransformer": {"activation": decoder.pop("activation"),
                                                 "mlp_act": decoder.pop("mlp_act")}}
    (folder / "base").mkdir(parents=True, exist_ok=True)
    (folder / "base" / "deimv2.yml").write_text(yaml.safe_dump(base))
    top = {**{k: v for k, v in settings.items() if k != "model"}, "DEIMTransformer": decoder,
           "__include__": ["./base/deimv2.yml"]}
    (folder / "config.yaml").write_text(yaml.safe_dump(top))


# --- official RT-DETR (lyuwenyu/RT-DETR's solver) -------------------------------------------

RT_DETR_SMALL = DetectorConfig(
    **rt_detr.FIXED, backbone={"name": "resnet_vd", "block": "bottleneck", "depths": (1, 2, 1, 1),
                               "widths": (32, 64, 128, 256), "stem": 16},
    hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, encoder_ffn_dim=48,
    num_queries=20, num_classes=5, num_feature_levels=3, dn_labelbook_size=5,
    aifi_transposed_grid=True,
)


def rt_detr_official_layout(state_dict: dict, version: str) -> dict:
    """Canonical keys -> the official code's (v1 or v2 spellings), with what its modules
    also save: the encoder's and decoder's batch-norm counters (only the backbone's norms
    are frozen), v2's per-layer ``num_points_scale`` and the anchors of eval_spatial_size."""
    conv, norm, proj = ("conv", "norm", "proj") if version == "v2" else ("0", "1", "0")
    rules = [
        (r"^transformer\.encoder\.input_proj\.(\d+)\.0\.", rf"encoder.input_proj.\1.{conv}."),
        (r"^transformer\.encoder\.input_proj\.(\d+)\.1\.", rf"encoder.input_proj.\1.{norm}."),
        (r"^transformer\.encoder\.", "encoder."),
        (r"^input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
        (r"^input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm."),
        (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"decoder.decoder.layers.\1.norm2."),
        (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"decoder.decoder.layers.\1.norm1."),
        (r"^transformer\.decoder\.layers\.", "decoder.decoder.layers."),
        (r"^transformer\.decoder\.ref_point_head\.", "decoder.query_pos_head."),
        (r"^transformer\.enc_output\.", f"decoder.enc_output.{proj}."),
        (r"^transformer\.enc_output_norm\.", f"decoder.enc_output.{norm}."),
        (r"^transformer\.enc_out_class_embed\.", "decoder.enc_score_head."),
        (r"^transformer\.enc_out_bbox_embed\.", "decoder.enc_bbox_head."),
        (r"^class_embed\.", "decoder.dec_score_head."),
        (r"^bbox_embed\.", "decoder.dec_bbox_head."),
        (r"^label_enc\.", "decoder.denoising_class_embed."),
    ]
    out = {}
    for key, tensor in state_dict.items():
        key = rename_key(key, rules) or key
        out[key] = tensor
        if key.endswith("running_var") and not key.startswith("backbone."):
            out[key.replace("running_var", "num_batches_tracked")] = torch.tensor(1000)
    if version == "v2":
        points = RT_DETR_SMALL.dec_n_points
        for layer in range(RT_DETR_SMALL.dec_layers):
            out[f"decoder.decoder.layers.{layer}.cross_attn.num_points_scale"] = torch.full(
                (RT_DETR_SMALL.num_feature_levels * points,), 1 / points)
    out["decoder.anchors"], out["decoder.valid_mask"] = torch.zeros(1, 8400, 4), torch.ones(
        1, 8400, 1, dtype=torch.bool)
    return out


def rt_detr_official_checkpoint(folder: Path, version: str, *, released: bool = False
                                ) -> Artifact:
    """What RT-DETR's solver saves (``{'date', 'last_epoch', 'model', 'ema': {'module',
    'updates'}, 'optimizer', 'lr_scheduler'}``), or a released file (``{'ema'}`` only), with
    its YAML config beside it (``--config`` otherwise)."""
    from test_convert_rt_detr import lively

    ema = perturb(lively(build_detector(RT_DETR_SMALL), seed=6), seed=6)
    payload = {"ema": {"module": rt_detr_official_layout(ema.state_dict(), version),
                       "updates": 5000}}
    if not released:
        model = perturb(lively(build_detector(RT_DETR_SMALL), seed=7), seed=7)
        optimizer, scheduler = training_state(build_detector(RT_DETR_SMALL))
        payload.update(date="2024-07-24T12:00:00", last_epoch=71, optimizer=optimizer,
                       lr_scheduler=scheduler,
                       model=rt_detr_official_layout(model.state_dict(), version))
    name = f"rtdetr{'v2' if version == 'v2' else ''}_r50vd_coco.pth" if released else "last.pth"
    path = _save(payload, folder / name)
    decoder = "RTDETRTransformerv2" if version == "v2" else "RTDETRTransformer"
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "HybridEncoder": {"hidden_dim": 32, "nhead": 2, "use_encoder_idx": [2],
                          "pe_temperature": 10000, "enc_act": "gelu", "act": "silu"},
        decoder: {"hidden_dim": 32, "nhead": 2, "num_queries": 20, "num_points": 4,
                  **({"cross_attn_method": "default", "query_select_method": "default"}
                     if version == "v2" else {})},
        "PResNet": {"variant": "d", "freeze_norm": True}}))
    return Artifact(path, "rt_detr", canonical_reference(ema), RT_DETR_SMALL)


# --- mmdetection (mmengine's CheckpointHook, mmcv 1.x's save_checkpoint) ----------------------

PALETTE = [(220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 0, 230), (106, 0, 228),
           (0, 60, 100), (0, 80, 100)]


@contextlib.contextmanager
def _as_mmengine_history_buffer():
    """A class that pickles as mmengine's HistoryBuffer does (its name, numpy arrays, and the
    bound methods in ``_statistics_methods``), without mmengine: registered under mmengine's
    module names while ``torch.save`` runs."""
    class HistoryBuffer:
        def __init__(self, values: list[float]) -> None:
            self.max_length = 1000000
            self._log_history = np.array(values)
            self._count_history = np.ones(len(values), dtype=np.int64)
            self._statistics_methods = {"min": self.min, "max": self.max, "mean": self.mean,
                                        "current": self.current}

        def min(self): return self._log_history.min()  # noqa: E704
        def max(self): return self._log_history.max()  # noqa: E704
        def mean(self): return self._log_history.mean()  # noqa: E704
        def current(self): return self._log_history[-1]  # noqa: E704

    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
    modules = {name: types.ModuleType(name) for name in names}
    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = names[-1], "HistoryBuffer"
    modules[names[-1]].HistoryBuffer = HistoryBuffer
    with mock.patch.dict(sys.modules, modules):
        yield HistoryBuffer


def _mmengine_training_parts(model: torch.nn.Module, buffer: type) -> dict:
    """What CheckpointHook saves beside the weights: the message hub (logged scalars as
    HistoryBuffers), the optimizer wrapper's and the parameter schedulers' states."""
    optimizer, _ = training_state(model)
    hub = {"log_scalars": collections.OrderedDict(
               [("train/loss", buffer([2.5, 2.25])), ("train/lr", buffer([1e-4, 1e-4]))]),
           "runtime_info": collections.OrderedDict(epoch=12, iter=7330, max_epochs=12),
           "resumed_keys": collections.OrderedDict(epoch=True, iter=True)}
    schedulers = [{"begin": 0, "end": 12, "by_epoch": True, "milestones": Counter({11: 1}),
                   "gamma": 0.1, "param_name": "lr", "base_values": [1e-4], "last_step": 12,
                   "_global_step": 12, "verbose": False, "_last_value": [1e-5]}]
    return {"message_hub": hub, "optimizer": optimizer, "param_schedulers": schedulers}


def mmdet_checkpoint(folder: Path, name: str = "dino_4scale", *, hook: bool = True,
                     ema: bool = False) -> Artifact:
    """``epoch_12.pth`` as mmengine's CheckpointHook writes it for mmdet 3.x: {'meta' (the
    config text, dataset classes and palette), 'state_dict', 'message_hub', 'optimizer',
    'param_schedulers'}; ``hook=False``: a released model (publish_model keeps {'meta',
    'state_dict'}). ``ema``: EMAHook's save, where 'state_dict' holds the averaged weights
    and 'ema_state_dict' the trained ones as ``module.``-prefixed keys with 'steps'.
    Heads that one module serves (no box refinement) share one storage, as saved."""
    from test_convert_mmdet import CLASSES, RECORDED, VARIANTS, canonical_model, mmdet_layout

    config = VARIANTS[name]
    model = canonical_model(config, seed=8)
    layout = mmdet_layout(model.state_dict(), config)
    if not config.box_refine:
        for key in [k for k in layout if re.match(r"^bbox_head\.(cls|reg)_branches\.\d+\.", k)]:
            layout[key] = layout[re.sub(r"_branches\.\d+\.", "_branches.0.", key)]
    meta = {"epoch": 12, "iter": 7330, "cfg": RECORDED[name]["cfg"], "seed": 0,
            "experiment_name": f"{name}_20221202_182705", "time": "20221202_182705",
            "mmengine_version": "0.10.7",
            "dataset_meta": {"classes": CLASSES, "palette": PALETTE}}
    payload = {"meta": meta, "state_dict": layout}
    with _as_mmengine_history_buffer() as buffer:
        if hook:
            payload.update(_mmengine_training_parts(build_detector(config), buffer))
        if ema:
            trained = canonical_model(config, seed=9)
            payload["ema_state_dict"] = {
                **{f"module.{k}": v for k, v in mmdet_layout(trained.state_dict(),
                                                             config).items()},
                "steps": torch.tensor(7330)}
        path = _save(payload, folder / "epoch_12.pth")
    return Artifact(path, "mmdet", canonical_reference(model), config)


def mmdet_recorded_checkpoint(folder: Path, name: str = "detr", *, cfg: str | None = None,
                              state_dict: dict | None = None) -> Path:
    """``epoch_50.pth`` of an mmdet 3.x model whose outputs ``record_mmdet_keys.py``
    recorded (DETR, Conditional DETR, DAB-DETR, Co-DINO) as CheckpointHook writes it, holding
    the recorded variant's seeded weights, or ``state_dict`` in their place; ``cfg``: other
    config text than the recorded one."""
    from record_mmdet_keys import seeded_weights
    from test_convert_mmdet import CLASSES, CO_DINO_RECORDED, PLAIN, RECORDED

    weights = seeded_weights(RECORDED[name]["keys"]) if state_dict is None else state_dict
    meta = {"epoch": 50, "iter": 366500, "cfg": RECORDED[name]["cfg"] if cfg is None else cfg,
            "seed": 0, "experiment_name": f"{name}_20230101_000000",
            "mmengine_version": "0.10.7",
            "dataset_meta": {"classes": CLASSES, "palette": PALETTE}}
    payload = {"meta": meta, "state_dict": weights}
    config = {**PLAIN, **CO_DINO_RECORDED}[name]
    with _as_mmengine_history_buffer() as buffer:
        payload.update(_mmengine_training_parts(build_detector(config), buffer))
        return _save(payload, folder / "epoch_50.pth")


def mmdet2_checkpoint(folder: Path, name: str = "deformable_detr_refine") -> Artifact:
    """An mmdet 2.x Deformable DETR as mmcv 1.x's save_checkpoint writes it ({'meta':
    {'config' text, 'CLASSES', ...}, 'state_dict', 'optimizer'}); without box refinement
    the heads one module serves share one storage, as saved."""
    from test_convert_mmdet import (
        CLASSES,
        VARIANTS,
        canonical_model,
        mmdet2_config_text,
        mmdet2_layout,
    )

    config = VARIANTS[name]
    model = canonical_model(config, seed=11)
    layout = mmdet2_layout(model.state_dict(), config)
    if not config.box_refine:
        for key in [k for k in layout if re.match(r"^bbox_head\.(cls|reg)_branches\.\d+\.", k)]:
            layout[key] = layout[re.sub(r"_branches\.\d+\.", "_branches.0.", key)]
    optimizer, _ = training_state(build_detector(config))
    meta = {"env_info": "sys.platform: linux\nPyTorch: 1.12.1",
            "config": mmdet2_config_text(config), "seed": 0, "exp_name": f"{name}.py",
            "epoch": 50, "iter": 366500,
            "mmcv_version": "1.7.1", "time": "Mon Mar 13 09:12:45 2023", "CLASSES": CLASSES,
            "mmdet_version": "2.28.2"}
    path = _save({"meta": meta, "state_dict": layout, "optimizer": optimizer},
                 folder / "latest.pth")
    return Artifact(path, "mmdet2", canonical_reference(model), config)


def co_dino_checkpoint(folder: Path, *, mmdet3: bool = False) -> Artifact:
    """Co-DETR's Co-DINO with its auxiliary heads: Sense-X's mmcv 1.x save_checkpoint
    ({'meta': {'config' text, 'CLASSES', ...}, 'state_dict', 'optimizer'}), or mmdetection's
    projects/CO-DETR through mmengine (``mmdet3``). Only the query head is the reference."""
    from test_convert_mmdet import CLASSES, CO_DINO, CO_DINO_CONFIG, canonical_model, co_dino_layout

    model = canonical_model(CO_DINO, seed=10)
    layout = co_dino_layout(model.state_dict(), CO_DINO, mmdet3=mmdet3)
    optimizer, _ = training_state(build_detector(CO_DINO))
    if mmdet3:
        meta = {"cfg": CO_DINO_CONFIG, "dataset_meta": {"classes": CLASSES, "palette": PALETTE},
                "epoch": 12, "iter": 7330, "mmengine_version": "0.10.7"}
    else:
        meta = {"env_info": "sys.platform: linux\nPyTorch: 1.11.0", "config": CO_DINO_CONFIG,
                "seed": 0, "exp_name": "co_dino_5scale_r50_1x_coco.py", "epoch": 12,
                "iter": 87960, "mmcv_version": "1.5.0", "time": "Thu Jul 20 10:21:35 2023",
                "CLASSES": CLASSES, "mmdet_version": "2.25.3"}
    path = _save({"meta": meta, "state_dict": layout, "optimizer": optimizer},
                 folder / ("epoch_12.pth" if mmdet3 else "co_dino_5scale_r50_1x_coco.pth"))
    return Artifact(path, "co_dino", canonical_reference(model), CO_DINO)


def _focalnet() -> dict:
    from test_convert_dino import FOCALNET

    return FOCALNET


CORPUS: dict[str, Callable[[Path], Artifact]] = {
    "dino-shared-heads": lambda d: dino_checkpoint(d),
    "dino-separate-heads-ema": lambda d: dino_checkpoint(d, shared=False, ema=True),
    "dino-ddp-float16": lambda d: dino_checkpoint(d, ddp=True, half=True),
    "focalnet-dino": lambda d: dino_checkpoint(d, backbone=_focalnet()),
    "deformable-detr-single-stage": lambda d: deformable_detr_checkpoint(d, "single-stage"),
    "deformable-detr-box-refine": lambda d: deformable_detr_checkpoint(d, "box-refine"),
    "deformable-detr-two-stage": lambda d: deformable_detr_checkpoint(d, "two-stage"),
    "h-deformable-detr-two-stage-mixed": h_deformable_detr_checkpoint,
    "h-deformable-detr-swin-t": lambda d: h_deformable_detr_checkpoint(d, "swin-t-mixed"),
    "detrex-trainer": lambda d: detrex_checkpoint(d),
    "detrex-released": lambda d: detrex_checkpoint(d, trainer=False),
    "detrex-ema": lambda d: detrex_checkpoint(d, ema=True),
    "huggingface-single-stage": lambda d: huggingface_folder(d, "single-stage"),
    "huggingface-box-refine": lambda d: huggingface_folder(d, "box-refine"),
    "huggingface-two-stage-sharded": lambda d: huggingface_folder(d, "two-stage", shards=True),
    "huggingface-v4-hub-file": huggingface_v4_hub_file,
    "huggingface-rt-detr": lambda d: rt_detr_folder(d, "v1"),
    "huggingface-rt-detr-basic-blocks": lambda d: rt_detr_folder(d, "v1-basic-expansion"),
    "huggingface-rt-detr-v2": lambda d: rt_detr_folder(d, "v2"),
    "huggingface-detr": lambda d: detr_folder(d, "detr"),
    "huggingface-conditional-detr": lambda d: detr_folder(d, "conditional-detr"),
    "huggingface-dab-detr": lambda d: detr_folder(d, "dab-detr"),
    "huggingface-dab-detr-patterns": lambda d: detr_folder(d, "dab-detr-patterns-keep-query-pos"),
    "huggingface-dab-detr-timm": lambda d: detr_folder(d, "dab-detr-timm"),
    "detr-main": detr_official_checkpoint,
    "conditional-detr-main": lambda d: detr_official_checkpoint(d, "conditional_detr"),
    "huggingface-d-fine": lambda d: d_fine_folder(d, "s"),
    "huggingface-d-fine-projected": lambda d: d_fine_folder(d, "plain-projected"),
    "huggingface-deimv2": lambda d: d_fine_folder(d, "n", "deimv2"),
    "huggingface-deimv2-shared-box-head": lambda d: d_fine_folder(
        d, "no-gate-shared-box-head-no-trailing-conv", "deimv2"),
    "huggingface-deimv2-dinov3": lambda d: d_fine_folder(d, "l", "deimv2_dinov3"),
    "huggingface-grounding-dino": grounding_dino_folder,
    "grounding-dino-official-training": grounding_dino_official_checkpoint,
    "d-fine-solver": lambda d: d_fine_official_checkpoint(d, "s"),
    "d-fine-released-projected": lambda d: d_fine_official_checkpoint(
        d, "plain-projected", released=True),
    "deim-solver-two-levels": lambda d: d_fine_official_checkpoint(d, "n-two-levels",
                                                                   family="DEIM"),
    "d-fine-released-points": lambda d: d_fine_official_checkpoint(d, "released-points",
                                                                   released=True),
    "deim-solver-released-config": lambda d: d_fine_official_checkpoint(
        d, "released-points", family="DEIM"),
    "deimv2-solver-n": lambda d: deimv2_official_checkpoint(d, "n"),
    "deimv2-released-atto": lambda d: deimv2_official_checkpoint(d, "atto-shared-box-head",
                                                                 released=True),
    "deimv2-solver-vit-tiny": lambda d: deimv2_official_checkpoint(d, "s-vit-tiny"),
    "deimv2-released-dinov3-plus": lambda d: deimv2_official_checkpoint(
        d, "x-dinov3-plus-shared-box-head", released=True),
    "dab-detr-main": lambda d: detr_official_checkpoint(d, "dab_detr", num_patterns=2,
                                                        keep_query_pos=True),
    "rt-detr-v1-solver": lambda d: rt_detr_official_checkpoint(d, "v1"),
    "rt-detr-v2-released": lambda d: rt_detr_official_checkpoint(d, "v2", released=True),
    "huggingface-lw-detr-p3-p5": lambda d: lw_detr_folder(d, "lw-p3p5"),
    "huggingface-lw-detr-p4": lambda d: lw_detr_folder(d, "lw-p4"),
    "huggingface-rf-detr": lambda d: lw_detr_folder(d, "rf"),
    "rf-detr-main": rf_detr_official_checkpoint,
    "rf-detr-released": lambda d: rf_detr_official_checkpoint(d, released=True),
    "lw-detr-main-p3-p5": lw_detr_official_checkpoint,
    "lw-detr-released-p4": lambda d: lw_detr_official_checkpoint(d, released=True,
                                                                 scales=(1.0,)),
    "mmdet-dino-checkpoint-hook": lambda d: mmdet_checkpoint(d),
    "mmdet-dino-ema": lambda d: mmdet_checkpoint(d, hook=False, ema=True),
    "mmdet-deformable-detr-two-stage-released": lambda d: mmdet_checkpoint(
        d, "deformable_detr_refine_two_stage", hook=False),
    "mmdet-deformable-detr-shared-heads": lambda d: mmdet_checkpoint(d, "deformable_detr"),
    "mmdet2-deformable-detr-refine": mmdet2_checkpoint,
    "mmdet2-deformable-detr-two-stage-shared-heads": lambda d: mmdet2_checkpoint(
        d, "deformable_detr_two_stage"),
    "co-dino-sense-x": co_dino_checkpoint,
}
