"""Official Grounding DINO checkpoints (IDEA-Research/GroundingDINO's layout) convert to what
transformers' GroundingDino converts to, and reproduce its outputs for the same image and
prompt.

The files here are written from a random transformers model, its keys put in the official
names by the inverse of transformers' own mapping (``tests/artifacts.py``); the official
names are checked against the ones read from the official modules' source. Where
``third_party/GroundingDINO`` (git-ignored) holds the official repository, the last test
also builds the official model on the CPU and converts its own state dict.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from artifacts import (
    GROUNDING_DINO_CONFIG,
    converts_like_transformers,
    grounding_dino_official_checkpoint,
    grounding_dino_official_config,
    grounding_dino_official_layout,
)
from test_checkpoint_corpus import images_and_padding
from test_convert_grounding_dino import PROMPT, random_hf_model, tiny_vocab
from typer.testing import CliRunner
from weights import perturb

from frozenseg.cli import app
from frozenseg.convert import (
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    read_training_config,
)
from frozenseg.detector.frozen import load_detector
from frozenseg.formats import FORMATS, detect_format

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

# Names read from the official modules (groundingdino.py, transformer.py,
# transformer_vanilla.py, fuse_modules.py, backbone/swin_transformer.py, bertwarper.py).
OFFICIAL_KEYS = [
    "backbone.0.patch_embed.proj.weight", "backbone.0.patch_embed.norm.bias",
    "backbone.0.layers.0.blocks.1.norm1.weight", "backbone.0.layers.0.blocks.0.norm2.bias",
    "backbone.0.layers.0.blocks.0.attn.qkv.weight", "backbone.0.layers.2.blocks.0.attn.qkv.bias",
    "backbone.0.layers.0.blocks.0.attn.relative_position_bias_table",
    "backbone.0.layers.0.blocks.0.attn.relative_position_index",
    "backbone.0.layers.0.blocks.0.attn.proj.weight", "backbone.0.layers.3.blocks.0.mlp.fc1.bias",
    "backbone.0.layers.0.blocks.0.mlp.fc2.weight",
    "backbone.0.layers.0.downsample.reduction.weight",
    "backbone.0.layers.2.downsample.norm.bias", "backbone.0.norm1.weight", "backbone.0.norm3.bias",
    "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_ids",
    "bert.encoder.layer.0.attention.self.query.weight", "bert.pooler.dense.weight",
    "feat_map.weight", "feat_map.bias", "input_proj.0.0.weight", "input_proj.3.1.bias",
    "transformer.level_embed", "transformer.tgt_embed.weight", "transformer.enc_output.weight",
    "transformer.enc_output_norm.bias", "transformer.enc_out_bbox_embed.layers.2.bias",
    "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "transformer.encoder.layers.1.self_attn.attention_weights.bias",
    "transformer.encoder.layers.0.self_attn.value_proj.weight",
    "transformer.encoder.layers.0.self_attn.output_proj.bias",
    "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.norm2.bias",
    "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.1.linear2.bias",
    "transformer.encoder.text_layers.0.self_attn.in_proj_weight",
    "transformer.encoder.text_layers.0.self_attn.in_proj_bias",
    "transformer.encoder.text_layers.1.self_attn.out_proj.weight",
    "transformer.encoder.text_layers.0.linear1.weight",
    "transformer.encoder.text_layers.0.linear2.bias",
    "transformer.encoder.text_layers.0.norm1.weight",
    "transformer.encoder.text_layers.0.norm2.bias",
    "transformer.encoder.fusion_layers.0.gamma_v", "transformer.encoder.fusion_layers.1.gamma_l",
    "transformer.encoder.fusion_layers.0.layer_norm_v.weight",
    "transformer.encoder.fusion_layers.0.layer_norm_l.bias",
    "transformer.encoder.fusion_layers.0.attn.v_proj.weight",
    "transformer.encoder.fusion_layers.0.attn.l_proj.bias",
    "transformer.encoder.fusion_layers.0.attn.values_v_proj.weight",
    "transformer.encoder.fusion_layers.0.attn.values_l_proj.weight",
    "transformer.encoder.fusion_layers.0.attn.out_v_proj.bias",
    "transformer.encoder.fusion_layers.0.attn.out_l_proj.weight",
    "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight",
    "transformer.decoder.layers.1.cross_attn.attention_weights.bias",
    "transformer.decoder.layers.0.cross_attn.value_proj.weight",
    "transformer.decoder.layers.0.cross_attn.output_proj.weight",
    "transformer.decoder.layers.0.norm1.weight",
    "transformer.decoder.layers.0.ca_text.in_proj_weight",
    "transformer.decoder.layers.0.ca_text.out_proj.bias",
    "transformer.decoder.layers.0.catext_norm.weight",
    "transformer.decoder.layers.0.self_attn.in_proj_bias",
    "transformer.decoder.layers.1.self_attn.out_proj.weight",
    "transformer.decoder.layers.0.norm2.bias", "transformer.decoder.layers.0.linear1.weight",
    "transformer.decoder.layers.0.linear2.bias", "transformer.decoder.layers.1.norm3.weight",
    "transformer.decoder.norm.weight", "transformer.decoder.ref_point_head.layers.1.weight",
    "transformer.decoder.bbox_embed.1.layers.2.weight", "bbox_embed.0.layers.0.bias",
    "bbox_embed.1.layers.2.weight",
]
# Spellings only transformers has: none may be left in the official layout.
TRANSFORMERS_ONLY = re.compile(
    r"^model\.|layernorm_|encoder_attn|_layer_norm|(?<!mlp)\.fc[12]\.|fusion_layer\.|text_enhancer|"
    r"deformable_layer|(vision|text)_proj|(vision|text)_param|\.swin\.|hidden_states_norms|"
    r"(self_attn|ca_text)\.(query|key|value)\.|attn\.(query|key|value)\.")


# A one-layer BERT with bert-base-uncased's 64 channels a head.
BERT = dict(vocab_size=1100, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
            intermediate_size=48, max_position_embeddings=64)


def official_size_model():
    """A small random transformers GroundingDino as the official code sizes it where the
    weights cannot say: token logits padded to 256 (its fixed max_text_len), BERT with
    bert-base-uncased's 64 channels a head, and the released config's 8 heads."""
    return random_hf_model(encoder_attention_heads=8, decoder_attention_heads=8,
                           max_text_len=256,
                           text_config=transformers.BertConfig(**BERT)).eval()


@pytest.fixture(scope="module")
def official():
    hf = official_size_model()
    return hf, grounding_dino_official_layout(hf.state_dict())


def test_the_written_layout_has_the_official_modules_names(official):
    _, layout = official
    assert not [key for key in OFFICIAL_KEYS if key not in layout]
    assert not [key for key in layout if TRANSFORMERS_ONLY.search(key)]
    assert layout["transformer.encoder.text_layers.0.self_attn.in_proj_weight"].shape == (
        192, 64)
    assert layout["backbone.0.layers.1.blocks.0.attn.qkv.weight"].shape == (96, 32)
    # one box head shared by the decoder layers, registered twice (dec_pred_bbox_embed_share)
    assert layout["bbox_embed.1.layers.0.weight"].data_ptr() == layout[
        "transformer.decoder.bbox_embed.0.layers.0.weight"].data_ptr()


def test_converts_to_what_the_transformers_model_converts_to(official):
    """Key by key, the same canonical tensors and the same config."""
    hf, layout = official
    report = converts_like_transformers(hf, layout, GROUNDING_DINO_CONFIG, "grounding_dino")
    dropped = dict(report.dropped)
    index = "backbone.0.layers.0.blocks.0.attn.relative_position_index"
    assert "Swin's index buffer" in dropped[index]
    assert {"bert.pooler.dense.weight", "bert.embeddings.position_ids"} <= set(dropped)
    renamed = dict(report.renamed)  # told in the official names
    assert renamed["transformer.decoder.layers.0.ca_text.in_proj_weight"] == (
        "transformer.decoder.layers.0.text_cross_attn.in_proj_weight")
    assert renamed["backbone.0.layers.0.blocks.0.attn.qkv.weight"] == (
        "backbone.layers.0.blocks.0.attn.qkv.weight")


def test_the_formats_tell_the_layouts_apart(official):
    hf, layout = official
    assert detect_format(layout).name == "grounding_dino"
    assert not FORMATS["huggingface_grounding_dino"].matches(layout)
    assert not FORMATS["grounding_dino"].matches(hf.state_dict())


def max_differences(got, logits, boxes) -> tuple[float, float]:
    """Largest |difference| of the last layer's token logits (where finite: both have -inf
    past the prompt) and boxes between a converted detector's output and a reference's."""
    finite = logits.isfinite()
    assert torch.equal(got.logits[-1].isfinite(), finite)
    return ((got.logits[-1][finite] - logits[finite]).abs().max().item(),
            (got.boxes[-1] - boxes).abs().max().item())


def converted_differences(artifact, folder: Path) -> tuple[float, float]:
    """:func:`max_differences` of the detector converted into ``folder`` from ``artifact``
    and the model it was written from, on a padded batch and the artifact's prompt."""
    detector = load_detector(folder)
    detector.set_prompt(artifact.prompt)
    images, padding = images_and_padding()
    with torch.no_grad():
        got = detector.model(images, padding, prompt=detector.prompt)
    return max_differences(got, *artifact.reference(images, padding))


