"""How close converted official Grounding DINO checkpoints come to their references.

Two files, as ``tests/test_convert_grounding_dino_official.py`` makes them: a training
run's checkpoint written from a small random transformers GroundingDino (its keys in the
official names), against transformers itself; and, where ``third_party/GroundingDINO``
holds the official repository, the official model's own state dict, against the official
code. Each is converted, then both run on the tests' padded batch of two 96x128 images and
their prompt (fp32, CPU); printed: the largest absolute difference of the token logits
(where finite) and of the boxes. The tests require 1e-4.

Run (from the repository root):
    PYTHONPATH=.:tests python benchmarks/exactness_grounding_dino.py

The output is a markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from artifacts import grounding_dino_official_checkpoint
from test_convert_grounding_dino_official import (
    REPO,
    converted_differences,
    official_code,
    official_differences,
)

from frozenseg.convert import convert_checkpoint


def main() -> None:
    print("| file | reference | logits | boxes |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = grounding_dino_official_checkpoint(Path(tmp) / "run")
        convert_checkpoint(artifact.path, Path(tmp) / "out")
        figures = converted_differences(artifact, Path(tmp) / "out")
        print("| training checkpoint, random transformers model | transformers | "
              + " | ".join(f"{x:.1e}" for x in figures) + " |")
    if not REPO.is_dir():
        print(f"(no {REPO}: the side-by-side row needs the official repository there)")
        return
    with tempfile.TemporaryDirectory() as tmp, official_code(Path(tmp)) as built:
        figures = official_differences(*built, Path(tmp), Path(tmp))
        print("| the official model's own state dict (Swin-T, d_model 256) | the official "
              "code | " + " | ".join(f"{x:.1e}" for x in figures) + " |")


if __name__ == "__main__":
    main()
