"""How close converted official LW-DETR checkpoints come to their references.

Files as ``tests/test_convert_lw_detr_official.py`` makes them: main.py's checkpoint (P3
and P5 levels, the EMA copy) and a released-style ``{model, args}`` file (one P4 level),
each written from a small random transformers LwDetr (noise on every weight) in the
official key layout, against transformers itself; and, where ``third_party/LW-DETR``
holds the official repository, the official model's own state dict (a 4-block vit_tiny,
P3 and P5), against the official code. Each is converted as ``frozenseg convert`` does,
then both run on a padded batch of two images (fp32, CPU); printed: the largest absolute
difference of the last layer's logits and of its boxes. The tests require 1e-4.

Run (from the repository root):
    PYTHONPATH=.:tests python benchmarks/exactness_lw_detr.py

The output is a markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from artifacts import lw_detr_official_checkpoint
from test_convert_lw_detr_official import REPO, max_differences, official_differences

from frozenseg.convert import convert_checkpoint


def main() -> None:
    print("| file | reference | logits | boxes |\n| --- | --- | --- | --- |")
    for name, released, scales in (("main.py checkpoint, P3 + P5", False, (2.0, 0.5)),
                                   ("released {model, args}, P4", True, (1.0,))):
        with tempfile.TemporaryDirectory() as tmp:
            artifact = lw_detr_official_checkpoint(Path(tmp) / "run", released=released,
                                                   scales=scales)
            convert_checkpoint(artifact.path, Path(tmp) / "out")
            row(f"{name}, random transformers model", "transformers",
                max_differences(Path(tmp) / "out", artifact.reference))
    if not (REPO / "models" / "lwdetr.py").is_file():
        print(f"(no {REPO}: the side-by-side row needs the official repository there)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        row("the official model's own state dict (vit_tiny, P3 + P5)", "the official code",
            official_differences(Path(tmp)))


def row(name: str, reference: str, figures) -> None:
    print(f"| {name} | {reference} | " + " | ".join(f"{x:.1e}" for x in figures) + " |")


if __name__ == "__main__":
    main()
