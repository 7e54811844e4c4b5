"""Recipes: bases and deep merge, overrides, the errors' wording, save/load, shipped recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.folder import CONFIG_FILE, DetectorFolderError, write_detector
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector
from frozenseg.head.network import build_mask_head
from frozenseg.head.task import recipe_detector
from frozenseg.recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    parse_override,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)
from frozenseg.recipe.head import HeadConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MINIMAL = {
    "detector": {"path": "detectors/x"},
    "data": {"train": {"images": "tr", "annotations": "tr.json"},
             "val": {"images": "va", "annotations": "va.json"}},
    "train": {"output_dir": "runs/x"},
}


def write(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def minimal(tmp_path: Path, **sections) -> Path:
    return write(tmp_path, "recipe.yaml", {**MINIMAL, **sections})


def error(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- bases


def test_defaults_fill_what_a_recipe_leaves_out(tmp_path):
    recipe = load_recipe(minimal(tmp_path))
    assert recipe.head == HeadConfig()
    assert recipe.train.lr == 1.5e-4 and recipe.train.betas == (0.9, 0.999)
    assert recipe.train.lr_drops == (0.9, 0.95) and recipe.train.iterations == 88_500
    assert recipe.detector.memory_layer == 4 and recipe.detector.finetune == "frozen"
    assert recipe.data.cache is None and recipe.mode == "head"


def test_bases_chain_and_deep_merge(tmp_path):
    write(tmp_path, "common/grand.yaml", {**MINIMAL, "head": {"roi_size": 64, "neck": False},
                                          "train": {"output_dir": "g", "lr_drops": [0.5, 0.7]}})
    write(tmp_path, "common/mid.yaml", {"base": "grand.yaml", "head": {"roi_size": 16},
                                        "data": {"train": {"images": "mid_images"}}})
    write(tmp_path, "common/other.yaml", {"train": {"batch_size": 2, "seed": 7}})
    child = write(tmp_path, "variants/child.yaml",
                  {"base": ["../common/mid.yaml", "../common/other.yaml"],
                   "train": {"seed": 1, "lr_drops": [0.8]}})
    recipe = load_recipe(child)
    assert recipe.head.roi_size == 16 and recipe.head.neck is False     # mid over grand
    assert recipe.data.train == type(recipe.data.train)("mid_images", "tr.json")  # merged
    assert recipe.train.batch_size == 2 and recipe.train.seed == 1     # later base, then child
    assert recipe.train.lr_drops == (0.8,)                             # lists replace
    assert recipe.train.output_dir == "g"


def test_a_later_base_wins_over_an_earlier_one(tmp_path):
    write(tmp_path, "a.yaml", {**MINIMAL, "train": {"output_dir": "a", "lr": 1.0e-3}})
    write(tmp_path, "b.yaml", {"train": {"lr": 2.0e-3}})
    assert load_recipe(write(tmp_path, "c.yaml", {"base": ["a.yaml", "b.yaml"]})).train.lr == 2e-3
    assert load_recipe(write(tmp_path, "d.yaml", {"base": ["b.yaml", "a.yaml"]})).train.lr == 1e-3


def test_base_cycle_names_the_files(tmp_path):
    write(tmp_path, "a.yaml", {**MINIMAL, "base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    message = error(tmp_path / "a.yaml")
    assert "cycle" in message and "a.yaml -> " in message and "b.yaml -> " in message
    assert "cycle" in error(write(tmp_path, "self.yaml", {**MINIMAL, "base": "self.yaml"}))


def test_missing_base_names_the_recipe_and_the_base(tmp_path):
    message = error(write(tmp_path, "x.yaml", {**MINIMAL, "base": "nope.yaml"}))
    assert "x.yaml" in message and "nope.yaml" in message


def test_bad_yaml_and_non_mapping_name_the_file(tmp_path):
    assert "bad.yaml:3: not valid YAML" in error(write(tmp_path, "bad.yaml", "a:\n  b: 1\n  - c\n"))
    assert "list.yaml" in error(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


# ----------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml_values(tmp_path):
    recipe = load_recipe(minimal(tmp_path, data={**MINIMAL["data"], "cache": "c"}), [
        "train.lr=1e-4", "train.batch_size=2", "data.cache=null", "train.lr_drops=[0.5, 0.75]",
        "head.neck=false", "head.image_encoder=swin", "data.train.images=/d/train2017",
        "train.precision=no", "train.max_minutes=2.5", "loss.bce_weight=2",
    ])
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.train.batch_size == 2 and recipe.data.cache is None
    assert recipe.train.lr_drops == (0.5, 0.75) and recipe.head.neck is False
    assert recipe.head.image_encoder == "swin" and recipe.data.train.images == "/d/train2017"
    assert recipe.data.train.annotations == "tr.json"   # the sibling key is kept
    assert recipe.train.precision == "no" and recipe.train.max_minutes == 2.5
    assert recipe.loss.bce_weight == 2.0 and isinstance(recipe.loss.bce_weight, float)


def test_yaml_1_2_scalars_in_files(tmp_path):
    path = minimal(tmp_path, train={"output_dir": "o"})
    path.write_text(path.read_text() + "loss:\n  importance: 5e-1\n")
    write(tmp_path, "p.yaml", "base: recipe.yaml\ntrain:\n  precision: no\n  lr: 2e-4\n")
    recipe = load_recipe(tmp_path / "p.yaml")
    assert recipe.train.precision == "no" and recipe.train.lr == 2e-4
    assert recipe.loss.importance == 0.5


def test_deeply_nested_yaml_is_one_line(tmp_path):
    """The YAML parser recurses: 100,000 nested '[' were a RecursionError."""
    path = tmp_path / "deep.yaml"
    path.write_text("train: " + "[" * 100_000)
    assert error(path) == f"{path}: not valid YAML (nested too deeply)"


def test_parse_override():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a= text with = sign") == ("a", "text with = sign")
    assert parse_override("a=") == ("a", None)
    for bad in ("train.lr", "=1", "train..lr=1"):
        with pytest.raises(RecipeError, match="command line"):
            parse_override(bad)


def test_override_into_a_value_is_refused(tmp_path):
    message = error(minimal(tmp_path), ["train.lr.x=1"])
    assert message.startswith("command line:") and "train.lr" in message


# ----------------------------------------------------------------------------- errors


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    write(tmp_path, "recipes/base.yaml", {**MINIMAL, "head": {"image_encodr": "swin"}})
    child = write(tmp_path, "recipes/x.yaml", {"base": "base.yaml"})
    message = error(child)
    assert message == (f"{tmp_path / 'recipes/base.yaml'}: unknown key head.image_encodr "
                       "(did you mean head.image_encoder?)")


def test_unknown_key_from_the_command_line(tmp_path):
    message = error(minimal(tmp_path), ["train.learning_rat=1"])
    assert message.startswith("command line: unknown key train.learning_rat")
    assert "(valid keys: train.output_dir, train.batch_size" in message
    message = error(minimal(tmp_path), ["haed.roi_size=16"])
    assert message == "command line: unknown key haed (did you mean head?)"


def test_missing_key_is_named(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    del data["data"]["train"]["annotations"]
    assert "missing key data.train.annotations" in error(write(tmp_path, "r.yaml", data))


def test_head_mode_needs_a_detector(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    del data["detector"]
    assert "detector.path must be a converted detector folder" in error(
        write(tmp_path, "r.yaml", data))


@pytest.mark.parametrize("override, expected", [
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("train.lr='1e-4'", "train.lr must be a number, got '1e-4'"),
    ("train.batch_size=2.0", "train.batch_size must be an integer, got 2.0"),
    ("train.batch_size=true", "train.batch_size must be an integer, got True"),
    ("head.neck=yes", "head.neck must be true or false, got 'yes'"),
    ("data.cache=5", "data.cache must be a string or null, got 5"),
    ("train.betas=[0.9]", "train.betas must be a list of 2 numbers, got [0.9]"),
    ("train.lr_drops=0.9", "train.lr_drops must be a list of numbers, got 0.9"),
    ("data.train=x", "data.train must be a mapping of keys, got 'x'"),
])
def test_type_errors_name_key_expected_and_got(tmp_path, override, expected):
    assert error(minimal(tmp_path), [override]) == f"command line: {expected}"


@pytest.mark.parametrize("override, expected", [
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.lr=-.inf", "train.lr must be a finite number, got -inf"),
    ("train.lr=.nan", "train.lr must be a finite number, got nan"),
    ("train.grad_clip=.inf", "train.grad_clip must be a finite number, got inf"),
    ("loss.bce_weight=.inf", "loss.bce_weight must be a finite number, got inf"),
    ("train.lr=-1e-4", "train.lr must be positive, got -0.0001"),
    ("train.lr=0", "train.lr must be positive, got 0.0"),
    ("train.iterations=0", "train.iterations must be at least 1, got 0"),
])
def test_numbers_must_be_finite_and_in_range(tmp_path, override, expected):
    assert error(minimal(tmp_path), [override]) == f"command line: {expected}"


def test_type_error_in_a_file_names_the_file(tmp_path):
    path = minimal(tmp_path, eval={"max_per_image": "many"})
    assert error(path) == f"{path}: eval.max_per_image must be an integer, got 'many'"


def test_enum_errors_name_the_choices(tmp_path):
    path = minimal(tmp_path)
    assert error(path, ["data.transform=jitter"]) == (
        "command line: data.transform is 'jitter'; one of deformable_detr, lsj, evaluation")
    assert "one of frozen, partial, full" in error(path, ["detector.finetune=all"])
    assert "one of no, fp16, bf16" in error(path, ["train.precision=fp8"])


def test_head_config_checks_are_wrapped_with_the_file(tmp_path):
    path = minimal(tmp_path, head={"image_encoder": "swim"})
    message = error(path)
    assert message.startswith(f"{path}: head.image_encoder is 'swim'")
    assert "deformable" in message


def test_range_checks(tmp_path):
    path = minimal(tmp_path)
    assert "train.lr_drops must be increasing" in error(path, ["train.lr_drops=[0.95, 0.9]"])
    assert "loss.points_fraction must be in (0, 1]" in error(path, ["loss.points_fraction=0"])
    assert error(path, ["detector.top_k=0"]).startswith("command line: detector.top_k")


def joint_minimal(tmp_path: Path, **sections) -> Path:
    plain = {key: value for key, value in MINIMAL.items() if key != "detector"}
    return write(tmp_path, "recipe.yaml", {**plain, "mode": "maskdino", **sections})


def test_a_recipe_holds_its_modes_sections_and_no_other(tmp_path):
    head = load_recipe(minimal(tmp_path))
    assert head.maskdino is None and head.loss is not None and head.eval is not None
    joint = load_recipe(joint_minimal(tmp_path), ["maskdino.task=instance"])
    assert (joint.detector, joint.head, joint.loss, joint.eval) == (None, None, None, None)
    assert "maskdino" in recipe_to_dict(joint) and "head" not in recipe_to_dict(joint)
    assert "maskdino" not in recipe_to_dict(head)
    message = error(minimal(tmp_path, mode="maskdino"))
    assert message.endswith("recipe.yaml: detector is a section of mode head, not of mode "
                            "maskdino: leave it out")
    assert error(minimal(tmp_path), ["maskdino.num_queries=10"]).startswith(
        "command line: maskdino is a section of mode maskdino, not of mode head")


def test_a_checkpoints_older_recipe_with_every_section_still_loads(tmp_path):
    everything = {**recipe_to_dict(load_recipe(minimal(tmp_path))),
                  "maskdino": {"num_queries": 10}}
    assert recipe_from_dict(everything, "old.pt").maskdino is None
    joint = {**everything, "mode": "maskdino", "data": {**everything["data"]}}
    assert recipe_from_dict(joint, "old.pt", ["maskdino.task=instance"]).head is None


def test_maskdino_mode_needs_panoptic_data_for_the_panoptic_task(tmp_path):
    path = joint_minimal(tmp_path)
    assert "data.train.panoptic must be a COCO panoptic json" in error(path)
    recipe = load_recipe(path, ["maskdino.task=instance"])
    assert recipe.maskdino.dec_layers == 9 and recipe.maskdino.num_queries == 300
    assert "given together with panoptic" in error(path, ["data.train.panoptic=p.json"])


# ----------------------------------------------------------------------------- saving


def test_save_then_load_gives_an_equal_recipe(tmp_path):
    recipe = load_recipe(RECIPES / "synth_tiny.yaml",
                         ["train.lr=1e-4", "head.image_encoder=convnext", "data.cache=null"])
    out = tmp_path / "run" / "recipe.yaml"
    save_recipe(recipe, out)
    assert load_recipe(out) == recipe
    assert "base" not in yaml.safe_load(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["recipe.yaml"]   # no temporary left
    plain = recipe_to_dict(recipe)
    assert plain["train"]["betas"] == [0.9, 0.999] and plain["mode"] == "head"
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


# ----------------------------------------------------------------------------- shipped


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.train.output_dir
    assert recipe.detector.path if recipe.mode == "head" else recipe.maskdino.model


def test_base_is_the_papers_final_model():
    recipe = load_recipe(RECIPES / "base.yaml")
    head = recipe.head
    assert (head.image_encoder, head.image_encoder_layers) == ("deformable", 2)   # Table 2
    assert (head.box_encoder, head.box_encoder_layers) == ("deformable", 2)       # Table 3
    assert head.mapper_dim == 128 and head.roi_size == 32                         # Tables 4, 9
    assert head.neck and head.mask_scoring and recipe.loss.points_fraction == 0.25  # Table 6
    assert head.mask_head == "dot" and recipe.detector.memory_layer == 4          # Tables 12, 14
    assert not head.query_self_attention and head.query_cross_attention           # Table 5
    assert recipe.data.transform == "deformable_detr" and recipe.train.batch_size == 8
    large = load_recipe(RECIPES / "mask_frozen_dino_focalnetl.yaml").head          # Table 15
    assert (large.image_encoder_layers, large.box_encoder_layers) == (3, 2)


# ----------------------------------------------------------------------------- the head


def test_a_missing_detector_is_named(tmp_path):
    recipe = load_recipe(minimal(tmp_path), [f"detector.path={tmp_path / 'nowhere'}"])
    with pytest.raises(DetectorFolderError, match=r"nowhere: not a detector folder"):
        recipe_detector(recipe)
    (tmp_path / "empty").mkdir()
    recipe.detector.path = str(tmp_path / "empty")
    with pytest.raises(DetectorFolderError, match=rf"empty/{CONFIG_FILE} is missing"):
        recipe_detector(recipe)


def meta_detector(**config) -> FrozenDetector:
    """A detector of real shapes without memory or weights."""
    with torch.device("meta"):
        return FrozenDetector(build_detector(DetectorConfig(**config)))


def test_head_dims_without_weights():
    assert meta_detector().head_dims == {"hidden_dim": 256, "num_levels": 4, "c1_channels": 256,
                                        "memory_stride": 8}
    swin_l = {"name": "swin", "embed_dim": 192, "depths": (2, 2, 18, 2),
              "num_heads": (6, 12, 24, 48), "window_size": 12}
    assert meta_detector(backbone=swin_l).head_dims["c1_channels"] == 192


def test_public_api():
    import frozenseg.head.network
    import frozenseg.recipe

    assert frozenseg.load_recipe is frozenseg.recipe.load_recipe
    assert frozenseg.build_mask_head is frozenseg.head.network.build_mask_head


def test_the_recipe_head_on_a_converted_detector(tmp_path):
    """A detector folder as convert writes it, loaded through the recipe; the head is sized
    by the loaded detector."""
    swin = {"name": "swin", "embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8),
            "window_size": 7}
    config = DetectorConfig(backbone=swin, hidden_dim=64, nheads=4, enc_layers=2,
                            dec_layers=2, dim_feedforward=32, num_queries=10, num_classes=5)
    model = build_detector(config)
    write_detector(tmp_path / "det", model.state_dict(), config, format="test", source="x")
    recipe = load_recipe(RECIPES / "synth_tiny.yaml", [f"detector.path={tmp_path / 'det'}"])
    detector = recipe_detector(recipe)
    assert (detector.top_k, detector.memory_layer) == (recipe.detector.top_k,
                                                        recipe.detector.memory_layer or 2)
    head = build_mask_head(recipe.head, **detector.head_dims)
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) > 0
    assert head(detector([torch.rand(3, 64, 96)])).mask_logits.isfinite().all()


def readme_rows() -> list[list[str]]:
    """The recipe-and-overrides column of recipes/README.md's table of the paper's rows."""
    text = (RECIPES / "README.md").read_text()
    table = text[text.index("## Reproducing the paper's tables"):]
    return [span.split() for span in re.findall(r"`(recipes/[^`]+)`", table)]


def test_readme_covers_every_table():
    text = (RECIPES / "README.md").read_text()
    tables = re.findall(r"^\| (\d+) ", text, flags=re.MULTILINE)
    assert sorted(set(map(int, tables))) == list(range(1, 17))
    assert len(readme_rows()) >= 70


@pytest.mark.filterwarnings("ignore:MSDeformAttn head dim")   # Table 4's 96 channels
def test_every_readme_row_loads_and_builds():
    hdetr_r50 = meta_detector(variant="h_deformable_detr", query_init="mixed", box_refine=True)
    for path, *overrides in readme_rows():
        recipe = load_recipe(RECIPES.parent / path, overrides)
        with torch.device("meta"):  # the full-size heads, without their memory
            assert build_mask_head(recipe.head, **hdetr_r50.head_dims) is not None, (path,
                                                                                    overrides)


def test_the_ablation_chain_ends_at_the_final_model():
    chained = load_recipe(RECIPES / "ablations/table5_query_encoder.yaml", [
        "head.neck=true", "loss.points_fraction=0.25", "head.mask_scoring=true",
        "train.output_dir=runs/mask_frozen_hdetr_r50"])
    assert chained == load_recipe(RECIPES / "mask_frozen_hdetr_r50.yaml")
