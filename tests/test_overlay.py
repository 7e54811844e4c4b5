"""Overlays as ``frozenseg predict`` and the demo draw them: small images drawn larger, and
labels placed inside the picture, clear of each other (no model needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def test_a_small_image_is_drawn_larger_with_its_mask_in_place():
    from frozenseg.head.overlay import draw_instances

    grey = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
    mask = np.zeros((40, 60), np.uint8)
    mask[20:36, 10:40] = 1
    result = {"segmentation": mask_utils.encode(np.asfortranarray(mask)), "bbox": [10, 20, 30, 16],
              "score": 0.9, "category_id": 1}
    assert draw_instances(grey, [result], {1: "disc"}).size == (60, 40)   # min_side 0: as is
    canvas = np.asarray(draw_instances(grey, [result], {1: "disc"}, min_side=100))
    assert canvas.shape == (120, 180, 3)                                  # 3x: 40 -> 120
    changed = (canvas != 128).any(-1)
    inside = np.kron(mask, np.ones((3, 3), np.uint8)).astype(bool)
    assert changed[inside].all()                          # the whole mask, scaled, is coloured
    label_rows = slice(0, 60)                             # the label sits above the box
    outside = ~inside
    outside[label_rows] = False
    assert not changed[outside].any()                     # and nothing else below the label
    assert changed[30:60, 30:].any()                      # a label of legible size was drawn


def _inside(rect, canvas):
    left, top, right, bottom = rect
    return 0 <= left < right <= canvas[0] and 0 <= top < bottom <= canvas[1]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_boxes_at_the_top_edge_stay_apart_and_inside():
    from frozenseg.head.overlay import place_label

    canvas, label = (200, 150), (80, 14)
    boxes = [(10, 0, 110, 80), (40, 0, 150, 90), (60, 0, 68, 8)]   # overlapping, one tiny
    placed = []
    for box in boxes:
        placed.append(place_label(box, label, canvas, placed))
    assert placed[0] == (10, 0, 90, 14)                  # no room above: inside, top-left
    assert all(_inside(rect, canvas) for rect in placed)
    assert not any(_overlap(a, b) for i, a in enumerate(placed) for b in placed[i + 1:])
    small = placed[2]                                    # not laid over the tiny box
    assert not (small[0] <= 60 and small[1] <= 0 and small[2] >= 68 and small[3] >= 8)
    assert place_label((10, 50, 110, 80), label, canvas) == (10, 36, 90, 50)   # room: above


def test_a_label_at_the_right_and_bottom_edge_stays_inside():
    from frozenseg.head.overlay import place_label

    canvas, label = (200, 150), (50, 14)
    corner = place_label((185, 140, 200, 150), label, canvas)
    assert _inside(corner, canvas) and corner == (150, 126, 200, 140)
    tall = (170, 0, 200, 150)                            # the picture's whole right edge
    first = place_label(tall, label, canvas)
    second = place_label(tall, label, canvas, [first])
    assert _inside(first, canvas) and _inside(second, canvas) and not _overlap(first, second)
    everything = [(0, 0, 200, 150)]                      # nowhere free: still inside
    assert _inside(place_label(tall, label, canvas, everything), canvas)
    assert _inside(place_label((0, 0, 5, 5), (40, 30), (40, 20)), (40, 30))   # too tall: top


def test_labels_are_drawn_where_they_were_placed(monkeypatch):
    from frozenseg.head import overlay

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((60, 80, 3)) * 60 + 100).astype(np.uint8))
    boxes = [[0, 0, 40, 30], [10, 0, 50, 40], [70, 50, 10, 10]]   # two at the top, a corner
    results = []
    for score, (x, y, w, h) in zip([0.9, 0.8, 0.7], boxes, strict=True):
        mask = np.zeros((60, 80), np.uint8)
        mask[y:y + h, x:x + w] = 1
        results.append({"segmentation": mask_utils.encode(np.asfortranarray(mask)),
                        "bbox": [x, y, w, h], "score": score, "category_id": 1})
    placed, place = [], overlay.place_label

    def recording(*args):
        placed.append(place(*args))
        return placed[-1]

    monkeypatch.setattr(overlay, "place_label", recording)
    canvas = np.asarray(overlay.draw_instances(image, results, {1: "cat"}, min_side=240))
    size = canvas.shape[1::-1]
    assert len(placed) == 3 and all(_inside(rect, size) for rect in placed)
    assert not any(_overlap(a, b) for i, a in enumerate(placed) for b in placed[i + 1:])
    for (left, top, right, bottom), colour in zip(placed, overlay.instance_colours(3),
                                                  strict=True):
        patch = canvas[top:bottom, left:right]
        assert (patch == colour).all(-1).mean() > 0.5   # the filled rectangle in its colour
        assert (patch.max(-1) < 60).any()                # with black text on it


def test_each_object_is_drawn_once_under_its_best_class():
    from frozenseg.head.overlay import one_per_object

    def result(image, box, category, score):
        return {"image_id": image, "bbox": box, "category_id": category, "score": score}

    results = [result(1, [10.0, 20.0, 30.0, 40.0], 3, 0.6),
               result(1, [10.0, 20.0, 30.0, 40.5], 2, 0.5),   # another box: kept
               result(1, [10.0, 20.0, 30.0, 40.0], 1, 0.4),   # the first query's 2nd class
               result(2, [10.0, 20.0, 30.0, 40.0], 1, 0.3)]   # the same box, another image
    assert one_per_object(results) == [results[0], results[1], results[3]]
