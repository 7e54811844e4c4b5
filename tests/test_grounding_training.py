"""A mask head trained on Grounding DINO: the recipe's detector.prompt names what the frozen
detector finds, its phrases are the classes (matched to the dataset's categories by name),
the prompt is part of the feature cache's identity and travels with the trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_convert_grounding_dino import grounding_folder
from typer.testing import CliRunner

from frozenseg import MaskFrozenDETR, Predictor
from frozenseg.cache import CacheError, recipe_cache_job, write_cache
from frozenseg.cli import app
from frozenseg.convert import convert_checkpoint
from frozenseg.data.coco import CocoInstances
from frozenseg.detector.classes import classes_for
from frozenseg.engine.train import Trainer
from frozenseg.head.task import recipe_detector
from frozenseg.recipe import RecipeError
from tests.tiny import recipe

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# The synthetic shapes' category names (frozenseg.data.synth.THINGS), in their order.
SHAPES = "ellipse . rectangle . triangle . ring . star . cross . c_shape . dot_pair ."


@pytest.fixture(scope="module")
def gdino(tmp_path_factory):
    """A tiny random Grounding DINO, converted: its folder."""
    folder = tmp_path_factory.mktemp("gdino") / "hf"
    grounding_folder(folder)
    convert_checkpoint(folder, folder.parent / "converted")
    return folder.parent / "converted"


def prompted(tmp_path, data, detector, prompt: str | None = SHAPES, *overrides):
    """The tiny recipe on ``detector`` with ``prompt``, caching into tmp_path/cache."""
    return recipe(tmp_path, data, detector, *overrides, detector={"prompt": prompt},
                  data={"cache": str(tmp_path / "cache")},
                  train={"iterations": 2, "checkpoint_every": 0})


def test_the_prompts_phrases_are_the_datasets_categories(gdino, data, tmp_path):
    detector = recipe_detector(prompted(tmp_path, data, gdino))
    dataset = CocoInstances(data / "images" / "train", data / "instances_train.json")
    assert detector.classes["names"] == dataset.category_names  # "c_shape", not "c _ shape"
    mapping, _ = classes_for(detector.classes, dataset.category_ids, dataset.category_names)
    assert mapping.category_ids == dataset.category_ids


def test_cache_train_and_predict_with_the_recipes_prompt(gdino, data, tmp_path):
    r = prompted(tmp_path, data, gdino)
    runner, path = CliRunner(), str(tmp_path / "recipe.yaml")
    result = runner.invoke(app, ["cache", path])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["recipe"]["detector"]["prompt"] == SHAPES
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 0, result.output
    model = MaskFrozenDETR.from_pretrained(tmp_path / "run" / "last.pt", device="cpu")
    predictor = Predictor(model)
    predictor.set_image(np.full((96, 128, 3), 200, dtype=np.uint8))
    found = predictor.predict()
    assert found.masks.shape == (r.detector.top_k, 96, 128)
    assert int(found.labels.max()) < 8
    saved = MaskFrozenDETR.from_pretrained(model.save_pretrained(tmp_path / "saved"),
                                           device="cpu")
    assert saved.detector.prompt.text == SHAPES
    assert saved.detector.classes == model.detector.classes


@pytest.mark.filterwarnings("ignore:the detector has no class")  # two phrases of eight
def test_a_cache_of_another_prompt_is_not_reused(gdino, data, tmp_path):
    write_cache(**recipe_cache_job(prompted(tmp_path, data, gdino, "ring . star .")))
    with pytest.raises(CacheError, match="prompt 'ring . star .'"):
        Trainer(prompted(tmp_path, data, gdino), log=lambda _: None, evaluate=False)
    with pytest.raises(CacheError, match="another recipe"):
        write_cache(**recipe_cache_job(prompted(tmp_path, data, gdino)), resume=True)


def test_a_missing_or_needless_prompt_is_one_line_naming_the_recipe(gdino, data, detector_dir,
                                                                    tmp_path):
    runner = CliRunner()
    for folder, detector, prompt, message in (
            ("none", gdino, None, "detector.prompt is missing"),
            ("closed", detector_dir, "cat .", "fixed set of classes")):
        prompted(tmp_path / folder, data, detector, prompt)
        path = str(tmp_path / folder / "recipe.yaml")
        for command in (["cache", path], ["train", path], ["eval", path]):
            result = runner.invoke(app, command)
            assert result.exit_code == 1, result.output
            assert message in result.output and path in result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
        with pytest.raises(RecipeError, match=message):
            recipe_detector(prompted(tmp_path / folder, data, detector, prompt))
    with pytest.raises(RecipeError, match="recipe.yaml: detector.prompt must be phrases"):
        prompted(tmp_path, data, gdino, " . ")
