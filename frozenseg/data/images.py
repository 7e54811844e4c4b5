"""Reading image files: the one place frozenseg opens a picture (datasets, cache, export,
predict and overlays all come here), so that every command sees the same pixels.

* **EXIF orientation is applied**, as detectron2 and Ultralytics do: a phone's JPEG stored
  sideways with an orientation tag is read the way every viewer shows it, and its size is
  the displayed one (:func:`image_size` swaps height and width for the rotated tags).
* **Every mode becomes 8-bit RGB.** High bit depths are scaled from their range, not
  clipped (PIL's ``convert("RGB")`` saturates a 16-bit grayscale PNG to white):
  16-bit modes (``I;16*``) from 0..65535; 32-bit integer (``I``) and float (``F``) images,
  whose bit depth the file does not say, from the smallest of [0, 1] (floats only),
  0..255, 0..65535 and 0..2^32-1 that holds their largest value. Alpha is dropped;
  palette, CMYK, grayscale and the rest go through PIL's own conversion.

Label maps and panoptic PNGs are not pictures: :func:`read_stored` reads their values as
they are, never rotated or scaled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# What reading a bad image file can raise (PIL raises SyntaxError for some broken headers).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_ORIENTATION = 0x0112  # the EXIF tag
_SIDEWAYS = (5, 6, 7, 8)  # orientations that swap width and height
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: str | Path) -> Image.Image:
    """The picture at ``path`` as an 8-bit RGB image, upright (see the module docstring).
    Decodes the whole file now, so a truncated one raises here (one of IMAGE_ERRORS)."""
    with Image.open(path) as pil:
        upright = ImageOps.exif_transpose(pil)
    return to_rgb(upright)


def read_stored(path: str | Path) -> Image.Image:
    """The file's values as stored (a label map, a panoptic PNG): decoded now, no EXIF
    rotation, no conversion."""
    with Image.open(path) as pil:
        return pil.copy()


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the picture :func:`read_image` returns, from the header alone."""
    with Image.open(path) as pil:
        width, height = pil.size
        if pil.getexif().get(_ORIENTATION) in _SIDEWAYS:
            width, height = height, width
    return height, width


def to_rgb(pil: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, high bit depths scaled from their range."""
    if pil.mode in (*_SIXTEEN_BIT, "I", "F"):
        values = np.asarray(pil).astype(np.float64)
        top = 65535.0 if pil.mode in _SIXTEEN_BIT else _value_range(values, pil.mode)
        scaled = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return pil.convert("RGB")


def _value_range(values: np.ndarray, mode: str) -> float:
    """The range of an ``I`` or ``F`` image: the smallest usual one that holds its maximum."""
    largest = float(values.max()) if values.size else 0.0
    ranges = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0, 2.0**32 - 1)
    return next((top for top in ranges if largest <= top), ranges[-1])
