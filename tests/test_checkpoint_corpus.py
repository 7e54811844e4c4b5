"""Every format on files written the way their own projects write them (tests/artifacts.py).

Each artifact is inspected, converted and loaded back exactly as a user does it, and the
loaded detector must give the outputs of the model the file was written from. inspect and
convert must agree: a clean inspect means convert succeeds, and what inspect refuses,
convert refuses with the same line.
"""

from __future__ import annotations

import json

import pytest
import torch
from artifacts import CORPUS, DINO_SMALL, dino_checkpoint, share_heads
from typer.testing import CliRunner

from frozenseg.checkpoint import CheckpointError
from frozenseg.cli import app
from frozenseg.convert import convert_checkpoint, inspect_checkpoint
from frozenseg.detector.frozen import load_detector

pytest.importorskip("transformers")
runner = CliRunner()


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def images_and_padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images in one padded batch; the second is 70 x 90 of 96 x 128."""
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, 70:] = True
    padding[1, :, 90:] = True
    images[1, :, padding[1]] = 0.0
    return images, padding


@pytest.mark.parametrize("name", CORPUS)
def test_an_artifact_converts_and_reproduces_its_model(name, tmp_path):
    artifact = CORPUS[name](tmp_path / "source")
    _, inspected = inspect_checkpoint(artifact.path)
    assert inspected.ok and inspected.format == artifact.format, inspected.problem()
    # what the weights cannot say came from the file or the config saved beside it
    assert not [n for n in inspected.notes if "assumed" in n], inspected.notes
    report = convert_checkpoint(artifact.path, tmp_path / "converted")
    assert report.config == inspected.config
    if artifact.config is not None:
        assert report.config == artifact.config
    detector = load_detector(tmp_path / "converted")
    text = {}
    if artifact.prompt is not None:  # open vocabulary: the same prompt on both sides
        detector.set_prompt(artifact.prompt)
        text = {"prompt": detector.prompt}
    images, padding = images_and_padding()
    with torch.no_grad():
        got = detector.model(images, padding, **text)
    logits, boxes = artifact.reference(images, padding)
    torch.testing.assert_close(got.logits[-1], logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], boxes, atol=1e-4, rtol=0)


def test_the_shared_heads_of_a_dino_file_share_storage_on_disk(tmp_path):
    """The reproduction of the crash: the file really holds one storage for every head."""
    loaded = torch.load(dino_checkpoint(tmp_path).path, weights_only=False)["model"]
    pointers = {loaded[k].untyped_storage().data_ptr() for k in
                ("class_embed.0.weight", "class_embed.1.weight",
                 "transformer.decoder.class_embed.0.weight")}
    assert len(pointers) == 1


def test_inspect_names_the_weights_taken_and_the_cli_takes_the_other_copy(tmp_path):
    path = dino_checkpoint(tmp_path, shared=False, ema=True).path
    _, report = inspect_checkpoint(path)
    assert "weights from ckpt['ema_model']" in report.notes[0]
    assert "--weights model" in report.notes[0]
    result = runner.invoke(app, ["convert", "--detector", str(path), "--out",
                                 str(tmp_path / "raw"), "--weights", "model"])
    assert result.exit_code == 0, result.output
    raw = torch.load(path, weights_only=False)["model"]
    converted = load_detector(tmp_path / "raw").model.state_dict()
    assert torch.equal(converted["class_embed.1.weight"], raw["class_embed.1.weight"])


def test_a_folder_with_several_checkpoints_asks_for_one(tmp_path):
    dino_checkpoint(tmp_path)
    torch.save({}, tmp_path / "checkpoint0010.pth")
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "2 checkpoint files" in result.output and "checkpoint0010.pth" in result.output


class Evil:
    """A pickle that would run code when loaded: the safe loader must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    return dino_checkpoint(tmp_path_factory.mktemp("dino")).path


