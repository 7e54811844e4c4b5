"""frozenseg.boxes: the one converter between DETR's normalised cxcywh and xyxy pixels."""

import torch

from frozenseg.boxes import to_normalized, to_pixels


def _reference_pixels(box, size):
    """One box, by hand, in float64: the corners of (cx, cy, w, h) in an H x W image."""
    cx, cy, w, h = (float(v) for v in box)
    height, width = size
    return [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
            (cy + h / 2) * height]


def test_to_pixels_matches_the_definition_per_image_of_a_batch():
    boxes = torch.rand(2, 5, 4, dtype=torch.float64)
    sizes = torch.tensor([[480, 640], [333, 500]])
    pixels = to_pixels(boxes, sizes[:, None])
    for b in range(2):
        for k in range(5):
            expected = _reference_pixels(boxes[b, k], sizes[b].tolist())
            torch.testing.assert_close(pixels[b, k], torch.tensor(expected, dtype=torch.float64))


def test_round_trip_and_clipping():
    size = (120, 200)
    boxes = torch.tensor([[10.0, 20.0, 110.0, 90.0], [-5.0, 100.0, 250.0, 130.0]])
    torch.testing.assert_close(to_pixels(to_normalized(boxes, size), size), boxes)
    clipped = to_pixels(to_normalized(boxes, size, clip=True), size)
    torch.testing.assert_close(clipped[1], torch.tensor([0.0, 100.0, 200.0, 120.0]))
    assert to_normalized(boxes, torch.tensor(size)).dtype == torch.float32
