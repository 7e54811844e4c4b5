"""Pictures a person can look at: instance masks drawn over their image.

:func:`draw_instances` blends each mask in its own colour, outlines its edge, and draws
its box with the class name and score. :func:`predict_overlays` runs detector and head
over images and writes, per image, ``NAME.png`` (the overlay) and ``NAME.json`` (the
instances drawn, as COCO results), returning how many instances passed the threshold.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from collections.abc import Callable, Sequence
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


def display_factor(width: int, height: int, min_side: int) -> int:
    """The whole factor that brings the shorter side to at least ``min_side`` (at most 4x;
    1 for images already that large, or ``min_side`` 0): small images are drawn larger so
    that their masks and labels can be seen."""
    short = min(width, height)
    if min_side <= 0 or short >= min_side:
        return 1
    return min(4, math.ceil(min_side / short))


Rect = tuple[int, int, int, int]  # left, top, right, bottom; right and bottom past the last pixel


def place_label(box: Rect, label: tuple[int, int], canvas: tuple[int, int],
                taken: Sequence[Rect] = ()) -> Rect:
    """Where a ``label`` (width, height) for ``box`` goes on a ``canvas`` (width, height):
    the first of these that lies inside the picture and overlaps none of the ``taken``
    labels: above the box's top-left corner; inside the box at its top-left (only in a box
    at least twice the label's height, so that a small box stays visible); below its
    bottom-left; then a label height at a time down from the box's top, then up from above
    it. If none is free, the first that lies inside the picture (clamped into it if none
    does). Labels are shifted left to stay inside on the right. Rectangles are (left, top,
    right, bottom), right and bottom past the last pixel."""
    (x0, y0, _, y1), (w, h), (width, height) = box, label, canvas
    left = max(0, min(x0, width - w))
    tops = [y0 - h] + ([y0] if y1 - y0 >= 2 * h else []) + [y1]
    tops += list(range(y0 + h, height - h + 1, h)) + list(range(y0 - 2 * h, -1, -h))
    inside = [(left, t, left + w, t + h) for t in tops if 0 <= t <= height - h]
    for rect in inside:
        if not any(_overlap(rect, other) for other in taken):
            return rect
    if inside:
        return inside[0]
    top = max(0, min(tops[0], height - h))
    return (left, top, left + w, top + h)


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_instances(image: Image.Image, results: list[dict], names: dict[int, str], *,
                   alpha: float = 0.45, min_side: int = 0) -> Image.Image:
    """``image`` with ``results`` (COCO results on it, best first) drawn: masks blended
    at ``alpha`` with a solid edge, then each box, then each box's "name score" label (a
    filled rectangle in its colour) where :func:`place_label` puts it: inside the picture
    and clear of the other labels where it can be, best result placed first, so it gets
    the preferred spot. The best result is drawn last, so it is on top where masks
    overlap. An image whose shorter side is under ``min_side`` is drawn
    :func:`display_factor` times larger (the image bicubic, the masks bilinear at 0.5); the
    label font and line width follow the drawn size."""
    factor = display_factor(*image.size, min_side)
    image = image.convert("RGB")
    size = (image.width * factor, image.height * factor)
    if factor > 1:
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32).copy()
    colours = instance_colours(len(results))
    for result, colour in reversed(list(zip(results, colours, strict=True))):
        mask = _scaled_mask(mask_utils.decode(result["segmentation"]), size)
        pixels[mask] = pixels[mask] * (1 - alpha) + np.array(colour) * alpha
        pixels[mask & ~_eroded(mask)] = colour
    canvas = Image.fromarray(pixels.round().astype(np.uint8))
    short = min(size)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, round(short / 32)))
    line = max(2, round(short / 240))
    ascent, descent = font.getmetrics()
    boxes = [tuple(round(v * factor) for v in r["bbox"]) for r in results]
    labels, placed = [], []
    for result, (x, y, w, h) in zip(results, boxes, strict=True):  # best first: best spots
        text = f"{names.get(result['category_id'], result['category_id'])} {result['score']:.2f}"
        label = (math.ceil(font.getlength(text)) + 2 * line, ascent + descent)
        labels.append(text)
        placed.append(place_label((x, y, x + w, y + h), label, size, placed))
    for (x, y, w, h), colour in reversed(list(zip(boxes, colours, strict=True))):
        # COCO's x + w is the edge past the last pixel; PIL's corners are both inside.
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=line)
    for text, (left, top, right, bottom), colour in reversed(
            list(zip(labels, placed, colours, strict=True))):
        draw.rectangle([left, top, right - 1, bottom - 1], fill=colour)
        draw.text((left + line, top), text, fill=(0, 0, 0), font=font, anchor="la")
    return canvas


def _scaled_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (H, W) 0/1 mask at ``size`` (width, height): bilinear, then 0.5, for smooth edges."""
    if mask.shape[::-1] == size:
        return mask.astype(bool)
    scaled = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(scaled) >= 128


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


def one_per_object(results: list[dict]) -> list[dict]:
    """``results`` (best first) without those whose box repeats a better one's exactly: a
    detector that ranks (query, class) pairs lists one query under several classes, and a
    picture shows each object once, under its best class (exports keep them all: COCO AP
    counts each class's list on its own)."""
    seen, kept = set(), []
    for result in results:
        box = (result["image_id"], *result["bbox"])
        if box not in seen:
            seen.add(box)
            kept.append(result)
    return kept


def predict_overlays(model, dataset: ImageFolder, out_dir: str | os.PathLike, *,
                     classes: ClassMapping, names: dict[int, str], threshold: float = 0.5,
                     max_instances: int = 100, mask_threshold: float = 0.5,
                     min_side: int = 480, progress: Callable[[int, int], None] | None = None
                     ) -> list[ImageSummary]:
    """Overlay PNG and json per image of ``dataset`` (its transform: the view the head was
    trained on) in ``out_dir``, named after the image (``a/b.jpg`` -> ``a/b.png``): the
    results scoring ``threshold`` or more, each object once (:func:`one_per_object`).
    Images with a shorter side under ``min_side`` are drawn larger (:func:`draw_instances`),
    the json keeps the image's own pixels."""
    summaries = []
    overlays = per_image_paths(out_dir, dataset, ".png")
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    model.eval()
    for target, results in predict(model, dataset, classes=classes, batch_size=1,
                                   max_per_image=max_instances, mask_threshold=mask_threshold,
                                   progress=progress):
        index = index_of[int(target["image_id"])]
        info = dataset.images[index]
        kept = one_per_object([r for r in results if r["score"] >= threshold])
        overlay = overlays[index]
        with atomic_path(overlay) as tmp:
            draw_instances(read_image(dataset.image_path(index)), kept, names,
                           min_side=min_side).save(tmp, format="PNG")
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
