"""Recipes: one YAML file (with its bases) plus ``key=value`` overrides -> a typed Recipe.

:mod:`frozenseg.recipe.schema` is what a recipe holds (the sections, defaults and checks);
:mod:`frozenseg.recipe.loader` reads, merges, overrides, validates and writes them. What a
recipe builds (a head, a detector, a task) is built by those parts, not here.
"""

from frozenseg.recipe.loader import (
    load_recipe,
    parse_override,
    recipe_differences,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)
from frozenseg.recipe.schema import Recipe, RecipeError

__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_override", "recipe_differences",
           "recipe_from_dict", "recipe_to_dict", "save_recipe"]
