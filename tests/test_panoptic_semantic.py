"""CocoPanoptic and SemanticSegmentation: PNG decoding, agreement with synth's other files,
category mapping, bad files, views (flip, resize, crop, pad) and collate."""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frozenseg.data import (
    CocoInstances,
    CocoPanoptic,
    SemanticSegmentation,
    apply_view,
    collate,
    large_scale_jitter,
    panoptic_to_semantic,
    read_semantic_categories,
)
from frozenseg.data.synth import CATEGORIES, IGNORE, synth

# pycocotools 2.0 with numpy 2 warns inside its own decode; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    # Seed 0: 3 train images at most 80 px, one of them with a crowd; PNG images, lossless.
    synth(out, images=4, seed=0, min_size=48, max_size=80, image_format="png", workers=1)
    return out


def _panoptic(root: Path, split: str = "train", **kwargs) -> CocoPanoptic:
    return CocoPanoptic(root / "images" / split, root / f"panoptic_{split}.json",
                        root / f"panoptic_{split}", **kwargs)


def _semantic(root: Path, split: str = "train", **kwargs) -> SemanticSegmentation:
    cats = read_semantic_categories(root / "semantic_categories.json")
    return SemanticSegmentation(root / "images" / split, root / f"semantic_{split}",
                                categories=cats.names, ignore_value=cats.ignore_value, **kwargs)


def _decode_png(path: Path) -> np.ndarray:
    """Segment ids (H, W) from a COCO panoptic PNG, independently of the dataset's code."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _write_ids(path: Path, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _mask_box(mask: np.ndarray) -> list[float]:
    """xyxy pixel edges of a mask's pixels."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


# Hand-written: category ids 40 (stuff), 7 and 23 (things) -> indices 2, 0, 1.
CATS = [{"id": 40, "name": "wall", "isthing": 0}, {"id": 7, "name": "cat", "isthing": 1},
        {"id": 23, "name": "dog", "isthing": 1}]
IDS_A = np.array([[1, 1, 0, 300, 300, 300],
                  [1, 1, 0, 300, 300, 300],
                  [70000, 70000, 70000, 70000, 0, 0],
                  [70000, 70000, 70000, 70000, 0, 0]])  # 4x6: cat 1, dog 300, wall 70000, void 0
IDS_B = np.full((3, 5), 5)  # all wall


