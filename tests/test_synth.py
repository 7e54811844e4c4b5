"""The synthetic dataset: deterministic, and its instances, panoptic and semantic files agree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

import frozenseg
from frozenseg.cli import app
from frozenseg.data.synth import IGNORE, MIN_OBJECT, SynthError, synth

N_IMAGES = 20
# pycocotools 2.0 with numpy 2 warns inside its own decode; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synth(out, images=N_IMAGES, seed=0)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _panoptic_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _splits(root: Path):
    """(split, COCO instances, panoptic json) for train and val."""
    for split in ("train", "val"):
        coco = COCO(str(root / f"instances_{split}.json"))
        panoptic = json.loads((root / f"panoptic_{split}.json").read_text())
        yield split, coco, panoptic


def test_layout_and_split_sizes(dataset):
    record = json.loads((dataset / "synth.json").read_text())
    assert record["params"]["images"] == N_IMAGES and record["params"]["seed"] == 0
    assert (record["params"]["train"], record["params"]["val"]) == (16, 4)
    for split, coco, panoptic in _splits(dataset):
        assert len(coco.dataset["images"]) == record["params"][split]
        for image in coco.dataset["images"]:
            stem = Path(image["file_name"]).stem
            with Image.open(dataset / "images" / split / image["file_name"]) as pixels:
                assert pixels.format == "JPEG" and pixels.mode == "RGB"
                assert pixels.size == (image["width"], image["height"])
            assert 160 <= image["width"] <= 320 and 160 <= image["height"] <= 320
            assert (dataset / f"panoptic_{split}" / f"{stem}.png").is_file()
            assert (dataset / f"semantic_{split}" / f"{stem}.png").is_file()
        assert len(panoptic["annotations"]) == len(panoptic["images"])
    assert not list(dataset.rglob("*.tmp")) and not (dataset / "synth.partial.json").exists()


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    again = tmp_path / "again"
    synth(again, images=N_IMAGES, seed=0, workers=1)  # thread count must not matter either
    assert _hashes(again) == _hashes(dataset)
    other = tmp_path / "other"
    synth(other, images=N_IMAGES, seed=1)
    differ = {k for k, v in _hashes(other).items() if _hashes(dataset).get(k) != v}
    assert {f"images/train/{i:06d}.jpg" for i in range(1, 17)} <= differ


def test_annotation_masks_equal_panoptic_pixels(dataset):
    """annToMask of every annotation is exactly its segment in the panoptic PNG."""
    checked = 0
    for split, coco, panoptic in _splits(dataset):
        by_image = {a["image_id"]: a for a in panoptic["annotations"]}
        for image_id in coco.getImgIds():
            ids = _panoptic_ids(dataset / f"panoptic_{split}" / by_image[image_id]["file_name"])
            segments = {s["id"]: s for s in by_image[image_id]["segments_info"]}
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
                mask = coco.annToMask(ann).astype(bool)
                assert np.array_equal(mask, ids == ann["id"]), ann["id"]
                segment = segments[ann["id"]]
                assert segment["category_id"] == ann["category_id"]
                assert segment["iscrowd"] == ann["iscrowd"]
                checked += 1
    assert checked > 50


def test_instance_masks_do_not_overlap(dataset):
    for _, coco, _ in _splits(dataset):
        for image_id in coco.getImgIds():
            image = coco.imgs[image_id]
            cover = np.zeros((image["height"], image["width"]), np.int32)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
                cover += coco.annToMask(ann)
            assert cover.max() <= 1


def test_bbox_and_area_match_the_mask(dataset):
    for _, coco, panoptic in _splits(dataset):
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(mask)
            assert ann["area"] == mask.sum() > 0
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == [float(v) for v in box]
        for entry in panoptic["annotations"]:
            for segment in entry["segments_info"]:
                assert segment["area"] > 0 and len(segment["bbox"]) == 4


def test_segmentation_encodings(dataset):
    """Polygons for whole simple shapes, RLE (counts as str) otherwise; some crowd regions."""
    anns = [a for _, coco, _ in _splits(dataset) for a in coco.dataset["annotations"]]
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    rles = [a for a in anns if isinstance(a["segmentation"], dict)]
    assert polygons and rles and len(polygons) + len(rles) == len(anns)
    assert all(len(p) >= 6 and len(p) % 2 == 0 for a in polygons for p in a["segmentation"])
    assert all(isinstance(a["segmentation"]["counts"], str) for a in rles)
    ring = 7  # has a hole: never a polygon
    assert all(isinstance(a["segmentation"], dict) for a in anns if a["category_id"] == ring)
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"], dict) for a in crowd)
    assert len({a["id"] for a in anns}) == len(anns)


def test_categories_are_non_contiguous_with_things_and_stuff(dataset):
    _, coco, panoptic = next(_splits(dataset))
    ids = sorted(coco.getCatIds())
    assert ids != list(range(ids[0], ids[0] + len(ids)))
    assert all(c["supercategory"] for c in coco.dataset["categories"])
    isthing = {c["id"]: c["isthing"] for c in panoptic["categories"]}
    assert {i for i, t in isthing.items() if t} == set(ids)
    assert any(t == 0 for t in isthing.values())


def test_stuff_and_things_in_panoptic_and_semantic(dataset):
    semantic_info = json.loads((dataset / "semantic_categories.json").read_text())
    assert semantic_info["ignore_label"] == IGNORE
    stuff_index = {c["index"] for c in semantic_info["categories"] if not c["isthing"]}
    for split, _, panoptic in _splits(dataset):
        isthing = {c["id"]: c["isthing"] for c in panoptic["categories"]}
        kinds = {isthing[s["category_id"]] for a in panoptic["annotations"]
                 for s in a["segments_info"]}
        assert kinds == {0, 1}
        semantic = [np.asarray(Image.open(p)) for p in (dataset / f"semantic_{split}").iterdir()]
        assert any(np.isin(s, list(stuff_index)).any() for s in semantic)


def test_semantic_png_is_the_panoptic_map_in_class_indices(dataset):
    info = json.loads((dataset / "semantic_categories.json").read_text())
    index = {c["id"]: c["index"] for c in info["categories"]}
    for split, _, panoptic in _splits(dataset):
        for entry in panoptic["annotations"]:
            ids = _panoptic_ids(dataset / f"panoptic_{split}" / entry["file_name"])
            semantic = np.asarray(Image.open(dataset / f"semantic_{split}" / entry["file_name"]))
            assert semantic.dtype == np.uint8 and semantic.shape == ids.shape
            expected = np.full(ids.shape, IGNORE, np.uint8)
            for segment in entry["segments_info"]:
                where = ids == segment["id"]
                assert where.sum() == segment["area"]
                expected[where] = index[segment["category_id"]]
            assert np.array_equal(semantic, expected)
            known = np.isin(ids, [s["id"] for s in entry["segments_info"]])
            assert np.all(ids[~known] == 0)  # pixels of no segment are void (id 0)


def test_sizes_range_from_tiny_to_large_and_some_images_are_empty(dataset):
    sides, empty = [], 0
    for _, coco, _ in _splits(dataset):
        for image_id in coco.getImgIds():
            image = coco.imgs[image_id]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
            empty += not anns
            sides += [(max(a["bbox"][2:]), max(a["bbox"][2] / image["width"],
                                                 a["bbox"][3] / image["height"])) for a in anns]
    assert any(pixels < 16 for pixels, _ in sides)
    assert any(fraction > 0.4 for _, fraction in sides)
    assert empty >= 1


def test_min_object_sets_the_smallest_shape(dataset, tmp_path):
    """Shapes start at min_object px (a visible part can be smaller: occlusion, borders);
    the default is 8 px and is not recorded, so datasets made before the option reuse."""
    def largest_sides(root):
        return [max(a["bbox"][2:]) for _, coco, _ in _splits(root)
                for a in coco.loadAnns(coco.getAnnIds(iscrowd=False))]

    big = tmp_path / "big"
    synth(big, images=N_IMAGES, seed=0, min_object=40)
    default, large = largest_sides(dataset), largest_sides(big)
    assert np.median(large) > 1.5 * np.median(default)
    assert np.mean(np.array(large) >= 30) > 0.8 > np.mean(np.array(default) >= 30)
    assert json.loads((big / "synth.json").read_text())["params"]["min_object"] == 40
    assert json.loads((dataset / "synth.json").read_text())["params"]["min_object"] == MIN_OBJECT
    assert synth(dataset, images=N_IMAGES, seed=0, min_object=8).reused


def test_running_again_does_nothing(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    summary = synth(dataset, images=N_IMAGES, seed=0)
    assert summary.reused and summary.images == N_IMAGES and summary.instances > 0
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_other_parameters_need_overwrite(tmp_path):
    out = tmp_path / "data"
    synth(out, images=4, seed=0, min_size=64, max_size=96)
    with pytest.raises(SynthError, match="other parameters.*images: 4 -> 5"):
        synth(out, images=5, seed=0, min_size=64, max_size=96)
    summary = synth(out, images=5, seed=0, min_size=64, max_size=96, overwrite=True)
    assert not summary.reused and summary.images == 5
    assert len(list((out / "images" / "train").iterdir())) == summary.train


def test_interrupted_run_is_redone_and_foreign_folders_are_refused(tmp_path):
    out = tmp_path / "data"
    synth(out, images=3, seed=2, min_size=64, max_size=64)
    expected = _hashes(out)
    (out / "synth.json").rename(out / "synth.partial.json")  # as if stopped before the end
    (out / "images" / "train" / "000001.jpg").write_bytes(b"half")
    assert not synth(out, images=3, seed=2, min_size=64, max_size=64).reused
    assert _hashes(out) == expected
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SynthError, match="not empty"):
        synth(foreign, images=3)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, message", [
    ({"images": 1}, "images must be"),
    ({"images": 10, "seed": -1}, "seed must be"),
    ({"images": 10, "min_size": 300, "max_size": 200}, "min_size"),
    ({"images": 10, "image_format": "gif"}, "image_format"),
    ({"images": 10, "min_size": 64, "min_object": 40}, "min_object"),
    ({"images": 10, "world": "moon"}, "world must be one of scenes, plain"),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(SynthError, match=message):
        synth(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_public_api_and_png_images(tmp_path):
    summary = frozenseg.synth(tmp_path / "data", images=2, seed=0, image_format="png",
                              min_size=48, max_size=48)
    assert (summary.train, summary.val) == (1, 1)
    with Image.open(tmp_path / "data" / "images" / "val" / "000002.png") as image:
        assert image.format == "PNG" and image.size == (48, 48)


def test_cli_writes_and_summarises(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", "--out", str(out), "--images", "30", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "30 images (24 train, 6 val)" in result.output and "12 classes" in result.output
    assert (out / "synth.json").is_file()
    again = runner.invoke(app, ["synth", "--out", str(out), "--images", "30", "--seed", "0"])
    assert again.exit_code == 0 and "reused" in again.output
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "bad"), "--images", "1"])
    assert bad.exit_code == 1 and "images must be" in bad.output


def test_the_project_dataset_reads_it(dataset):
    """frozenseg's own COCO reader takes the files as they are (non-contiguous ids, RLE, crowd)."""
    from frozenseg.data import CocoInstances

    data = CocoInstances(dataset / "images" / "train", dataset / "instances_train.json")
    assert len(data) == 16 and data.num_classes == 8
    image, target = data[0]
    assert image.shape[0] == 3 and target["masks"].shape[1:] == image.shape[1:]


