"""frozenseg convert / inspect end to end, and every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from frozenseg import load_detector
from frozenseg.cli import app
from frozenseg.convert import convert_state_dict
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A Hugging Face checkpoint folder: pytorch_model.bin + config.json, as on the hub."""
    from test_convert_huggingface import random_hf_model

    model, args = random_hf_model(two_stage=True, with_box_refine=True)
    folder = tmp_path_factory.mktemp("hf")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(args))
    return folder / "pytorch_model.bin", model.state_dict(), args


def test_convert_writes_a_detector_that_loads_and_matches(hf_checkpoint, tmp_path):
    path, state_dict, args = hf_checkpoint
    out = tmp_path / "detectors" / "ddetr"
    result = runner.invoke(app, ["convert", "--detector", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "huggingface" in result.output and "renamed" in result.output
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"] == "pytorch_model.bin" and len(meta["sha256"]) == 64

    converted, report = convert_state_dict(state_dict, args=args)
    reference = FrozenDetector(build_detector(report.config))
    reference.model.load_state_dict(converted)
    image = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))]
    loaded, expected = load_detector(out)(image), reference(image)
    torch.testing.assert_close(loaded.boxes, expected.boxes, rtol=0, atol=0)
    torch.testing.assert_close(loaded.queries, expected.queries, rtol=0, atol=0)


def test_inspect_reports_without_writing(hf_checkpoint, tmp_path):
    result = runner.invoke(app, ["inspect", str(hf_checkpoint[0])])
    assert result.exit_code == 0, result.output
    assert "query_init" in result.output and "proposals" in result.output