def test_a_training_checkpoint_converts_and_reproduces_transformers(tmp_path):
    """``frozenseg convert`` on ``{model, optimizer, lr_scheduler, epoch, args}`` (args a
    Namespace) with bert-base-uncased's vocab.txt beside it: transformers' logits and boxes
    for the same image and prompt, within 1e-4."""
    artifact = grounding_dino_official_checkpoint(tmp_path / "run")
    result = runner.invoke(app, ["convert", "--detector", str(artifact.path), "--out",
                                 str(tmp_path / "gdino")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "grounding_dino" in result.output and "assumed" not in result.output
    assert max(converted_differences(artifact, tmp_path / "gdino")) < 1e-4


def test_a_released_file_takes_its_python_config_and_a_tokenizer_folder(tmp_path):
    """``{model}`` only, with ``--config GroundingDINO_SwinT_OGC.py`` (read as data) and the
    hub's bert-base-uncased files (no tokenizer class named) in ``--tokenizer``."""
    artifact = grounding_dino_official_checkpoint(tmp_path / "released", released=True)
    weights = tmp_path / "weights" / artifact.path.name
    weights.parent.mkdir()
    artifact.path.rename(weights)
    config = artifact.path.parent / "GroundingDINO_SwinT_OGC.py"
    result = runner.invoke(app, ["convert", "--detector", str(weights), "--out",
                                 str(tmp_path / "gdino"), "--config", str(config),
                                 "--tokenizer", str(artifact.path.parent)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "assumed" not in result.output
    written = json.loads((tmp_path / "gdino" / "tokenizer" / "tokenizer_config.json")
                         .read_text())
    assert written == {"do_lower_case": True, "model_max_length": 512,
                       "tokenizer_class": "BertTokenizer"}
    assert max(converted_differences(artifact, tmp_path / "gdino")) < 1e-4


def test_without_a_config_the_released_settings_are_assumed_and_said(official):
    _, layout = official
    _, report = convert_state_dict(layout)
    assert report.ok and report.config.nheads == 8 and report.config.max_text_len == 256
    assert any("--config GroundingDINO_SwinT_OGC.py" in n and "assumed the released" in n
               for n in report.notes), report.notes
    partial = {k: v for k, v in GROUNDING_DINO_CONFIG.items() if k != "pe_temperatureW"}
    _, report = convert_state_dict(layout, args=partial)
    assert [n for n in report.notes if "assumed" in n] == [
        "not in the config, assumed the released models' pe_temperatureW=20"]


def test_a_checkpoint_without_its_tokenizer_is_refused_in_one_line(tmp_path):
    artifact = grounding_dino_official_checkpoint(tmp_path / "released", released=True)
    (artifact.path.parent / "vocab.txt").unlink()
    result = runner.invoke(app, ["convert", "--detector", str(artifact.path), "--out",
                                 str(tmp_path / "out"), "--config",
                                 str(artifact.path.parent / "GroundingDINO_SwinT_OGC.py")],
                           terminal_width=400)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "tokenizer" in errors[0] and "--tokenizer" in errors[0]
    result = runner.invoke(app, ["convert", "--detector", str(artifact.path), "--out",
                                 str(tmp_path / "out"), "--tokenizer", str(tmp_path / "bert")],
                           terminal_width=400)
    assert result.exit_code == 1 and "bert: no such folder" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("setting", "value"), [
    ("two_stage_type", "no"), ("sub_sentence_present", False),
    ("transformer_activation", "gelu"), ("use_text_cross_attention", False),
    ("pre_norm", True), ("pe_temperatureW", 10000), ("text_encoder_type", "roberta-base"),
    ("nheads", "eight"),
])
def test_settings_frozenseg_does_not_reproduce_are_refused_in_one_line(official, setting,
                                                                       value):
    _, layout = official
    with pytest.raises(ValueError) as err:
        convert_state_dict(layout, args={**GROUNDING_DINO_CONFIG, setting: value})
    assert setting in str(err.value) and repr(value) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_resnet_backbone_is_refused_in_one_line(official):
    _, layout = official
    resnet = {re.sub(r"^backbone\.0\.patch_embed\.proj\.", "backbone.0.body.conv1.", k): v
              for k, v in layout.items()}
    with pytest.raises(ValueError, match="only the Swin backbones"):
        convert_state_dict(resnet, args=GROUNDING_DINO_CONFIG)


def test_the_python_config_is_read_as_data_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "GroundingDINO_SwinT_OGC.py"
    config.write_text(f"import os\nos.system('touch {marker}')\nnheads = 8\n"
                      "num_queries = 900 * 1\nreturn_interm_indices = [1, 2, 3]\n")
    assert read_training_config(config) == {"nheads": 8, "return_interm_indices": [1, 2, 3]}
    assert not marker.exists()
    config.write_text("nheads = (\n")
    with pytest.raises(ConversionError, match="not a readable JSON, YAML or Python config"):
        read_training_config(config)


# --- side by side with the official code (third_party/GroundingDINO) -----------------------

REPO = Path(__file__).resolve().parents[1] / "third_party" / "GroundingDINO"


class BertShim(torch.nn.Module):
    """The official ``BertModelWarper`` (same modules, same names) for transformers 5, which
    lacks the ``get_extended_attention_mask`` / ``get_head_mask`` it calls: BERT reads the
    official code's phrase mask (B, T, T) as a 4-D mask, as the wrapper makes it."""

    def __init__(self, bert_model) -> None:
        super().__init__()
        self.config = bert_model.config
        self.embeddings, self.encoder = bert_model.embeddings, bert_model.encoder
        self.pooler = bert_model.pooler
        self._bert = [bert_model]  # unregistered: its modules are the ones above

    def forward(self, input_ids, attention_mask, token_type_ids, position_ids, **_):
        out = self._bert[0](input_ids, attention_mask[:, None].bool(), token_type_ids,
                            position_ids)
        return {"last_hidden_state": out.last_hidden_state}


@contextlib.contextmanager
def official_code(vocab: Path):
    """IDEA-Research/GroundingDINO's model builder (from ``REPO``) on the CPU, its
    deformable attention on its own PyTorch path, with a tiny BERT and the vocabulary in
    ``vocab`` instead of bert-base-uncased (no download), and stubs for the imports only its
    config writer and visualiser use. Yields (build_groundingdino, NestedTensor)."""
    tokenizer = transformers.BertTokenizer(vocab=tiny_vocab(vocab))
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**BERT))
    stubs = {name: types.ModuleType(name) for name in (
        "addict", "yapf", "yapf.yapflib", "yapf.yapflib.yapf_api",
        "groundingdino.util.visualizer")}
    stubs["addict"].Dict = dict
    stubs["yapf.yapflib.yapf_api"].FormatCode = None
    stubs["groundingdino.util.visualizer"].COCOVisualizer = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, module in stubs.items():
                mp.setitem(sys.modules, name, module)
            mp.syspath_prepend(str(REPO))
            gdino = importlib.import_module("groundingdino.models.GroundingDINO.groundingdino")
            mp.setattr(gdino, "BertModelWarper", BertShim)
            mp.setattr(gdino.get_tokenlizer, "get_tokenlizer", lambda _: tokenizer)
            mp.setattr(gdino.get_tokenlizer, "get_pretrained_language_model", lambda _: bert)
            yield gdino.build_groundingdino, importlib.import_module(
                "groundingdino.util.misc").NestedTensor
    finally:
        for name in [n for n, m in sys.modules.items()
                     if str(getattr(m, "__file__", "")).startswith(str(REPO))]:
            del sys.modules[name]


def official_differences(build, NestedTensor, vocab: Path, folder: Path
                         ) -> tuple[float, float]:
    """The official model (its released config, read by frozenseg as data, at a smaller
    depth), its state dict saved as the official code saves it, converted with the config
    and the tokenizer in ``vocab``: :func:`max_differences` on a padded batch."""
    config = read_training_config(REPO / "groundingdino" / "config" /
                                  "GroundingDINO_SwinT_OGC.py")
    # d_model stays 256: the official text enhancer's positions are 256 wide, whatever it is
    config.update(enc_layers=2, dec_layers=2, dim_feedforward=256, num_queries=20)
    torch.manual_seed(0)
    model = perturb(build(argparse.Namespace(**config, device="cpu")))
    torch.save({"model": model.state_dict()}, folder / "groundingdino_swint_ogc.pth")
    (folder / "GroundingDINO_SwinT_OGC.py").write_text(grounding_dino_official_config(config))
    report = convert_checkpoint(folder / "groundingdino_swint_ogc.pth", folder / "out",
                                config=folder / "GroundingDINO_SwinT_OGC.py", tokenizer=vocab)
    assert report.format == "grounding_dino" and not report.notes, report.notes
    detector = load_detector(folder / "out")
    detector.set_prompt(PROMPT)
    images, padding = images_and_padding()
    with torch.no_grad():
        theirs = model(NestedTensor(images, padding), captions=[PROMPT] * 2)
        got = detector.model(images, padding, prompt=detector.prompt)
    return max_differences(got, theirs["pred_logits"], theirs["pred_boxes"])


@pytest.fixture(scope="module")
def official_builder(tmp_path_factory):
    if not (REPO / "groundingdino" / "models" / "GroundingDINO" / "groundingdino.py").is_file():
        pytest.skip("third_party/GroundingDINO (IDEA-Research/GroundingDINO) is not there")
    vocab = tmp_path_factory.mktemp("bert")
    with official_code(vocab) as (build, NestedTensor):
        yield build, NestedTensor, vocab


@pytest.mark.slow
def test_the_official_models_own_file_reproduces_it(official_builder, tmp_path):
    """Side by side with the official code: Swin-T, whose stride-32 map is smaller than its
    window here, so it pads; token logits and boxes for the same prompt."""
    logits, boxes = official_differences(*official_builder, tmp_path)
    assert logits < 1e-4 and boxes < 1e-5, (logits, boxes)
