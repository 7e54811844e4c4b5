"""Synthetic shapes: a deterministic COCO-format dataset written to disk as real files.

Every test, demo and benchmark of the project uses it (nothing is downloaded). One call writes

    DIR/images/{train,val}/000001.jpg ...     the images (JPEG q90; PNG with image_format="png")
    DIR/instances_{train,val}.json            COCO instances (things only)
    DIR/panoptic_{train,val}.json             COCO panoptic segments_info (things and stuff)
    DIR/panoptic_{train,val}/000001.png       segment ids, RGB-encoded: id = R + 256 G + 256^2 B
    DIR/semantic_{train,val}/000001.png       uint8 class index per pixel, 255 = ignore
    DIR/semantic_categories.json              what the class indices of the semantic PNGs mean
    DIR/synth.json                            the parameters, written last: a rerun with the same
                                              parameters sees it and returns at once

Image ids start at 1 and are unique over both splits; the last ``val_fraction`` of the images
form the val split. A thing's panoptic segment id is its instance annotation id
(``image_id * 100 + j``), so the two formats can be matched without guessing.

Images show thing shapes (filled ellipses, rotated rectangles, triangles, rings, stars,
crosses, C-shapes, pairs of dots; flat, striped, checkered or shaded) over stuff regions
(sky, ground, water, foliage). Two worlds: ``scenes`` (the default: up to 10 shapes, textured
stuff, crowds, sensor noise) and ``plain`` (up to 4 mostly flat shapes over a smooth sky and
ground, little noise, no crowds: a world a small DETR learns from random weights on a CPU,
still with the rings' holes and the crosses' thin arms that make masks matter).
Later shapes are drawn over earlier ones; masks are the visible
parts, and a shape left with too little visible area is dropped (its pixels become void).
Shapes are rasterised by pycocotools from their polygons, so a polygon annotation decodes to
exactly the pixels the image shows; masks that no single polygon describes (holes, several
parts, occlusion, crowds) are stored as RLE.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from frozenseg.files import atomic_write_bytes

# Bump whenever the output for a given set of parameters changes, so old datasets are redone.
SYNTH_VERSION = 1

MIN_OBJECT = 8  # px, the smallest shape's size by default
MAX_IMAGES = 100_000  # segment ids are image_id * 100 + j and must fit in 24 bits
_IDS_PER_IMAGE = 100
# Images 8, 40, 72, ... have no instances (~3%), so every dataset of 8 or more has one.
_EMPTY_EVERY, _EMPTY_AT = 32, 7
_MIN_AREA = 12  # pixels: a shape seen less than this is dropped
_MIN_VISIBLE = 0.15  # fraction of its own area a shape must keep when occluded


@dataclass(frozen=True)
class World:
    """What a synthetic scene may hold; the shapes and classes are the same in every world."""

    max_instances: int
    crowd_p: float  # per image; ~2% of the annotations in scenes
    patterns: tuple[float, float, float, float]  # p(flat, stripes, checker, shading)
    noise: tuple[float, float]  # sensor noise std, drawn per image
    textured_stuff: bool  # water and foliage, shaded ground; else a smooth sky and ground


WORLDS = {
    "scenes": World(10, 0.15, (0.55, 0.2, 0.1, 0.15), (1.0, 9.0), True),
    "plain": World(4, 0.0, (0.85, 0.05, 0.0, 0.10), (1.0, 3.0), False),
}
DEFAULT_WORLD = "scenes"


@dataclass(frozen=True)
class Category:
    """One class, as written into the json files."""

    id: int
    name: str
    supercategory: str
    isthing: int
    color: tuple[int, int, int]


# Non-contiguous ids on purpose: readers must map them to contiguous indices.
THINGS = (
    Category(1, "ellipse", "round", 1, (220, 20, 60)),
    Category(3, "rectangle", "angular", 1, (0, 0, 142)),
    Category(5, "triangle", "angular", 1, (119, 11, 32)),
    Category(7, "ring", "round", 1, (250, 170, 30)),
    Category(9, "star", "angular", 1, (106, 0, 228)),
    Category(11, "cross", "angular", 1, (0, 80, 100)),
    Category(13, "c_shape", "round", 1, (255, 77, 255)),
    Category(15, "dot_pair", "round", 1, (0, 226, 252)),
)
STUFF = (
    Category(101, "sky", "background", 0, (70, 130, 180)),
    Category(103, "ground", "background", 0, (152, 251, 152)),
    Category(105, "water", "background", 0, (0, 114, 143)),
    Category(107, "foliage", "background", 0, (107, 142, 35)),
)
CATEGORIES = THINGS + STUFF
_THING_IDS = frozenset(c.id for c in THINGS)
SKY, GROUND, WATER, FOLIAGE = range(len(STUFF))  # indices into STUFF
IGNORE = 255


class SynthError(ValueError):
    """Bad arguments, or an output folder that holds something else."""


@dataclass
class SynthSummary:
    """What a call to :func:`synth` made (or found already made)."""

    out_dir: str
    images: int
    train: int
    val: int
    instances: int
    crowd: int
    empty_images: int
    classes: int
    reused: bool = False
    seconds: float = 0.0


# ----------------------------------------------------------------------------- public entry


def synth(
    out_dir: str | os.PathLike,
    images: int = 200,
    seed: int = 0,
    *,
    min_size: int = 160,
    max_size: int = 320,
    min_object: int = MIN_OBJECT,
    val_fraction: float = 0.2,
    image_format: str = "jpg",
    world: str = DEFAULT_WORLD,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Write the synthetic dataset to ``out_dir`` and return a summary.

    ``images`` in all (at least 2: one train, one val), sides drawn from
    ``[min_size, max_size]`` pixels; shapes from ``min_object`` pixels to 60% of the
    shorter side (log-uniform: many small, few large), in ``world`` (a key of
    :data:`WORLDS`). Same arguments, same bytes. If
    ``out_dir/synth.json`` already records these arguments nothing is done. A folder
    holding a dataset made with other arguments is only replaced with ``overwrite=True``.
    ``workers`` threads render (default: up to 4 CPU cores; the output does not depend on
    it). ``progress(done, total)`` is called after each image.
    """
    params = _params(images, seed, min_size, max_size, min_object, val_fraction, image_format,
                     world)
    out = Path(out_dir)
    reused = _existing(out, params, overwrite)
    if reused is not None:
        return reused
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # The marker first, then the clean-up: a run stopped anywhere leaves a folder that the
    # next run still recognises as its own and redoes.
    atomic_write_bytes(out / _MARKER, _dumps({"params": params}))
    _remove_owned(out)
    workers = workers or min(4, os.cpu_count() or 1)
    summary = _generate(out, params, workers, progress)
    summary.seconds = round(time.perf_counter() - start, 3)
    record = {"generator": "frozenseg.synth", "params": params, "summary": asdict(summary)}
    for volatile in ("out_dir", "reused", "seconds"):  # kept out: same arguments, same bytes
        del record["summary"][volatile]
    atomic_write_bytes(out / "synth.json", _dumps(record))
    (out / _MARKER).unlink()
    return summary


