"""CocoInstances: category mapping, mask decoding, bad json, unreadable images, collate."""

from __future__ import annotations

import copy
import json
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from frozenseg.data import CocoInstances, collate, deformable_detr_train, large_scale_jitter
from frozenseg.data.transforms import identity_view, output_size

SIZES = {1: (40, 60), 2: (50, 30), 5: (32, 32)}  # image id -> (H, W); 5 has no annotations


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's list-of-counts RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def _coco(tmp_path: Path) -> dict:
    """A small COCO json (non-contiguous categories, every segmentation kind) + images."""
    rng = np.random.default_rng(0)
    images = []
    for image_id, (h, w) in SIZES.items():
        name = f"img{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    blob = np.zeros((40, 60), dtype=np.uint8)
    blob[5:20, 30:50] = 1
    blob[10:15, 35:40] = 0
    rle = mask_utils.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode("ascii")
    crowd = np.zeros((50, 30), dtype=np.uint8)
    crowd[20:45, 2:28] = 1
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 20, 25], "iscrowd": 0,
         "segmentation": [[2, 3, 22, 3, 12, 28]], "area": 250.0},
        {"id": 11, "image_id": 1, "category_id": 12, "bbox": [30, 5, 20, 15], "iscrowd": 0,
         "segmentation": rle, "area": float(blob.sum())},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [2, 20, 26, 25], "iscrowd": 1,
         "segmentation": _uncompressed_rle(crowd), "area": float(crowd.sum())},
        {"id": 13, "image_id": 2, "category_id": 7, "bbox": [1, 1, 14, 10], "iscrowd": 0,
         "segmentation": [[1, 1, 8, 1, 8, 11, 1, 11], [9, 1, 15, 1, 15, 6]], "area": 90.0},
    ]
    categories = [{"id": 12, "name": "cup"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write(tmp_path: Path, data: dict, name: str = "instances.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, dict]:
    data = _coco(tmp_path)
    return _write(tmp_path, data), data


def _by_id(dataset: CocoInstances, image_id: int) -> tuple[torch.Tensor, dict]:
    index = [im["id"] for im in dataset.images].index(image_id)
    return dataset[index]


def test_category_mapping_non_contiguous(coco):
    path, _ = coco
    dataset = CocoInstances(path.parent, path)
    assert dataset.category_ids == [3, 7, 12]
    assert dataset.category_index == {3: 0, 7: 1, 12: 2}
    assert dataset.category_names == ["cat", "dog", "cup"]
    assert _by_id(dataset, 1)[1]["labels"].tolist() == [1, 2]
    assert _by_id(dataset, 2)[1]["labels"].tolist() == [0, 1]


def test_masks_match_pycocotools(coco):
    path, data = coco
    dataset = CocoInstances(path.parent, path)
    api = COCO(str(path))
    for image_id in (1, 2):
        image, target = _by_id(dataset, image_id)
        h, w = SIZES[image_id]
        assert image.shape == (3, h, w) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        anns = [a for a in data["annotations"] if a["image_id"] == image_id]
        assert target["image_id"] == image_id
        assert target["masks"].shape == (len(anns), h, w) and target["masks"].dtype == torch.bool
        for mask, ann in zip(target["masks"], anns, strict=True):
            assert torch.equal(mask, torch.from_numpy(api.annToMask(ann)).bool())
        expected = [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]
        assert target["boxes"].tolist() == expected
        assert target["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["orig_size"].tolist() == [h, w] == target["size"].tolist()
        assert target["view"] == identity_view((h, w))
        json.dumps(target["view"])


def test_image_without_annotations(coco):
    path, _ = coco
    image, target = _by_id(CocoInstances(path.parent, path), 5)
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, 32, 32) and target["masks"].dtype == torch.bool
    assert target["iscrowd"].shape == (0,) and target["area"].shape == (0,)


def test_empty_target_survives_train_transform(coco):
    path, _ = coco
    dataset = CocoInstances(path.parent, path, transform=deformable_detr_train())
    for _ in range(5):
        image, target = _by_id(dataset, 5)
        assert target["masks"].shape == (0, *image.shape[-2:])
        assert target["size"].tolist() == list(image.shape[-2:])


def test_degenerate_annotations_dropped_with_one_warning(tmp_path):
    data = _coco(tmp_path)
    extra = [
        {"image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 5]]},
        {"image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5], "segmentation": [[1, 1, 5, 1,
                                                                                  3, 5]]},
        {"image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": []},
    ]
    data["annotations"] += extra
    path = _write(tmp_path, data)
    with pytest.warns(UserWarning, match="dropped 3 degenerate") as record:
        dataset = CocoInstances(tmp_path, path)
    assert len(record) == 1 and str(path) in str(record[0].message)
    assert dataset.num_dropped == 3
    assert len(_by_id(dataset, 1)[1]["labels"]) == 2


def _drop(field: str):
    def edit(data):
        del data[field]
    return edit


def _drop_ann_field(field: str):
    def edit(data):
        del data["annotations"][1][field]
    return edit


def _drop_image_field(field: str):
    def edit(data):
        del data["images"][0][field]
    return edit


def _set_ann_field(field: str, value):
    def edit(data):
        data["annotations"][1][field] = value
    return edit


@pytest.mark.parametrize("edit, field", [
    (_drop("images"), "images"),
    (_drop("annotations"), "annotations"),
    (_drop("categories"), "categories"),
    (_drop_ann_field("image_id"), "image_id"),
    (_drop_ann_field("bbox"), "bbox"),
    (_drop_ann_field("category_id"), "category_id"),
    (_set_ann_field("image_id", 99), "image_id"),
    (_set_ann_field("category_id", 4), "category_id"),
    (_set_ann_field("bbox", [1, 2, 3]), "bbox"),
    (_drop_image_field("file_name"), "file_name"),
    (_drop_image_field("height"), "height"),
])
def test_bad_json_raises_naming_file_and_field(tmp_path, edit, field):
    data = _coco(tmp_path)
    edit(data)
    path = _write(tmp_path, data, "bad.json")
    with pytest.raises(ValueError) as error:
        CocoInstances(tmp_path, path)
    message = str(error.value)
    assert str(path) in message and f"'{field}'" in message and "\n" not in message


def test_not_json_raises(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        CocoInstances(tmp_path, path)


def _with_broken_images(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Images 1, 2, 5 fine; 6 corrupt; 7 missing."""
    data = _coco(tmp_path)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    data["images"] += [{"id": 6, "file_name": "corrupt.jpg", "height": 8, "width": 8},
                       {"id": 7, "file_name": "missing.png", "height": 8, "width": 8}]
    return _write(tmp_path, data), [tmp_path / "corrupt.jpg", tmp_path / "missing.png"]


def test_unreadable_image_warns_once_and_returns_none(tmp_path):
    path, broken = _with_broken_images(tmp_path)
    dataset = CocoInstances(tmp_path, path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _by_id(dataset, 6) is None and _by_id(dataset, 7) is None
        assert _by_id(dataset, 6) is None  # second time: no second warning
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert str(broken[0]) in messages[0] and str(broken[1]) in messages[1]


def _print_warnings(worker_id: int) -> None:
    # pytest records warnings into a list; a forked worker's copy of it never comes back,
    # so print them to stderr as a worker outside pytest does.
    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"{category.__name__}: {message}\n")
    warnings.showwarning = show


def test_dataloader_workers_skip_unreadable_images(tmp_path, capfd):
    path, broken = _with_broken_images(tmp_path)
    dataset = CocoInstances(tmp_path, path)
    # fork keeps the test fast; test_dataset_pickles_... covers what spawn needs.
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate,
                        multiprocessing_context="fork", worker_init_fn=_print_warnings)
    seen = []
    for images, padding_mask, targets in loader:
        assert images.shape[0] == padding_mask.shape[0] == len(targets)
        seen += [t["image_id"] for t in targets]
    assert sorted(seen) == [1, 2, 5]
    err = capfd.readouterr().err
    assert str(broken[0]) in err and str(broken[1]) in err


def test_dataset_pickles_and_get_view_reproduces(coco):
    path, _ = coco
    dataset = CocoInstances(path.parent, path, transform=deformable_detr_train())
    clone = pickle.loads(pickle.dumps(dataset))
    image, target = dataset[0]
    again, target_again = clone.get_view(0, json.loads(json.dumps(target["view"])))
    assert torch.equal(image, again)
    for key in ("boxes", "labels", "masks", "iscrowd", "area", "size"):
        assert torch.equal(target[key], target_again[key]), key


def test_collate_pads_and_masks():
    a, b = torch.rand(3, 4, 6), torch.rand(3, 5, 3)
    ta, tb = {"image_id": 1}, {"image_id": 2}
    images, padding_mask, targets = collate([(a, ta), None, (b, tb)])
    assert images.shape == (2, 3, 5, 6) and padding_mask.shape == (2, 5, 6)
    assert torch.equal(images[0, :, :4, :6], a) and torch.equal(images[1, :, :5, :3], b)
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    expected = torch.ones(2, 5, 6, dtype=torch.bool)
    expected[0, :4, :6] = False
    expected[1, :5, :3] = False
    assert torch.equal(padding_mask, expected)
    assert [t["image_id"] for t in targets] == [1, 2]


def test_collate_masks_the_padding_of_large_scale_jitter():
    image, target = large_scale_jitter(output_size=64)(torch.rand(3, 20, 40), {}, 0)
    assert image.shape == (3, 64, 64)
    content = [s for s in target["view"]["steps"] if s["op"] != "pad"]
    height, width = output_size(content, (20, 40))
    _, padding_mask, _ = collate([(image, target)])
    expected = torch.ones(1, 64, 64, dtype=torch.bool)
    expected[0, :height, :width] = False
    assert torch.equal(padding_mask, expected)


def test_collate_all_failed_is_empty():
    images, padding_mask, targets = collate([None, None])
    assert images.shape[0] == 0 and padding_mask.shape[0] == 0 and targets == []


def test_rle_size_mismatch_is_an_error(tmp_path):
    data = _coco(tmp_path)
    bad = copy.deepcopy(data["annotations"][1])
    bad["segmentation"]["size"] = [10, 10]
    data["annotations"].append(bad)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match="'segmentation' size"):
        CocoInstances(tmp_path, path)