def _background_roughness(image: np.ndarray, things: np.ndarray) -> float:
    """Mean absolute difference between neighbouring background pixels (texture + noise)."""
    gray = image.astype(np.float32).mean(-1)
    free = ~things[:, 1:] & ~things[:, :-1]
    return float(np.abs(np.diff(gray, axis=1))[free].mean())


def test_the_plain_world_is_calmer_and_keeps_the_shapes(dataset, tmp_path):
    """world="plain": at most 4 shapes, no crowds, a smoother background than the scenes';
    the same classes (rings keep their holes), the same files and checks."""
    plain = tmp_path / "plain"
    synth(plain, images=N_IMAGES, seed=0, world="plain")
    record = json.loads((plain / "synth.json").read_text())
    assert record["params"]["world"] == "plain"
    # The default world is not recorded, so datasets made before worlds existed are reused.
    assert "world" not in json.loads((dataset / "synth.json").read_text())["params"]
    roughness = {}
    for name, root in (("plain", plain), ("scenes", dataset)):
        coco = COCO(str(root / "instances_train.json"))
        per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
        anns = coco.loadAnns(coco.getAnnIds())
        if name == "plain":
            assert max(per_image) <= 4 and not any(a["iscrowd"] for a in anns)
            rings = [a for a in anns if a["category_id"] == 7]
            assert all(a["area"] < a["bbox"][2] * a["bbox"][3] for a in rings)
        values = []
        for info in coco.loadImgs(coco.getImgIds()):
            image = np.asarray(Image.open(root / "images" / "train" / info["file_name"]))
            things = np.zeros(image.shape[:2], bool)
            for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
                things |= coco.annToMask(a).astype(bool)
            values.append(_background_roughness(image, things))
        roughness[name] = float(np.mean(values))
    assert roughness["plain"] < 0.5 * roughness["scenes"], roughness