def _hand_written(tmp_path: Path) -> tuple[Path, dict]:
    """Two images (ids 5 and 2, listed out of order) with PNGs of known segment ids."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, ids, segments in (
            (5, IDS_A, [{"id": 300, "category_id": 23}, {"id": 1, "category_id": 7, "iscrowd": 1},
                        {"id": 70000, "category_id": 40, "iscrowd": 0}]),
            (2, IDS_B, [{"id": 5, "category_id": 40}])):
        h, w = ids.shape
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"im{image_id}.png")
        _write_ids(tmp_path / f"pan{image_id}.png", ids)
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": f"pan{image_id}.png",
                            "segments_info": segments})
    data = {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATS)}
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(data))
    return path, data


# ------------------------------------------------------------------------------ synth


def test_synth_masks_are_the_png_decoded(synth_dir):
    dataset = _panoptic(synth_dir)
    pan = json.loads((synth_dir / "panoptic_train.json").read_text())
    isthing = {c["id"]: bool(c["isthing"]) for c in pan["categories"]}
    sorted_ids = sorted(isthing)
    for index, ann in enumerate(sorted(pan["annotations"], key=lambda a: a["image_id"])):
        image, target = _quiet(lambda index=index: dataset[index])
        ids = _decode_png(synth_dir / "panoptic_train" / ann["file_name"])
        masks = target["masks"].numpy()
        assert target["image_id"] == ann["image_id"] and image.shape[-2:] == ids.shape
        assert masks.shape == (len(ann["segments_info"]), *ids.shape)
        # Disjoint, and together with void they cover the image exactly once.
        assert (masks.sum(0) + (ids == 0) == 1).all()
        for k, seg in enumerate(ann["segments_info"]):
            assert (masks[k] == (ids == seg["id"])).all()
            assert target["labels"][k] == sorted_ids.index(seg["category_id"])
            assert bool(target["isthing"][k]) == isthing[seg["category_id"]]
            assert bool(target["iscrowd"][k]) == bool(seg["iscrowd"])
            assert target["area"][k] == masks[k].sum() == seg["area"]
            assert target["boxes"][k].tolist() == _mask_box(masks[k])
            x, y, w, h = seg["bbox"]
            assert target["boxes"][k].tolist() == [x, y, x + w, y + h]


def test_synth_things_are_the_instances(synth_dir):
    panoptic = _panoptic(synth_dir)
    instances = CocoInstances(synth_dir / "images" / "train", synth_dir / "instances_train.json")
    assert [panoptic.category_ids[k] for k in panoptic.thing_classes] == instances.category_ids
    assert all(not panoptic.is_thing[k] for k in panoptic.stuff_classes)
    crowds = 0
    for index in range(len(panoptic)):
        _, pan = panoptic[index]
        _, inst = instances[index]
        things = pan["isthing"]
        assert pan["image_id"] == inst["image_id"]
        # synth lists the things first in segments_info, in annotation order.
        assert things.tolist() == sorted(things.tolist(), reverse=True)
        assert torch.equal(pan["masks"][things], inst["masks"])
        assert torch.equal(pan["boxes"][things], inst["boxes"])
        assert torch.equal(pan["iscrowd"][things], inst["iscrowd"])
        assert ([panoptic.category_ids[k] for k in pan["labels"][things]]
                == [instances.category_ids[k] for k in inst["labels"]])
        crowds += int(inst["iscrowd"].sum())
    assert crowds > 0  # the fixture covers a crowd


def test_synth_semantic_equals_panoptic_derived(synth_dir):
    panoptic, semantic = _panoptic(synth_dir), _semantic(synth_dir)
    cats = read_semantic_categories(synth_dir / "semantic_categories.json")
    assert cats.ids == panoptic.category_ids == [c.id for c in CATEGORIES]
    assert cats.names == panoptic.category_names and cats.ignore_value == IGNORE
    assert cats.isthing == panoptic.is_thing
    assert len(semantic) == len(panoptic)
    for index in range(len(panoptic)):
        image, pan = panoptic[index]
        sem_image, sem = _quiet(lambda index=index: semantic[index])
        assert torch.equal(image, sem_image)
        assert sem["file_name"] == panoptic.images[index]["file_name"]
        assert sem["sem_seg"].dtype == torch.int64
        assert torch.equal(sem["sem_seg"], panoptic_to_semantic(pan, IGNORE))


def _flip_resize_crop(height: int, width: int) -> dict:
    return {"input_size": [height, width],
            "steps": [{"op": "hflip"}, {"op": "resize", "size": [2 * height, 2 * width]},
                      {"op": "crop", "top": 3, "left": 5, "height": height, "width": width}]}


def test_view_flip_resize_crop_equals_transforming_the_masks(synth_dir):
    dataset = _panoptic(synth_dir)
    semantic = _semantic(synth_dir)
    for index in range(len(dataset)):
        image, target = dataset[index]
        view = _flip_resize_crop(*image.shape[-2:])
        got_image, got = dataset.get_view(index, view)
        want_image, want = apply_view(image, target, view)
        assert torch.equal(got_image, want_image)
        for key in ("boxes", "labels", "masks", "iscrowd", "isthing", "area"):
            assert torch.equal(got[key], want[key]), key
        # Independently: a 2x nearest-neighbour upsample repeats each pixel twice.
        h, w = image.shape[-2:]
        expected = target["masks"].flip(-1).repeat_interleave(2, 1).repeat_interleave(2, 2)
        expected = expected[:, 3:3 + h, 5:5 + w]
        kept = expected.flatten(1).any(1)
        assert torch.equal(got["masks"], expected[kept])
        assert torch.equal(got["labels"], target["labels"][kept])
        assert torch.equal(got["isthing"], target["isthing"][kept])
        # The label map goes through the same geometry.
        _, sem = semantic.get_view(index, view)
        assert torch.equal(sem["sem_seg"], panoptic_to_semantic(got))


def test_transformed_items_replay_and_keep_fields_aligned(synth_dir):
    dataset = _panoptic(synth_dir, transform=large_scale_jitter(output_size=48, scale=(0.3, 2)))
    clone = pickle.loads(pickle.dumps(dataset))
    torch.manual_seed(0)
    for index in range(len(dataset)):
        for _ in range(3):
            image, target = dataset[index]
            n = len(target["labels"])
            assert image.shape[-2:] == (48, 48) and target["masks"].shape == (n, 48, 48)
            assert len(target["isthing"]) == len(target["iscrowd"]) == len(target["boxes"]) == n
            is_thing = torch.tensor(dataset.is_thing)
            assert torch.equal(target["isthing"], is_thing[target["labels"]])
            again_image, again = clone.get_view(index, json.loads(json.dumps(target["view"])))
            assert torch.equal(image, again_image)
            for key in ("boxes", "labels", "masks", "isthing", "area", "size"):
                assert torch.equal(target[key], again[key]), key
    images, padding_mask, targets = collate([dataset[0], None, dataset[1]])
    assert images.shape == (2, 3, 48, 48) and padding_mask.shape == (2, 48, 48)
    assert [t["image_id"] for t in targets] == [dataset.images[0]["id"], dataset.images[1]["id"]]
    assert all(t["masks"].shape[-2:] == (48, 48) for t in targets)


# ------------------------------------------------------------------------- hand-written


def test_hand_written_reads_back_exact_masks_and_labels(tmp_path):
    path, _ = _hand_written(tmp_path)
    dataset = CocoPanoptic(tmp_path, path, tmp_path)
    assert dataset.category_ids == [7, 23, 40] and dataset.category_names == ["cat", "dog", "wall"]
    assert dataset.category_index == {7: 0, 23: 1, 40: 2}
    assert dataset.is_thing == [True, True, False]
    assert dataset.thing_classes == [0, 1] and dataset.stuff_classes == [2]
    assert [im["id"] for im in dataset.images] == [2, 5]
    _, target = _quiet(lambda: dataset[1])
    assert target["image_id"] == 5
    assert target["labels"].tolist() == [1, 0, 2]  # dog, cat, wall: segments_info order
    for mask, seg_id in zip(target["masks"], (300, 1, 70000), strict=True):
        assert torch.equal(mask, torch.from_numpy(IDS_A == seg_id))
    assert target["iscrowd"].tolist() == [False, True, False]
    assert target["isthing"].tolist() == [True, True, False]
    assert target["boxes"].tolist() == [[3, 0, 6, 2], [0, 0, 2, 2], [0, 2, 4, 4]]
    assert target["area"].tolist() == [6, 4, 8]
    assert target["orig_size"].tolist() == target["size"].tolist() == [4, 6]
    semantic = panoptic_to_semantic(target)
    assert semantic.tolist() == [[0, 0, 255, 1, 1, 1], [0, 0, 255, 1, 1, 1],
                                 [2, 2, 2, 2, 255, 255], [2, 2, 2, 2, 255, 255]]
    _, other = _quiet(lambda: dataset[0])
    assert other["labels"].tolist() == [2] and bool(other["masks"].all())


def test_segments_absent_from_png_dropped_with_one_warning(tmp_path):
    path, data = _hand_written(tmp_path)
    for ann in data["annotations"]:
        ann["segments_info"].append({"id": 77, "category_id": 7})  # no pixel has id 77
    path.write_text(json.dumps(data))
    dataset = CocoPanoptic(tmp_path, path, tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        targets = [dataset[i][1] for i in (0, 1, 0, 1)]
    assert len(record) == 1 and "1 segment(s)" in str(record[0].message)
    assert str(path) in str(record[0].message)
    assert [t["labels"].tolist() for t in targets[:2]] == [[2], [1, 0, 2]]


def test_missing_or_mismatched_png_warns_once_and_returns_none(tmp_path):
    path, _ = _hand_written(tmp_path)
    (tmp_path / "pan2.png").unlink()
    _write_ids(tmp_path / "pan5.png", np.ones((3, 3), np.int64))
    dataset = CocoPanoptic(tmp_path, path, tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert dataset[0] is None and dataset[1] is None
        assert dataset[0] is None and dataset[1] is None  # no second warning
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert str(tmp_path / "pan2.png") in messages[0] and "cannot read" in messages[0]
    assert str(tmp_path / "pan5.png") in messages[1] and "3x3" in messages[1]
    batch = collate([dataset[0], dataset[1]])
    assert batch[0].shape[0] == 0 and batch[2] == []


def _edit_ann(field: str, value=None):
    def edit(data):
        if value is None:
            del data["annotations"][0][field]
        else:
            data["annotations"][0][field] = value
    return edit


def _edit_segment(field: str, value=None):
    def edit(data):
        if value is None:
            del data["annotations"][0]["segments_info"][0][field]
        else:
            data["annotations"][0]["segments_info"][0][field] = value
    return edit


def _drop_isthing(data):
    del data["categories"][1]["isthing"]


def _second_annotation(data):
    data["annotations"].append(dict(data["annotations"][0]))


def _drop_annotations(data):
    del data["annotations"]


@pytest.mark.parametrize("edit, field", [
    (_edit_ann("segments_info"), "segments_info"),
    (_edit_ann("segments_info", {"id": 1}), "segments_info"),
    (_edit_ann("file_name"), "file_name"),
    (_edit_ann("image_id", 99), "image_id"),
    (_second_annotation, "image_id"),
    (_drop_annotations, "annotations"),
    (_drop_isthing, "isthing"),
    (_edit_segment("id"), "id"),
    (_edit_segment("id", 0), "id"),
    (_edit_segment("category_id", 8), "category_id"),
])
def test_bad_json_raises_naming_file_and_field(tmp_path, edit, field):
    _, data = _hand_written(tmp_path)
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        CocoPanoptic(tmp_path, path, tmp_path)
    message = str(error.value)
    assert str(path) in message and f"'{field}'" in message and "\n" not in message


# --------------------------------------------------------------------------- semantic


def _labelled(tmp_path: Path, ignore: int = 200) -> Path:
    """images/{a,b}.png with labels/{a,b}.png of classes 0..2 and ``ignore``."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(1)
    for stem, (h, w) in (("a", (6, 5)), ("b", (4, 7))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{stem}.png")
        labels = rng.choice(np.array([0, 1, 2, ignore], np.uint8), (h, w))
        Image.fromarray(labels).save(tmp_path / "labels" / f"{stem}.png")
    return tmp_path


def test_semantic_reads_labels_and_pads_with_the_ignore_value(tmp_path):
    root = _labelled(tmp_path)
    dataset = SemanticSegmentation(root / "images", root / "labels",
                                   categories=["x", "y", "z"], ignore_value=200)
    image, target = _quiet(lambda: dataset[1])
    stored = torch.from_numpy(np.asarray(Image.open(root / "labels" / "b.png")).astype(np.int64))
    assert target["image_id"] == "b" and target["file_name"] == "b.png"
    assert torch.equal(target["sem_seg"], stored) and target["size"].tolist() == [4, 7]
    view = {"input_size": [4, 7], "steps": [{"op": "resize", "size": [8, 14]},
                                            {"op": "pad", "size": [10, 16]}]}
    padded_image, padded = dataset.get_view(1, view)
    sem = padded["sem_seg"]
    assert sem.shape == padded_image.shape[-2:] == (10, 16) and sem.dtype == torch.int64
    assert (sem[8:] == 200).all() and (sem[:, 14:] == 200).all()
    upsampled = stored.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(sem[:8, :14], upsampled)  # nearest-neighbour: no new values
    images, padding_mask, targets = collate([dataset[0], None, (padded_image, padded)])
    assert images.shape == (2, 3, 10, 16) and torch.equal(targets[1]["sem_seg"], sem)
    assert bool(padding_mask[1, 8:].all()) and not bool(padding_mask[1, :8, :14].any())


def test_semantic_bad_files(tmp_path):
    root = _labelled(tmp_path)
    Image.new("RGB", (3, 3)).save(root / "images" / "unlabelled.png")
    Image.new("RGB", (3, 3)).save(root / "images" / "rgb.png")
    Image.new("RGB", (3, 3)).save(root / "labels" / "rgb.png")  # three channels
    Image.new("RGB", (3, 3)).save(root / "images" / "small.png")
    Image.new("L", (2, 3)).save(root / "labels" / "small.png")  # another size
    Image.new("RGB", (3, 3)).save(root / "images" / "value.png")
    Image.new("L", (3, 3), 9).save(root / "labels" / "value.png")  # neither class nor ignore
    with pytest.warns(UserWarning, match="1 image"):
        dataset = SemanticSegmentation(root / "images", root / "labels",
                                       categories=["x", "y", "z"], ignore_value=200)
    assert dataset.file_names == ["a.png", "b.png", "rgb.png", "small.png", "value.png"]
    assert dataset.num_unlabelled == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert all(dataset[i] is None for i in (2, 3, 4, 2, 3, 4))
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert "mode RGB" in messages[0] and "is 3x2 (HxW)" in messages[1] and "holds 9" in messages[2]
    with pytest.raises(ValueError, match="is a class index"):
        SemanticSegmentation(root / "images", root / "labels", categories=["x"], ignore_value=0)
