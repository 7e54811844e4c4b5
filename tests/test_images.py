"""Image files as people have them: 16-bit, grayscale, alpha, palette, CMYK, and phone
JPEGs stored sideways with an EXIF orientation. Every reader gets the same pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from frozenseg.data import CocoInstances, ImageFolder
from frozenseg.data.images import image_size, read_image

# A 2x3 gradient over the whole 16-bit range, and the 8-bit values it must read as.
SIXTEEN = np.array([[0, 257, 32896], [49344, 65280, 65535]], dtype=np.uint16)
EIGHT = np.array([[0, 1, 128], [192, 254, 255]], dtype=np.uint8)


def _pixels(path) -> np.ndarray:
    return np.asarray(read_image(path))


def test_16_bit_grayscale_is_scaled_not_saturated(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(SIXTEEN).save(path)
    assert Image.open(path).mode.startswith("I")  # a real 16-bit PNG
    pixels = _pixels(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 3, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], EIGHT)


def test_32_bit_integer_and_float_images_are_scaled_from_their_range(tmp_path):
    Image.fromarray(SIXTEEN.astype(np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(SIXTEEN.astype(np.float32) / 65535).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_array_equal(_pixels(tmp_path / "i.tif")[..., 0], EIGHT)
    np.testing.assert_array_equal(_pixels(tmp_path / "f.tif")[..., 0], EIGHT)


def test_8_bit_grayscale_alpha_palette_and_cmyk(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "gray.png"),
                                  np.repeat(rgb[..., :1], 3, axis=2))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "alpha.png"), rgb)
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(_pixels(tmp_path / "palette.png"),
                                  np.asarray(palette.convert("RGB")))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    error = np.abs(_pixels(tmp_path / "cmyk.jpg").astype(int) - rgb.astype(int))
    assert error.mean() < 8


def _sideways_jpeg(path) -> np.ndarray:
    """A 20x40 (HxW) picture stored as 40x20, with the EXIF tag that turns it back
    (orientation 6: the viewer rotates the stored pixels 90 degrees clockwise). Returns the
    upright picture a viewer shows."""
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:, :20] = (255, 0, 0)      # left half red, right half blue
    upright[:, 20:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 40x20
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif)
    return upright


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    upright = _sideways_jpeg(path)
    assert Image.open(path).size == (20, 40)  # stored sideways: 20 wide, 40 high
    assert image_size(path) == (20, 40)       # displayed: 20 high, 40 wide
    pixels = _pixels(path)
    assert pixels.shape == upright.shape
    assert np.abs(pixels.astype(int) - upright.astype(int)).mean() < 10


def test_datasets_read_16_bit_and_sideways_images_upright(tmp_path):
    """What cache, export and predict read: the datasets, on the json's displayed size."""
    images = tmp_path / "images"
    images.mkdir()
    _sideways_jpeg(images / "1.jpg")
    Image.fromarray(np.full((20, 40), 32896, dtype=np.uint16)).save(images / "2.png")
    coco = {"images": [{"id": 1, "file_name": "1.jpg", "height": 20, "width": 40},
                       {"id": 2, "file_name": "2.png", "height": 20, "width": 40}],
            "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    for dataset in (CocoInstances(images, tmp_path / "instances.json"), ImageFolder(images)):
        (phone, _), (deep, _) = dataset[0], dataset[1]
        assert phone.shape == (3, 20, 40)
        red = phone[:, :, :20].mean((1, 2))
        assert red[0] > 0.9 and red[2] < 0.1   # the left half is red, as displayed
        assert deep.shape == (3, 20, 40)
        assert deep.mul(255).round().unique().tolist() == [128.0]
    assert [(im["height"], im["width"]) for im in ImageFolder(images).images] == [(20, 40)] * 2


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_a_truncated_file_raises_when_read(tmp_path, name):
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OSError):
        read_image(path)
