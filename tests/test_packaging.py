"""The wheel, as `pip install frozenseg` would install it (not editable): every package,
the kernels' sources, the shipped detector, the recipes by name, the training modes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds and installs a wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                            "-w", str(out), "-q"], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1:]}")
    return next(out.glob("frozenseg-*.whl"))


def test_the_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "frozenseg").rglob("*.py")}
    missing = sorted(p for p in packages if not any(n.startswith(p + "/") for n in names))
    assert not missing, f"packages left out of the wheel (pyproject's packages list): {missing}"
    shipped = {f"frozenseg/_cuda/{p.name}" for p in (ROOT / "cuda").iterdir()}
    shipped |= {f"frozenseg/_recipes/{p.relative_to(ROOT / 'recipes').as_posix()}"
                for p in (ROOT / "recipes").rglob("*") if p.is_file()}
    shipped.add("frozenseg/assets/synth_dino.pth")
    assert not shipped - names, sorted(shipped - names)


def test_the_installed_wheel_finds_recipes_by_name_and_its_modes(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    probe = f"""
import sys
sys.path.insert(0, {str(site)!r})
import frozenseg
assert frozenseg.__file__.startswith({str(site)!r}), frozenseg.__file__
from frozenseg.recipe import load_recipe
from frozenseg.recipe.packaged import packaged_dir, resolve_recipe
from frozenseg.ops.build import source_dir
assert packaged_dir() == __import__("pathlib").Path({str(site)!r}) / "frozenseg" / "_recipes"
recipe = load_recipe("ablations/table2_image_encoder", ["detector.path=x"])
assert recipe.head.image_encoder_layers == 2
assert resolve_recipe("mask_frozen_hdetr_r50.yaml").parent == packaged_dir()
assert (source_dir() / "ms_deform_attn_sampling.h").is_file()
from frozenseg.engine.task import modes
assert {{"head", "maskdino"}} <= set(modes())
"""
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
