"""The recipes frozenseg ships: the top-level ``recipes/`` of a checkout, installed inside
the package as ``frozenseg/_recipes``, so ``frozenseg train mask_frozen_hdetr_r50`` finds
one by name wherever frozenseg is installed (``frozenseg recipes`` lists them)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

SUFFIX = ".yaml"


def packaged_dir() -> Path | None:
    """recipes/ beside the package in a checkout, else the installed copy; None if neither."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package.parent / "recipes", package / "_recipes"):
        if (folder / "base.yaml").is_file():
            return folder
    return None


def packaged_recipes() -> dict[str, Path]:
    """Name (the path under recipes/ without .yaml, e.g. ``ablations/table2_image_encoder``)
    -> file, sorted by name."""
    folder = packaged_dir()
    if folder is None:
        return {}
    found = {p.relative_to(folder).with_suffix("").as_posix(): p
             for p in folder.rglob(f"*{SUFFIX}")}
    return dict(sorted(found.items()))


def resolve_recipe(name: str | os.PathLike) -> Path:
    """A recipe file: ``name`` itself when it exists, else the packaged recipe of that name
    (``.yaml`` optional). Raises FileNotFoundError naming the closest packaged names."""
    path = Path(name)
    if path.is_file():
        return path
    recipes = packaged_recipes()
    key = path.as_posix().removeprefix("recipes/").removesuffix(SUFFIX)
    if key in recipes:
        return recipes[key]
    close = difflib.get_close_matches(key, list(recipes), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        "; frozenseg recipes lists the packaged ones")
    raise FileNotFoundError(f"{name}: no such recipe file or packaged recipe{hint}")


def describe(path: Path) -> str:
    """A recipe's first comment line: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
