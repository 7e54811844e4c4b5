"""What a detector's class indices mean: names and dataset category ids.

COCO detectors come in two layouts: 91 slots indexed by the COCO category id itself
(official DETR, Deformable DETR, DINO, H-DETR, Hugging Face; unused ids never fire)
and 80 contiguous classes (detectron2 / detrex). Both map back to COCO's ids.
"""

from __future__ import annotations

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl",
    52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch",
    64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def class_map(num_classes: int, names: list[str] | None = None) -> dict[str, list]:
    """{"names": [...], "category_ids": [...]}, one entry per classifier index.

    Given names are contiguous classes 0..K-1. Without names, 91 and 80 classes are
    taken to be COCO's two layouts; other counts get no names. None marks a slot that
    stands for no category.
    """
    if names is not None:
        return {"names": list(names), "category_ids": list(range(num_classes))}
    if num_classes == 91:
        ids = [i if i in COCO_CATEGORIES else None for i in range(91)]
        return {"names": [COCO_CATEGORIES.get(i) for i in range(91)], "category_ids": ids}
    if num_classes == len(COCO_CATEGORIES):
        return {"names": list(COCO_CATEGORIES.values()), "category_ids": list(COCO_CATEGORIES)}
    return {"names": [None] * num_classes, "category_ids": list(range(num_classes))}