def _fails_cleanly(args, *, mentions):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and all(m in error[0] for m in mentions), result.output


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    _fails_cleanly(["convert", "--detector", str(path), "--out", str(tmp_path / "out")],
                   mentions=["notes.pth"])
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(hf_checkpoint, tmp_path):
    path = tmp_path / "half.pth"
    data = hf_checkpoint[0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _fails_cleanly(["convert", "--detector", str(path), "--out", str(tmp_path / "out")],
                   mentions=["half.pth"])


def test_unknown_format_names_the_closest_and_its_missing_keys(tmp_path):
    path = tmp_path / "yolo.pth"
    torch.save({"model": {"model.level_embed": torch.zeros(4, 8), "head.w": torch.zeros(2)}},
               path)
    _fails_cleanly(["convert", "--detector", str(path), "--out", str(tmp_path / "out")],
                   mentions=["yolo.pth", "closest is huggingface", "class_embed"])


def test_shape_mismatch_writes_nothing(hf_checkpoint, tmp_path):
    _, state_dict, args = hf_checkpoint
    broken = dict(state_dict)
    broken["model.input_proj.1.1.weight"] = torch.zeros(32)
    path = tmp_path / "broken.pth"
    torch.save({"model": broken, "args": args}, path)
    _fails_cleanly(["convert", "--detector", str(path), "--out", str(tmp_path / "out")],
                   mentions=["broken.pth", "input_proj.1.1.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


def test_an_existing_out_is_replaced_only_when_frozenseg_wrote_it_and_asked(
        hf_checkpoint, tmp_path, monkeypatch):
    """A folder of the user's, a file, or the working folder are never touched; a detector
    folder convert wrote is replaced with --overwrite only."""
    path = str(hf_checkpoint[0])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    (tmp_path / "file").write_text("precious")
    monkeypatch.chdir(mine)
    for out in (mine, tmp_path / "file", "."):
        for extra in ([], ["--overwrite"]):
            _fails_cleanly(["convert", "--detector", path, "--out", str(out), *extra],
                           mentions=["exists", "choose a new --out"])
    assert (mine / "keep.txt").read_text() == "precious"
    assert (tmp_path / "file").read_text() == "precious"

    out = tmp_path / "det"
    assert runner.invoke(app, ["convert", "--detector", path, "--out", str(out)]).exit_code == 0
    before = (out / "detector.safetensors").read_bytes()
    _fails_cleanly(["convert", "--detector", path, "--out", str(out)],
                   mentions=["already holds a converted detector", "--overwrite"])
    result = runner.invoke(app, ["convert", "--detector", path, "--out", str(out),
                                 "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "detector.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det", "file", "mine"]


def test_wrong_class_count(hf_checkpoint, tmp_path):
    _fails_cleanly(["convert", "--detector", str(hf_checkpoint[0]), "--out",
                    str(tmp_path / "out"), "--num-classes", "80"],
                   mentions=["pytorch_model.bin", "5 classes, not 80"])


def test_class_names_are_checked_and_saved(hf_checkpoint, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    _fails_cleanly(["convert", "--detector", str(hf_checkpoint[0]), "--out",
                    str(tmp_path / "out"), "--class-names", str(names)],
                   mentions=["3 class names", "5 classes"])
    names.write_text(json.dumps(["a", "b", "c", "d", "e"]))
    result = runner.invoke(app, ["convert", "--detector", str(hf_checkpoint[0]), "--out",
                                 str(tmp_path / "out"), "--class-names", str(names)])
    assert result.exit_code == 0, result.output
    classes = load_detector(tmp_path / "out").classes
    assert classes == {"names": ["a", "b", "c", "d", "e"], "category_ids": [0, 1, 2, 3, 4]}


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": Evil()}, path)
    _fails_cleanly(["convert", "--detector", str(path), "--out", str(tmp_path / "out")],
                   mentions=["evil.pth", "--trust-checkpoint"])
    assert not (tmp_path / "ran").exists()


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_training_config_file_supplies_what_the_weights_cannot(hf_checkpoint, tmp_path):
    """A YAML config with detectron2-style Python tags is read, the tags never run."""
    from frozenseg.convert import inspect_checkpoint

    bare = tmp_path / "weights.pth"  # no config.json beside it
    bare.write_bytes(hf_checkpoint[0].read_bytes())
    _, report = inspect_checkpoint(bare)
    assert report.config.num_queries == 300 and report.notes  # assumed, and said so
    config = tmp_path / "config.yaml"
    config.write_text("two_stage_num_proposals: 12\nencoder_attention_heads: 2\n"
                      "activation: !!python/name:os.system ''\n")
    result = runner.invoke(app, ["inspect", str(bare), "--config", str(config)])
    assert result.exit_code == 0, result.output
    _, report = inspect_checkpoint(bare, config=config)
    assert report.config.num_queries == 12
    config.write_text("[unclosed")
    _fails_cleanly(["inspect", str(bare), "--config", str(config)],
                   mentions=["config.yaml", "not a readable"])


def test_the_help_names_every_format_and_shows_flags_as_flags():
    from frozenseg.formats import FORMATS

    for command in ("convert", "inspect"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert all(name in result.output for name in FORMATS), result.output
        line = next(x for x in result.output.splitlines() if "--trust-checkpoint" in x)
        assert "<bool>" not in line and "see frozenseg inspect" not in result.output


def test_brackets_in_paths_are_printed_as_they_are(hf_checkpoint, tmp_path):
    """Rich markup never eats a user's brackets in the report or the written paths."""
    path = tmp_path / "[bold]run" / "[bold]model.bin"
    path.parent.mkdir()
    path.write_bytes(hf_checkpoint[0].read_bytes())
    (path.parent / "config.json").write_text(json.dumps(hf_checkpoint[2]))
    out = tmp_path / "[red]out"
    result = runner.invoke(app, ["convert", "--detector", str(path), "--out", str(out)],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'detector.safetensors'}" in result.output
    assert "format: huggingface ([bold]model.bin, sha256" in result.output


def test_a_deeply_nested_class_names_file_is_one_line(hf_checkpoint, tmp_path):
    names = tmp_path / "names.json"
    names.write_text("[" * 100_000)
    _fails_cleanly(["convert", "--detector", str(hf_checkpoint[0]), "--out",
                    str(tmp_path / "out"), "--class-names", str(names)],
                   mentions=["1 class names", "5 classes"])
