"""The README's Python examples, run as written.

Each ```python block of README.md runs in a namespace holding what its prose assumes (an
image, a box, the tensors of Deformable DETR's signature) and in a folder holding the files
it names (``dino_r50.pth`` written the way DINO's main.py writes it, a trained head at
``runs/synth_tiny/best.pt``). Then what the block's comments promise is checked. A new block
without a setup here fails: the README's examples stay runnable.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import frozenseg
from tests.artifacts import dino_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
BOX = (12.0, 10.0, 70.0, 60.0)


def attention_inputs(folder: Path, trained: Path, data: Path) -> dict:
    """Deformable DETR's tensors for the block's two level layouts: two levels of
    (64, 96), (32, 48) for the function, four levels of 256 channels for the layer."""
    torch.manual_seed(0)
    shapes = torch.tensor([[64, 96], [32, 48]])
    n, q, heads, dim, points = 1, 5, 8, 32, 4
    layer_maps = [torch.randn(n, 256, h, w) for h, w in [(16, 16), (8, 8), (4, 4), (2, 2)]]
    memory = torch.cat([m.flatten(2).transpose(1, 2) for m in layer_maps], 1)
    return {
        "value": torch.randn(n, int(shapes.prod(1).sum()), heads, dim),
        "spatial_shapes": shapes,
        "level_start_index": torch.tensor([0, 64 * 96]),
        "sampling_locations": torch.rand(n, q, heads, 2, points, 2),
        "attention_weights": torch.rand(n, q, heads, 2, points).flatten(-2).softmax(-1)
        .view(n, q, heads, 2, points),
        "maps": layer_maps, "memory": memory,
        "query": torch.randn(n, q, 256), "reference_points": torch.rand(n, q, 4, 2),
        "input_padding_mask": torch.zeros(n, memory.shape[1], dtype=torch.bool),
    }


def check_attention(ns: dict) -> None:
    assert ns["out"].shape == (1, 5, 8 * 32)
    assert ns["y"].shape == (1, 5, 256) and torch.isfinite(ns["y"]).all()


def a_dino_checkpoint(folder: Path, trained: Path, data: Path) -> dict:
    """DINO's own checkpoint file, and an image as the prose says: float RGB in [0, 1]."""
    shutil.move(dino_checkpoint(folder / "made").path, folder / "dino_r50.pth")
    image = np.array(Image.open(sorted((data / "images" / "val").iterdir())[0]).convert("RGB"))
    x0, y0, x1, y1 = BOX
    return {"image": torch.from_numpy(image).permute(2, 0, 1).float() / 255,
            "x0": x0, "y0": y0, "x1": x1, "y1": y1}


def check_detector(ns: dict) -> None:
    out, embedded = ns["out"], ns["masks_for"]
    assert (Path("detectors/dino_r50") / "config.json").is_file()
    assert out.boxes.shape[:2] == out.scores.shape == out.labels.shape
    assert out.queries.shape[:2] == out.boxes.shape[:2] and out.c1.dim() == 4
    assert min(ns["size"]) == 800 and tuple(ns["image"].shape[-2:]) == tuple(ns["size"])
    torch.testing.assert_close(embedded.boxes_xyxy_pixels()[0], torch.tensor([BOX]))


def a_trained_head(folder: Path, trained: Path, data: Path) -> dict:
    """A head checkpoint where the block looks for it, and an image as numpy (H, W, 3)."""
    (folder / "runs" / "synth_tiny").mkdir(parents=True)
    shutil.copy(trained, folder / "runs" / "synth_tiny" / "best.pt")
    image = np.asarray(Image.open(sorted((data / "images" / "val").iterdir())[0]).convert("RGB"))
    x0, y0, x1, y1 = BOX
    return {"image": image, "x0": x0, "y0": y0, "x1": x1, "y1": y1}


def check_predictor(ns: dict) -> None:
    height, width = ns["image"].shape[:2]
    found, yours = ns["found"], ns["yours"]
    assert found.masks.dtype == torch.bool and found.masks.shape[1:] == (height, width)
    assert (found.scores >= 0.3).all() and len(found.boxes) == len(found.labels)
    assert yours.masks.shape == (1, height, width)
    again = frozenseg.Predictor(frozenseg.MaskFrozenDETR.from_pretrained("models/mine"))
    again.set_image(ns["image"])
    assert torch.equal(again.predict(boxes=[list(BOX)]).masks, yours.masks)


# (a name only that block uses, its setup, its checks)
SETUPS = [("MSDeformAttn(", attention_inputs, check_attention),
          ("convert_checkpoint(", a_dino_checkpoint, check_detector),
          ("Predictor(", a_trained_head, check_predictor)]


def test_every_block_has_a_setup():
    assert BLOCKS, "README.md has no python blocks"
    for block in BLOCKS:
        owners = [marker for marker, _, _ in SETUPS if marker in block]
        assert len(owners) == 1, f"README block needs one setup here:\n{block}"


@pytest.mark.parametrize("marker, setup, check", SETUPS, ids=[m.strip("(") for m, *_ in SETUPS])
def test_readme_block_runs_as_written(marker, setup, check, tmp_path, monkeypatch, trained, data):
    (block,) = [b for b in BLOCKS if marker in b]
    monkeypatch.chdir(tmp_path)
    namespace = setup(tmp_path, trained, data)
    exec(compile(block, f"README.md ({marker.strip('(')} block)", "exec"), namespace)
    check(namespace)