# ------------------------------------------------------------------- arguments and reuse

_MARKER = "synth.partial.json"
_OWNED = ("images/train", "images/val", "panoptic_train", "panoptic_val", "semantic_train",
          "semantic_val", "instances_train.json", "instances_val.json", "panoptic_train.json",
          "panoptic_val.json", "semantic_categories.json", "synth.json", _MARKER)


def _params(images, seed, min_size, max_size, min_object, val_fraction, image_format,
            world) -> dict:
    """Validate the arguments; return them as the dict synth.json records."""
    images, seed, min_size, max_size, min_object = (
        _as_int(v) for v in (images, seed, min_size, max_size, min_object))
    checks = [
        (isinstance(images, int) and 2 <= images <= MAX_IMAGES,
         f"images must be an integer from 2 (one train, one val) to {MAX_IMAGES}, got {images!r}"),
        (isinstance(seed, int) and seed >= 0,
         f"seed must be a non-negative integer, got {seed!r}"),
        (isinstance(min_size, int) and isinstance(max_size, int)
         and 32 <= min_size <= max_size <= 4096,
         "sizes must satisfy 32 <= min_size <= max_size <= 4096, "
         f"got min_size={min_size!r}, max_size={max_size!r}"),
        (isinstance(min_object, int) and 4 <= min_object <= 0.6 * min_size,
         f"min_object must be an integer from 4 to 60% of min_size, got {min_object!r}"),
        (isinstance(val_fraction, numbers.Real) and 0 < val_fraction < 1,
         f"val_fraction must lie in (0, 1), got {val_fraction!r}"),
        (image_format in ("jpg", "png"), f"image_format must be jpg or png, got {image_format!r}"),
        (world in WORLDS, f"world must be one of {', '.join(WORLDS)}, got {world!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SynthError(message)
    val = min(images - 1, max(1, round(images * val_fraction)))
    params = {"version": SYNTH_VERSION, "seed": seed, "images": images, "train": images - val,
              "val": val, "min_size": min_size, "max_size": max_size,
              "image_format": image_format, "min_object": min_object}
    if world != DEFAULT_WORLD:  # recorded only when chosen: older datasets' records stay valid
        params["world"] = world
    return params


def _as_int(value):
    """Integers (numpy's too) as int; anything else unchanged, for the checks to reject."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _existing(out: Path, params: dict, overwrite: bool) -> SynthSummary | None:
    """The summary of a finished dataset with these parameters in ``out``, else None.

    Raises if ``out`` holds something that must not be replaced: files that synth did not
    write, or a dataset made with other arguments (unless ``overwrite``).
    """
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a folder")
    record_path = out / "synth.json"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SynthError(f"{record_path}: unreadable ({err}); delete it to regenerate") from err
        old = record.get("params", {})
        if old == params:
            return SynthSummary(out_dir=str(out), reused=True, **record["summary"])
        # Same arguments, older generator: the user asked for this dataset, so redo it.
        same_request = {**old, "version": SYNTH_VERSION} == params
        if not (overwrite or same_request):
            raise SynthError(f"{record_path}: a dataset made with other parameters "
                             f"({_difference(old, params)}); "
                             "choose another folder or pass overwrite (--overwrite)")
    elif out.is_dir() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise SynthError(f"{out}: not empty and not a synth dataset; choose an empty folder")
    return None


def _difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
                     if old.get(k) != new.get(k))


def _remove_owned(out: Path) -> None:
    """Delete what an earlier run wrote, and only that (never anything else in ``out``)."""
    for name in _OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists() and name != _MARKER:
            path.unlink()


# ---------------------------------------------------------------------------- generation


def _generate(out: Path, params: dict, workers: int, progress) -> SynthSummary:
    """Render every image, write its files, then the json files of both splits."""
    total, n_train = params["images"], params["train"]
    counts = {"instances": 0, "crowd": 0, "empty_images": 0}
    for split in ("train", "val"):
        for sub in (f"images/{split}", f"panoptic_{split}", f"semantic_{split}"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    results = {"train": ([], [], []), "val": ([], [], [])}

    def one(index: int):
        return _make_image(out, "train" if index < n_train else "val", index, params)

    # Threads, not processes: numpy, PIL and file writes release the GIL, nothing needs
    # pickling, and each image has its own generator, so the order of work cannot matter.
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for index, (entry, anns, pan) in enumerate(pool.map(one, range(total))):
            entries, instances, panoptic = results["train" if index < n_train else "val"]
            entries.append(entry)
            instances.extend(anns)
            panoptic.append(pan)
            counts["instances"] += sum(1 - a["iscrowd"] for a in anns)
            counts["crowd"] += sum(a["iscrowd"] for a in anns)
            counts["empty_images"] += not anns
            if progress is not None:
                progress(index + 1, total)
    finally:  # on Ctrl-C, drop the queued images instead of rendering them all first
        pool.shutdown(cancel_futures=True)
    for split, (entries, instances, panoptic) in results.items():
        _write_split_json(out, split, entries, instances, panoptic)
    atomic_write_bytes(out / "semantic_categories.json", _dumps(_semantic_categories()))
    return SynthSummary(out_dir=str(out), images=total, train=n_train, val=total - n_train,
                        classes=len(CATEGORIES), **counts)


def _make_image(out: Path, split: str, index: int, params: dict):
    """Render image ``index`` and write its three files; return its json entries."""
    image_id = index + 1
    # One generator per image: an image does not depend on how many came before it.
    rng = np.random.default_rng([params["seed"], index])
    height, width = (int(v) for v in rng.integers(params["min_size"], params["max_size"] + 1, 2))
    pixels, segments = _render(rng, height, width, params.get("min_object", MIN_OBJECT),
                               empty=index % _EMPTY_EVERY == _EMPTY_AT,
                               world=WORLDS[params.get("world", DEFAULT_WORLD)])
    stem, ext = f"{image_id:06d}", params["image_format"]
    ids = np.zeros((height, width), np.int32)  # 0 = void
    infos, anns = [], []
    for j, seg in enumerate(segments, start=1):
        seg_id = image_id * _IDS_PER_IMAGE + j
        ids[seg.mask] = seg_id
        ann = _annotation(seg, seg_id, image_id)
        infos.append({k: ann[k] for k in ("id", "category_id", "iscrowd")}
                     | {"bbox": [int(v) for v in ann["bbox"]], "area": ann["area"]})
        if seg.category_id in _THING_IDS:  # stuff lives in panoptic and semantic only
            anns.append(ann)
    semantic = _semantic(ids, segments, image_id)
    atomic_write_bytes(out / "images" / split / f"{stem}.{ext}", _encode_image(pixels, ext))
    atomic_write_bytes(out / f"panoptic_{split}" / f"{stem}.png", _encode_png(_id_to_rgb(ids)))
    atomic_write_bytes(out / f"semantic_{split}" / f"{stem}.png", _encode_png(semantic))
    entry = {"id": image_id, "file_name": f"{stem}.{ext}", "height": height, "width": width}
    pan = {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": infos}
    return entry, anns, pan


@dataclass
class _Segment:
    """One visible region: a thing instance, a crowd, or the pixels of one stuff class."""

    category_id: int
    mask: np.ndarray  # bool H×W, the visible pixels
    iscrowd: int = 0
    polygon: list[float] | None = None  # set only when it rasterises to exactly ``mask``


def _annotation(seg: _Segment, seg_id: int, image_id: int) -> dict:
    """COCO instance annotation of one segment; area and bbox measured on its mask."""
    rle = mask_utils.encode(np.asfortranarray(seg.mask, dtype=np.uint8))
    if seg.polygon is not None:
        segmentation = [seg.polygon]
    else:
        segmentation = {"size": list(seg.mask.shape), "counts": rle["counts"].decode("ascii")}
    return {"id": seg_id, "image_id": image_id, "category_id": seg.category_id,
            "segmentation": segmentation, "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": seg.iscrowd}


def _semantic(ids: np.ndarray, segments: list[_Segment], image_id: int) -> np.ndarray:
    """Class index per pixel from the panoptic id map (so the two agree by construction)."""
    index = {c.id: i for i, c in enumerate(CATEGORIES)}
    lut = np.full(len(segments) + 1, IGNORE, np.uint8)
    for j, seg in enumerate(segments, start=1):
        lut[j] = index[seg.category_id]
    local = np.where(ids > 0, ids - image_id * _IDS_PER_IMAGE, 0)
    return lut[local]


# ------------------------------------------------------------------------------ the scene


def _render(rng: np.random.Generator, h: int, w: int, min_object: int, empty: bool,
            world: World):
    """Pixels (uint8 H×W×3) and the visible segments (things first, then stuff)."""
    stuff_map, canvas = (_stuff if world.textured_stuff else _plain_stuff)(rng, h, w)
    owner = np.full((h, w), -1, np.int16)  # which shape is on top at each pixel
    shapes = [] if empty else _draw_things(rng, canvas, owner, min_object, world)
    things = _visible_things(shapes, owner)
    segments = things + _stuff_segments(stuff_map, owner)
    return _finish(rng, canvas, world.noise), segments


def _draw_things(rng, canvas: np.ndarray, owner: np.ndarray, min_object: int,
                 world: World) -> list[tuple]:
    """Paint the shapes bottom to top; return (category_id, full mask, polygon, crowd) each."""
    h, w = owner.shape
    count = int(rng.integers(1, world.max_instances + 1))
    # Log-uniform sizes to 60% of the shorter side: COCO-like many small, few large.
    sizes = np.exp(rng.uniform(math.log(min_object), math.log(0.6 * min(h, w)), count))
    # Mostly large first (painter's order, like a scene's background objects) with shuffling.
    order = np.argsort(-(np.log(sizes) + rng.normal(0, 0.7, count)))
    specs = [("thing", float(sizes[k])) for k in order]
    if rng.random() < world.crowd_p:
        specs.insert(int(rng.integers(0, len(specs) + 1)), ("crowd", 0.0))
    drawn = []
    for kind, size in specs:
        category, mask, polygon = (_crowd(rng, h, w) if kind == "crowd"
                                   else _thing(rng, h, w, size))
        if not mask.any():
            continue
        _paint(rng, canvas, mask, world.patterns)
        owner[mask] = len(drawn)
        drawn.append((category, mask, polygon, int(kind == "crowd")))
    return drawn


def _visible_things(shapes: list[tuple], owner: np.ndarray) -> list[_Segment]:
    """Cut each shape to its visible part; drop the ones hidden too much (they become void)."""
    kept = []
    for k, (category, full, polygon, crowd) in enumerate(shapes):
        visible = owner == k
        area, full_area = int(visible.sum()), int(full.sum())
        if area < _MIN_AREA or area < _MIN_VISIBLE * full_area:
            continue
        exact = polygon is not None and area == full_area
        kept.append(_Segment(category, visible, crowd, polygon if exact else None))
    return kept


def _stuff_segments(stuff_map: np.ndarray, owner: np.ndarray) -> list[_Segment]:
    """One segment per stuff class present: its pixels that no shape covers."""
    free = owner < 0
    segments = []
    for k, category in enumerate(STUFF):
        mask = free & (stuff_map == k)
        if mask.any():
            segments.append(_Segment(category.id, mask))
    return segments


def _finish(rng, canvas: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
    """Per-image colour jitter (contrast, brightness, white balance) and sensor noise."""
    mean = canvas[::4, ::4].mean(axis=(0, 1))  # a subsample is plenty for a mean colour
    contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(-25, 25)
    gains = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    sigma = rng.uniform(*noise)
    # In place, folded into one scale and one offset per channel: this runs on every pixel.
    canvas *= (contrast * gains).astype(np.float32)
    canvas += ((mean * (1 - contrast) + brightness) * gains).astype(np.float32)
    # Uniform rather than Gaussian noise (same std): five times cheaper to draw.
    noise = rng.random(canvas.shape, dtype=np.float32)
    noise -= 0.5
    noise *= sigma * math.sqrt(12)
    canvas += noise
    return np.clip(canvas, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- stuff


def _stuff(rng, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Stuff class per pixel (index into STUFF) and the background pixels (float H×W×3)."""
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    labels = np.full((h, w), GROUND, np.uint8)
    horizon = np.full((1, w), -1.0, np.float32)
    if rng.random() < 0.8:  # otherwise a top-down view: no sky
        horizon = h * rng.uniform(0.2, 0.55) + _wave(rng, x, h * 0.06)
        labels[y < horizon] = SKY
    if rng.random() < 0.4:
        top = np.maximum(horizon, 0) + h * rng.uniform(0.05, 0.3) + _wave(rng, x, h * 0.03)
        bottom = top + h * rng.uniform(0.1, 0.3) + _wave(rng, x, h * 0.03)
        labels[(y > top) & (y < bottom)] = WATER
    if rng.random() < 0.5:
        field = _smooth_noise(rng, h, w, int(rng.integers(2, 5)))
        labels[field > np.quantile(field, rng.uniform(0.65, 0.9))] = FOLIAGE
    canvas = np.zeros((h, w, 3), np.float32)
    for k, texture in enumerate((_sky, _ground, _water, _foliage)):
        where = labels == k
        if where.any():  # np.where beats boolean-index assignment on whole images
            np.copyto(canvas, texture(rng, h, w, y, x), where=where[..., None])
    return labels, canvas


def _plain_stuff(rng, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain world's background: a smooth ground, under a sky behind a straight horizon
    in half the images (the others look down). No texture for the shapes to hide in."""
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    labels = np.full((h, w), GROUND, np.uint8)
    if rng.random() < 0.5:
        labels[np.broadcast_to(y < h * rng.uniform(0.2, 0.5), (h, w))] = SKY
    base = _jitter(rng, [(120, 95, 60), (95, 130, 60), (125, 125, 120)][int(rng.integers(3))])
    ground = base * (0.9 + 0.2 * y / h)[..., None]
    canvas = np.where((labels == SKY)[..., None], _sky(rng, h, w, y, x), ground)
    return labels, canvas.astype(np.float32)


def _wave(rng, x: np.ndarray, amplitude: float) -> np.ndarray:
    period = x.shape[1] * rng.uniform(0.3, 1.5)
    return amplitude * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a small random grid, bicubically upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))


def _jitter(rng, rgb, spread: float = 25.0) -> np.ndarray:
    return np.asarray(rgb, np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32)


def _sky(rng, h, w, y, x):
    palettes = [((90, 150, 230), (190, 220, 250)), ((150, 150, 165), (215, 215, 220)),
                ((240, 140, 80), (250, 210, 150))]  # blue, overcast, sunset
    top, bottom = (_jitter(rng, c) for c in palettes[int(rng.integers(len(palettes)))])
    t = (y / h)[..., None]
    return np.broadcast_to(top + (bottom - top) * t, (h, w, 3))


def _ground(rng, h, w, y, x):
    base = _jitter(rng, [(120, 95, 60), (95, 130, 60), (125, 125, 120)][int(rng.integers(3))])
    shade = 1 + 0.2 * _smooth_noise(rng, h, w, 6) + 0.08 * _smooth_noise(rng, h, w, 24)
    return base * shade[..., None]


def _water(rng, h, w, y, x):
    base = _jitter(rng, (40, 90, 150))
    ripples = np.sin(y * rng.uniform(0.4, 0.9) + 2 * np.sin(x * rng.uniform(0.03, 0.1)))
    return base * (1 + 0.12 * ripples)[..., None]


def _foliage(rng, h, w, y, x):
    base = _jitter(rng, (50, 110, 45))
    shade = 1 + 0.3 * _smooth_noise(rng, h, w, int(min(h, w) // 8))
    return base * shade[..., None]


# --------------------------------------------------------------------------------- things

_POLYGON_KINDS = ("ellipse", "rectangle", "triangle", "star", "cross", "c_shape")


def _thing(rng, h: int, w: int, size: float):
    """One random shape of ``size`` px: (category id, full mask, polygon or None)."""
    category = THINGS[int(rng.integers(len(THINGS)))]
    center = rng.uniform((-0.05 * w, -0.05 * h), (1.05 * w, 1.05 * h))
    angle = rng.uniform(0, 2 * np.pi)
    if category.name in _POLYGON_KINDS:
        outline = _place(_UNIT[category.name](rng, size), size, angle, center, h, w)
        if outline is None:
            return category.id, np.zeros((h, w), bool), None
        return category.id, _raster([outline], h, w), outline
    if category.name == "ring":
        n = _round_vertices(size)
        aspect = rng.uniform(0.6, 1.0)
        outer = _place(_ellipse_points(n, 1.0, aspect), size, angle, center, h, w)
        inner = _place(_ellipse_points(n, rng.uniform(0.35, 0.7), aspect), size, angle, center,
                       h, w)
        mask = _raster([outer], h, w) if outer else np.zeros((h, w), bool)
        return category.id, mask & ~_raster([inner], h, w) if inner else mask, None
    dots = [_place(p, size, angle, center, h, w) for p in _dot_pair(size)]
    dots = [d for d in dots if d is not None]
    mask = _raster(dots, h, w) if dots else np.zeros((h, w), bool)
    return category.id, mask, None


def _crowd(rng, h: int, w: int):
    """A cluster of small shapes of one class, annotated as a single iscrowd region."""
    name = ("ellipse", "rectangle", "triangle", "star")[int(rng.integers(4))]
    category = next(c for c in THINGS if c.name == name)
    radius = rng.uniform(0.12, 0.25) * min(h, w)
    middle = rng.uniform((radius, radius), (w - radius, h - radius))
    outlines = []
    for _ in range(int(rng.integers(6, 16))):
        size = rng.uniform(6, 14)
        offset = rng.uniform(-radius, radius, 2)
        outline = _place(_UNIT[name](rng, size), size, rng.uniform(0, 2 * np.pi),
                         middle + offset, h, w)
        if outline is not None:
            outlines.append(outline)
    mask = _raster(outlines, h, w) if outlines else np.zeros((h, w), bool)
    return category.id, mask, None


def _round_vertices(size: float) -> int:
    # Enough vertices that a polygon looks round at its size, few enough to stay compact.
    return int(np.clip(size * 0.6, 12, 64))


def _ellipse_points(n: int, radius: float, aspect: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([radius * np.cos(t), radius * aspect * np.sin(t)], 1) / 2


def _unit_ellipse(rng, size):
    return _ellipse_points(_round_vertices(size), 1.0, rng.uniform(0.45, 1.0))


def _unit_rectangle(rng, size):
    a = rng.uniform(0.25, 1.0) / 2
    return np.array([(-0.5, -a), (0.5, -a), (0.5, a), (-0.5, a)])


def _unit_triangle(rng, size):
    t = np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.4, 0.4, 3)
    r = rng.uniform(0.7, 1.0, 3) / 2
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _unit_star(rng, size):
    points = int(rng.integers(4, 7))
    t = np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * rng.uniform(0.2, 0.45))
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _unit_cross(rng, size):
    a, b = 0.5, rng.uniform(0.06, 0.16)  # thin arms: they break up when the cross is tiny
    return np.array([(a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
                     (-b, -b), (-b, -a), (b, -a), (b, -b)])


def _unit_c_shape(rng, size):
    n = _round_vertices(size)
    opening = rng.uniform(0.6, 2.2)
    t = np.linspace(opening / 2, 2 * np.pi - opening / 2, n)
    inner = 0.5 * rng.uniform(0.45, 0.75)
    outer_arc = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
    inner_arc = np.stack([np.cos(t), np.sin(t)], 1)[::-1] * inner
    return np.concatenate([outer_arc, inner_arc])


def _dot_pair(size):
    n = _round_vertices(size * 0.45)
    dot = _ellipse_points(n, 0.44, 1.0)
    return [dot + (-0.28, 0), dot + (0.28, 0)]


_UNIT = {"ellipse": _unit_ellipse, "rectangle": _unit_rectangle, "triangle": _unit_triangle,
         "star": _unit_star, "cross": _unit_cross, "c_shape": _unit_c_shape}


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _place(unit: np.ndarray, size, angle, center, h, w) -> list[float] | None:
    """Scale, rotate, move and clip a unit outline; a flat COCO polygon or None if it vanished.

    Coordinates are rounded to 2 decimals before anything is rasterised, so the polygon
    written to json decodes to the very pixels that were drawn.
    """
    points = unit * size @ _rotation(angle).T + np.asarray(center)
    points = np.round(_clip_polygon(points, w, h), 2)
    if len(points) < 3 or _polygon_area(points) < 0.5:
        return None
    return [float(v) for v in points.ravel()]


def _clip_polygon(points: np.ndarray, w: float, h: float) -> np.ndarray:
    """Sutherland-Hodgman clipping to the image rectangle [0, w] x [0, h]."""
    for axis, limit, keep_below in ((0, 0.0, False), (0, w, True), (1, 0.0, False),
                                    (1, h, True)):
        if len(points) == 0:
            break
        inside = points[:, axis] <= limit if keep_below else points[:, axis] >= limit
        if inside.all():
            continue
        clipped = []
        for i in range(len(points)):
            a, b = points[i - 1], points[i]
            if inside[i] != inside[i - 1]:  # the edge crosses the line: add the crossing
                t = (limit - a[axis]) / (b[axis] - a[axis])
                clipped.append(a + t * (b - a))
            if inside[i]:
                clipped.append(b)
        points = np.array(clipped).reshape(-1, 2)
    return points


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _raster(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """Union of polygons as a bool mask, by pycocotools: the rasteriser readers will use."""
    rles = mask_utils.frPyObjects(polygons, h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _paint(rng, canvas: np.ndarray, mask: np.ndarray, patterns) -> None:
    """Fill ``mask`` with a colour that stands out from what is under it, maybe textured."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    region, inside = canvas[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    under = region[inside].mean(0)
    for _ in range(6):  # a shape the colour of its background would be unlearnable
        color = rng.uniform(20, 240, 3).astype(np.float32)
        if np.linalg.norm(color - under) > 80:
            break
    y = np.arange(y1 - y0, dtype=np.float32)[:, None]
    x = np.arange(x1 - x0, dtype=np.float32)[None, :]
    pattern = _pattern(rng, y, x, patterns)
    other = np.clip(color * rng.uniform(0.4, 0.7) + rng.uniform(0, 80), 0, 255)
    fill = color + (other - color) * pattern[..., None]
    region[inside] = fill[inside]


def _pattern(rng, y: np.ndarray, x: np.ndarray, patterns) -> np.ndarray:
    """Mixing weight in [0, 1] over a box: flat, stripes, checker or a shading ramp."""
    kind = rng.choice(4, p=patterns)
    if kind == 0:
        return np.zeros(np.broadcast_shapes(y.shape, x.shape), np.float32)
    if kind == 1:
        period, angle = rng.uniform(3, 9), rng.uniform(0, np.pi)
        u = x * math.cos(angle) + y * math.sin(angle)
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if kind == 2:
        cell = int(rng.integers(2, 7))
        return ((y // cell + x // cell) % 2).astype(np.float32)
    extent = max(y.shape[0], x.shape[1], 1)
    angle = rng.uniform(0, 2 * np.pi)
    return np.clip(0.5 + (x * math.cos(angle) + y * math.sin(angle)) / extent * 0.6, 0, 1) * 0.8


# ---------------------------------------------------------------------------- file output


def _id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic encoding: id = R + 256 G + 256^2 B."""
    return np.ascontiguousarray(ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3])


def _encode_image(pixels: np.ndarray, ext: str) -> bytes:
    buffer = io.BytesIO()
    if ext == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Low compression: these are read by machines, and level 1 is several times faster.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_split_json(out: Path, split: str, entries, instances, panoptic) -> None:
    info = {"description": "frozenseg synthetic shapes", "version": str(SYNTH_VERSION)}
    categories = [{"id": c.id, "name": c.name, "supercategory": c.supercategory}
                  for c in THINGS]
    coco = {"info": info, "licenses": [], "images": entries, "annotations": instances,
            "categories": categories}
    pan_categories = [{"id": c.id, "name": c.name, "supercategory": c.supercategory,
                       "isthing": c.isthing, "color": list(c.color)} for c in CATEGORIES]
    pan = {"info": info, "licenses": [], "images": entries, "annotations": panoptic,
           "categories": pan_categories}
    atomic_write_bytes(out / f"instances_{split}.json", _dumps(coco))
    atomic_write_bytes(out / f"panoptic_{split}.json", _dumps(pan))


def _semantic_categories() -> dict:
    return {"ignore_label": IGNORE,
            "categories": [{"index": i, "id": c.id, "name": c.name, "isthing": c.isthing,
                            "color": list(c.color)} for i, c in enumerate(CATEGORIES)]}


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


