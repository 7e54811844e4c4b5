"""Converted Hugging Face Grounding DINO models reproduce transformers' own outputs for the
same image and prompt, and find what a prompt names through FrozenDetector and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner
from weights import perturb

from frozenseg.cli import app
from frozenseg.convert import ConversionError, convert_checkpoint, convert_state_dict
from frozenseg.detector.frozen import FrozenDetector, load_detector
from frozenseg.detector.grounding import tokenize
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")

PROMPT = "cat . red car . dog ."
# + the synthetic shapes' category names' wordpieces ("c_shape": "c", "_", "shape")
WORDS = ["cat", "dog", "red", "car", "a", "bird", "ellipse", "rectangle", "triangle", "ring",
         "star", "cross", "c", "_", "shape", "dot", "pair"]
REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def tiny_vocab(folder: Path) -> dict[str, int]:
    """A BERT vocabulary file with the ids Grounding DINO fixes ([CLS] 101, [SEP] 102,
    "." 1012, "?" 1029) and a few words; the rest unused slots. Returns it as a dict."""
    tokens = [f"[unused{i}]" for i in range(1100)]
    for index, token in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]",
                         1012: ".", 1029: "?"}.items():
        tokens[index] = token
    tokens[1040 : 1040 + len(WORDS)] = WORDS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return {t: i for i, t in enumerate((folder / "vocab.txt").read_text().split("\n")[:-1])}


BACKBONES = {
    # window 2: transformers' Swin agrees with the official one on maps larger than the
    # window (the 96 x 128 images' stride-32 map is 3 x 4)
    "swin": lambda: transformers.SwinConfig(embed_dim=16, depths=[2, 2, 1, 1],
                                            num_heads=[1, 2, 2, 4], window_size=2,
                                            out_features=["stage2", "stage3", "stage4"]),
    "resnet50": lambda: transformers.ResNetConfig(depths=[3, 4, 6, 3],
                                                  out_features=["stage2", "stage3", "stage4"]),
}


def random_hf_model(backbone: str = "swin", **settings):
    """A small random GroundingDinoForObjectDetection (a tiny Swin or ResNet-50, a one-layer
    BERT), with noise on every weight so no proposal ties. ``settings``: GroundingDinoConfig
    arguments that replace the small ones."""
    torch.manual_seed(0)
    small = dict(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=BACKBONES[backbone](),
        text_config=transformers.BertConfig(vocab_size=1100, hidden_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=48, max_position_embeddings=64),
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20,
        max_text_len=32,
    )
    config = transformers.GroundingDinoConfig(**{**small, **settings})
    return perturb(transformers.GroundingDinoForObjectDetection(config))


def grounding_folder(folder: Path, backbone: str = "swin"):
    """``save_pretrained`` of the model and of its GroundingDinoProcessor into one folder,
    as a user keeps them. Returns (the model, its processor)."""
    model = random_hf_model(backbone)
    tokenizer = transformers.BertTokenizer(vocab=tiny_vocab(folder / "vocab"))
    processor = transformers.GroundingDinoProcessor(
        image_processor=transformers.GroundingDinoImageProcessor(), tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grounding") / "hf"
    model, processor = grounding_folder(folder)
    out = folder.parent / "converted"
    report = convert_checkpoint(folder, out)
    return model, processor, folder, out, report


def images_and_valid():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    valid = torch.ones(2, 96, 128, dtype=torch.long)
    valid[1, :, 100:] = 0  # the second image is smaller: padded right and bottom
    valid[1, 80:, :] = 0
    images[1, :, valid[1] == 0] = 0.0  # what padding after normalisation leaves there
    return images, valid


def reference(model, processor, images, valid, prompt=PROMPT):
    text = processor.tokenizer([prompt] * len(images), return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=images, pixel_mask=valid, **text, output_hidden_states=True)


@pytest.mark.parametrize("backbone", ["swin", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_converted_model_matches_transformers(saved, backbone):
    model, processor, _, _, _ = saved
    if backbone != "swin":
        model = random_hf_model(backbone)
    converted, report = convert_state_dict(model.state_dict(),
                                           args=model.config.to_dict())
    assert report.format == "huggingface_grounding_dino" and report.ok, report.problem()
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted, strict=True)
    images, valid = images_and_valid()
    expected = reference(model, processor, images, valid)
    with torch.no_grad():
        got = ours(images, valid == 0, prompt=tokenize(processor.tokenizer, PROMPT))
    for layer, (theirs, mine) in enumerate(zip(expected.encoder_vision_hidden_states[1:],
                                               got.encoder_states, strict=True)):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0, msg=f"encoder layer {layer}")
    torch.testing.assert_close(got.encoded.text.features,
                               expected.encoder_last_hidden_state_text, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(got.decoder_states, 1),
                               expected.intermediate_hidden_states, atol=1e-4, rtol=0)
    # -inf outside the text on both sides; the tokens' logits equal
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


def test_prompt_phrases_are_token_spans():
    vocab = tiny_vocab(Path(__import__("tempfile").mkdtemp()))
    tokenizer = transformers.BertTokenizer(vocab=vocab)
    prompt = tokenize(tokenizer, "Cat. Red car . dog")  # lowercased, a final " ." added
    assert prompt.text == "cat. red car . dog ."
    assert prompt.phrases == [("cat", [1]), ("red car", [3, 4]), ("dog", [6])]
    assert prompt.position_ids.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 0]
    # a phrase's tokens see each other and their "."; [CLS] and [SEP] only themselves
    assert prompt.attention[3].tolist() == [False, False, False, True, True, True, False,
                                            False, False]
    assert prompt.attention[0].sum() == 1 and prompt.attention[-1].sum() == 1


def test_detector_folder_finds_what_the_prompt_names(saved):
    """load_detector + set_prompt: labels are phrase indices, each score the best token of
    its phrase, ranked over queries x phrases; classes are named by the phrases."""
    model, processor, _, out, report = saved
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    detector = load_detector(out, top_k=10)
    detector.set_prompt(PROMPT)
    assert detector.classes["names"] == ["cat", "red car", "dog"]
    images, valid = images_and_valid()
    expected = reference(model, processor, images, valid)
    spans = [[1], [3, 4], [6]]
    phrase_logits = torch.stack([expected.logits[..., s].amax(-1) for s in spans], -1)
    scores, index = phrase_logits.sigmoid().flatten(1).topk(10, dim=1)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (detector.config.image_mean,
                                                          detector.config.image_std))
    pixels = images * std + mean  # FrozenDetector takes [0, 1] RGB and normalises it
    with torch.no_grad():
        got = detector([pixels[0], pixels[1, :, :80, :100]])
    torch.testing.assert_close(got.scores, scores, atol=1e-4, rtol=0)
    assert torch.equal(got.labels, index % 3)
    queries = torch.div(index, 3, rounding_mode="floor")
    boxes = expected.pred_boxes.gather(1, queries[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(got.boxes[0], boxes[0], atol=1e-4, rtol=0)
    assert got.memory.shape[-1] == 64 and got.c1.shape[1] == 16
    embedded = detector.embed_boxes([images[0]], [torch.tensor([[10.0, 10.0, 60.0, 50.0]])])
    assert embedded.queries.shape == (1, 1, 64) and 0 <= int(embedded.labels[0, 0]) < 3


def test_a_prompt_is_needed_and_refused_where_classes_are_fixed(saved, tmp_path):
    _, _, _, out, _ = saved
    detector = load_detector(out)
    with pytest.raises(ValueError, match="set_prompt"):
        detector(torch.rand(1, 3, 64, 64))
    closed = FrozenDetector(build_detector(
        __import__("artifacts").DINO_SMALL).eval())
    with pytest.raises(ValueError, match="fixed set of classes"):
        closed.set_prompt("cat .")


def test_a_folder_without_its_tokenizer_is_refused_in_one_line(saved, tmp_path):
    model, _, _, _, _ = saved
    model.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(ConversionError, match="tokenizer") as err:
        convert_checkpoint(tmp_path / "weights_only", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_cli_export_and_predict_take_a_prompt(saved, tmp_path):
    _, _, _, out, _ = saved
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (128, 96), (200, 40, 40)).save(images / "red.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(REPO_RECIPES / "ablations" / "table1_training_free.yaml"),
        "detector": {"path": str(out), "top_k": 5, "memory_layer": 1},
        "data": {"scale": 1.0, "num_workers": 0},
        "head": {"fuse_c1": False}}))  # C1 (16 wide) is not the tiny detector's width
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--recipe", str(recipe), "--images", str(images),
                                 "--out", str(tmp_path / "results.json"),
                                 "--prompt", "cat . dog ."])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 5 and {r["category_id"] for r in results} <= {0, 1}
    missing = runner.invoke(app, ["export", "--recipe", str(recipe), "--images", str(images),
                                  "--out", str(tmp_path / "none.json")])
    assert missing.exit_code != 0 and "detector.prompt is missing" in missing.output
    assert str(recipe) in missing.output and "--prompt" in missing.output
    result = runner.invoke(app, ["predict", str(images), "--recipe", str(recipe), "--out",
                                 str(tmp_path / "overlays"), "--prompt", "red car .",
                                 "--min-side", "0"])
    assert result.exit_code == 0, result.output


def test_convert_lists_the_format_and_writes_the_tokenizer(saved, tmp_path):
    result = CliRunner().invoke(app, ["convert", "--help"], terminal_width=200)
    assert "huggingface_grounding_dino" in " ".join(result.output.split())
    _, _, folder, _, _ = saved
    result = CliRunner().invoke(app, ["convert", "--detector", str(folder), "--out",
                                      str(tmp_path / "cli")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "huggingface_grounding_dino" in result.output and "tokenizer" in result.output
    assert (tmp_path / "cli" / "tokenizer" / "tokenizer_config.json").is_file()
