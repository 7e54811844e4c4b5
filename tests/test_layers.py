"""The import graph keeps its layers: a package imports only the packages below it (lazy
imports inside functions included), so there is no loop and the engine knows no mode."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "frozenseg"

# Bottom to top. The engine's loop sits below the modes (head, maskdino) that plug into it.
LAYERS = [
    "assets", "files", "boxes", "losses", "checkpoint", "ops", "detector", "formats", "convert",
    "data", "recipe", "evaluation", "engine", "cache", "head", "maskdino", "demo", "doctor",
    "cli", "__main__",
]


def imported_packages(path: Path) -> set[str]:
    """frozenseg's top-level packages (or modules) that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("frozenseg.")}
    return found


def test_every_import_points_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":  # the package's lazy public API names modules as strings
            continue
        assert own in LAYERS, f"{own} has no layer: add it to LAYERS"
        for target in imported_packages(path) - {own}:
            assert target in LAYERS, f"{target} has no layer: add it to LAYERS"
            if LAYERS.index(target) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports frozenseg.{target}")
    assert not upward, "imports running up a layer:\n" + "\n".join(upward)


def test_the_engine_imports_no_mode():
    engine = {t for p in (PACKAGE / "engine").rglob("*.py") for t in imported_packages(p)}
    assert not engine & {"head", "maskdino"}