def _broken_files(path):
    """``path`` (a DINO checkpoint) broken in each way convert can meet."""
    ckpt = torch.load(path, weights_only=False)
    model = ckpt["model"]
    yield "truncated.pth", path.read_bytes()[: path.stat().st_size // 2], "truncated"
    yield "empty.pth", b"", "empty"
    yield "notes.pth", b"these are not weights\n", "text file"
    yield "evil.pth", {**ckpt, "hook": Evil()}, "refused to load"
    gone = "transformer.encoder.layers.0.linear1.weight"  # the FFN width is read from it
    missing = {k: v for k, v in model.items() if k != gone}
    yield "missing.pth", {**ckpt, "model": missing}, f"no key '{gone}'"
    reshaped = dict(model, **{"input_proj.1.1.weight": torch.zeros(32)})
    yield "reshaped.pth", {**ckpt, "model": reshaped}, "input_proj.1.1.weight"
    # one changed class head: the derived class count follows class_embed.0, so the other
    # layers' heads mismatch; the report must name class_embed.0, the real offender
    widened = dict(model)
    for key in [k for k in model if k.startswith(("class_embed.0.", "transformer.decoder."
                                                  "class_embed.0."))]:
        widened[key] = torch.cat([model[key], model[key][:1]])
    yield "widened.pth", {**ckpt, "model": widened}, "class_embed.0.weight"
    for nheads, what in (("eight", "config's nheads is 'eight': expected a positive integer"),
                         (0, "config's nheads is 0"), (3, "not a multiple of 3 heads")):
        args = dict(vars(ckpt["args"]), nheads=nheads)
        yield f"heads-{nheads}.pth", {**ckpt, "args": args}, what


@pytest.mark.parametrize("index", range(10))
def test_inspect_and_convert_refuse_a_broken_file_with_the_same_line(index, dino_file,
                                                                     tmp_path):
    name, content, mention = list(_broken_files(dino_file))[index]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    inspected = runner.invoke(app, ["inspect", str(path)])
    converted = runner.invoke(app, ["convert", "--detector", str(path), "--out",
                                    str(tmp_path / "out")])
    assert inspected.exit_code == converted.exit_code == 1
    errors = [[line for line in r.output.splitlines() if line.startswith("error:")]
              for r in (inspected, converted)]
    assert errors[0] == errors[1] and len(errors[0]) == 1, (inspected.output, converted.output)
    assert name in errors[0][0] and mention in errors[0][0], errors[0][0]
    assert "Traceback" not in inspected.output + converted.output
    assert not (tmp_path / "out").exists()


def test_heads_that_share_storage_are_written_once_each(tmp_path):
    """write_detector takes a state dict whose heads are views of one storage."""
    from frozenseg.detector.folder import write_detector
    from frozenseg.detector.model import build_detector

    model = build_detector(DINO_SMALL)
    shared = share_heads(model.state_dict(), across_layers=True, layers=DINO_SMALL.dec_layers)
    write_detector(tmp_path / "det", shared, DINO_SMALL, format="dino", source="test")
    loaded = load_detector(tmp_path / "det").model.state_dict()
    assert torch.equal(loaded["class_embed.1.weight"], shared["class_embed.0.weight"])


def test_a_missing_sharded_piece_is_one_line(tmp_path):
    artifact = CORPUS["huggingface-two-stage-sharded"](tmp_path / "hf")
    next(artifact.path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: no such file"):
        inspect_checkpoint(artifact.path)


def test_a_hugging_face_config_names_the_classes(tmp_path):
    """id2label of a fine-tuned model becomes the detector's class names (what export
    matches dataset categories by); transformers' LABEL_i placeholders name nothing."""
    artifact = CORPUS["huggingface-box-refine"](tmp_path / "hf")
    convert_checkpoint(artifact.path, tmp_path / "placeholders")
    assert load_detector(tmp_path / "placeholders").classes["names"] == [None] * 5
    config = json.loads((artifact.path / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(["a", "b", "N/A", "d", "e"])}
    (artifact.path / "config.json").write_text(json.dumps(config))
    convert_checkpoint(artifact.path, tmp_path / "named")
    assert load_detector(tmp_path / "named").classes["names"] == ["a", "b", None, "d", "e"]


@pytest.mark.parametrize(("name", "setting", "value"), [
    ("huggingface-rt-detr-v2", "decoder_method", "discrete"),
    ("huggingface-rt-detr-v2", "decoder_offset_scale", 1.0),
    ("huggingface-d-fine", "decoder_method", "discrete"),
    ("huggingface-d-fine", "eval_idx", 1),
])
def test_a_setting_frozenseg_does_not_reproduce_is_one_line(tmp_path, name, setting, value):
    """RT-DETR v2's and D-FINE's discrete sampling (or another offset scale, or D-FINE's
    output from an earlier layer): refused, naming the file and the setting."""
    artifact = CORPUS[name](tmp_path / "v2")
    config = json.loads((artifact.path / "config.json").read_text())
    (artifact.path / "config.json").write_text(json.dumps({**config, setting: value}))
    inspected = runner.invoke(app, ["inspect", str(artifact.path)])
    converted = runner.invoke(app, ["convert", "--detector", str(artifact.path), "--out",
                                    str(tmp_path / "out")])
    assert inspected.exit_code == converted.exit_code == 1
    errors = [[line for line in r.output.splitlines() if line.startswith("error:")]
              for r in (inspected, converted)]
    assert errors[0] == errors[1] and len(errors[0]) == 1, (inspected.output, converted.output)
    assert "model.safetensors" in errors[0][0] and f"{setting}={value!r}" in errors[0][0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "setting", "value"), [
    ("huggingface-detr", "position_embedding_type", "learned"),
    ("huggingface-dab-detr", "temperature_height", 10000),
])
def test_a_plain_detr_setting_frozenseg_does_not_compute_is_one_line(tmp_path, name, setting,
                                                                     value):
    """DETR's learned positions, DAB-DETR's unequal temperatures: refused, naming the file
    and the setting, and nothing is written."""
    artifact = CORPUS[name](tmp_path / "source")
    config = json.loads((artifact.path / "config.json").read_text())
    (artifact.path / "config.json").write_text(json.dumps({**config, setting: value}))
    converted = runner.invoke(app, ["convert", "--detector", str(artifact.path), "--out",
                                    str(tmp_path / "out")])
    assert converted.exit_code == 1
    errors = [line for line in converted.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0], converted.output
    assert f"{setting}={value!r}" in errors[0]
    assert not (tmp_path / "out").exists()
