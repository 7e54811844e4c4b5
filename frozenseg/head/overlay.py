"""Pictures a person can look at: instance masks drawn over their image.

:func:`draw_instances` blends each mask in its own colour, outlines its edge, and draws
its box with the class name and score. :func:`predict_overlays` runs detector and head
over images and writes, per image, ``NAME.png`` (the overlay) and ``NAME.json`` (the
instances drawn, as COCO results), returning how many instances passed the threshold.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from frozenseg.data.folder import ImageFolder
from frozenseg.data.images import read_image
from frozenseg.detector.classes import ClassMapping
from frozenseg.files import atomic_path, atomic_write_text
from frozenseg.head.export import per_image_paths
from frozenseg.head.inference import predict


def instance_colours(n: int) -> list[tuple[int, int, int]]:
    """n distinct saturated colours: hues a golden-ratio step apart."""
    hues = ((0.12 + k * 0.618033988749895) % 1.0 for k in range(n))
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)) for h in hues]


def draw_instances(image: Image.Image, results: list[dict], names: dict[int, str], *,
                   alpha: float = 0.45) -> Image.Image:
    """``image`` with ``results`` (COCO results on it, best first) drawn: masks blended
    at ``alpha`` with a solid edge, then each box with "name score" above it. The best
    result is drawn last, so it is on top where masks overlap."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    colours = instance_colours(len(results))
    for result, colour in reversed(list(zip(results, colours, strict=True))):
        mask = mask_utils.decode(result["segmentation"]).astype(bool)
        pixels[mask] = pixels[mask] * (1 - alpha) + np.array(colour) * alpha
        pixels[mask & ~_eroded(mask)] = colour
    canvas = Image.fromarray(pixels.round().astype(np.uint8))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for result, colour in reversed(list(zip(results, colours, strict=True))):
        x, y, w, h = result["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        label = f"{names.get(result['category_id'], result['category_id'])} {result['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        lift = min(bottom - top + 2, y)  # above the box, unless the box touches the top
        draw.rectangle([left, top - lift, right + 2, bottom - lift], fill=colour)
        draw.text((x + 1, y - lift), label, fill=(0, 0, 0), font=font)
    return canvas


def _eroded(mask: np.ndarray) -> np.ndarray:
    """The mask minus its one-pixel border (4-neighbourhood): mask & ~eroded is the edge."""
    padded = np.pad(mask, 1)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
            & padded[1:-1, 2:])


@dataclass
class ImageSummary:
    file_name: str
    kept: int          # instances at or above the threshold (drawn)
    candidates: int    # the detector's boxes the head scored
    best: float | None  # the highest score, kept or not
    overlay: Path


def predict_overlays(model, dataset: ImageFolder, out_dir: str | os.PathLike, *,
                     classes: ClassMapping, names: dict[int, str], threshold: float = 0.5,
                     max_instances: int = 100, mask_threshold: float = 0.5,
                     progress: Callable[[int, int], None] | None = None) -> list[ImageSummary]:
    """Overlay PNG and json per image of ``dataset`` (its transform: the view the head was
    trained on) in ``out_dir``, named after the image (``a/b.jpg`` -> ``a/b.png``)."""
    summaries = []
    overlays = per_image_paths(out_dir, dataset, ".png")
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    model.eval()
    for target, results in predict(model, dataset, classes=classes, batch_size=1,
                                   max_per_image=max_instances, mask_threshold=mask_threshold,
                                   progress=progress):
        index = index_of[int(target["image_id"])]
        info, kept = dataset.images[index], [r for r in results if r["score"] >= threshold]
        overlay = overlays[index]
        with atomic_path(overlay) as tmp:
            draw_instances(read_image(dataset.image_path(index)), kept, names).save(
                tmp, format="PNG")
        atomic_write_text(overlay.with_suffix(".json"), json.dumps({
            "file_name": info["file_name"], "image_id": info["id"],
            "height": int(target["orig_size"][0]), "width": int(target["orig_size"][1]),
            "threshold": threshold,
            "instances": [{**r, "category": names.get(r["category_id"])} for r in kept],
        }, indent=1) + "\n")
        summaries.append(ImageSummary(info["file_name"], len(kept), len(results),
                                      max((r["score"] for r in results), default=None),
                                      overlay))
    return summaries
