"""frozenseg export and predict: COCO results others can evaluate, masks for any detector's
boxes, resume, instance PNGs, overlays."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from frozenseg.cli import app
from frozenseg.data import ImageFolder
from frozenseg.detector.classes import match_classes
from frozenseg.engine.data import eval_transform
from frozenseg.head.export import ExportSettings, export_results, masks_for_boxes, read_boxes
from frozenseg.head.paste import paste_masks
from frozenseg.head.segmenter import MaskFrozenDETR
from frozenseg.head.trained import load_trained
from tests.tiny import SCALE, recipe

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out

runner = CliRunner()


def _val(data):
    return ["--images", str(data / "images" / "val"),
            "--annotations", str(data / "instances_val.json")]


def _export(*args):
    result = runner.invoke(app, ["export", *map(str, args)])
    return result


def _given_boxes(data, tmp_path):
    """Another detector's results: the val boxes jittered, with odd fields and float
    scores, shuffled across images, one reaching outside its image, one outside it."""
    coco = json.loads((data / "instances_val.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    rng = random.Random(0)
    entries = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "bbox": [v + rng.uniform(-2, 2) for v in a["bbox"]],
                "score": rng.random(), "id": 1000 + i, "extra": {"from": "yolo"}}
               for i, a in enumerate(coco["annotations"])]
    rng.shuffle(entries)
    width, height = sizes[entries[0]["image_id"]]
    entries[0]["bbox"] = [width - 10.5, 3.25, 40.0, 20.0]      # reaches outside: clipped
    entries[1]["bbox"] = [-50.0, -50.0, 20.0, 20.0]            # nothing inside: empty mask
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(entries))
    return path, entries


# ------------------------------------------------------------------------- detector boxes


def test_export_is_coco_results_that_pycocotools_scores(tmp_path, data, trained):
    out = tmp_path / "results.json"
    result = _export("--head", trained, *_val(data), "--out", out)
    assert result.exit_code == 0, result.output
    gt = COCO(str(data / "instances_val.json"))
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= set(gt.getCatIds())
    for r in results:
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [gt.imgs[r["image_id"]]["height"],
                                             gt.imgs[r["image_id"]]["width"]]
        assert 0 <= r["mask_quality"] <= 1 and r["score"] <= r["mask_quality"] + 1e-6
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval(gt, gt.loadRes(str(out)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] >= 0  # -1 would mean nothing was evaluated


def test_export_equals_the_evaluation_results(tmp_path, data, detector_dir, trained):
    """The same head on the same images gives the same entries as `frozenseg eval`."""
    r = recipe(tmp_path / "r", data, detector_dir)
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "r" / "recipe.yaml"),
                                    "--checkpoint", str(trained), "--out", str(tmp_path / "ev")])
    assert evaluated.exit_code == 0, evaluated.output
    out = tmp_path / "export.json"
    assert _export("--head", trained, *_val(data), "--out", out, "--score-threshold",
                   r.eval.score_threshold, "--max-per-image", r.eval.max_per_image).exit_code == 0
    assert json.loads(out.read_text()) == json.loads((tmp_path / "ev" / "results.json")
                                                     .read_text())


def test_resume_gives_the_uninterrupted_file(tmp_path, data, trained, monkeypatch):
    model = MaskFrozenDETR.from_pretrained(trained, device="cpu")
    dataset = ImageFolder.from_coco(data / "images" / "val", data / "instances_val.json",
                                    transform=eval_transform(SCALE))
    classes = match_classes(model.detector.classes, dataset.category_ids,
                            dataset.category_names)
    boxes = read_boxes(_given_boxes(data, tmp_path)[0], [im["id"] for im in dataset.images])
    settings = ExportSettings(batch_size=1)
    for given in (None, boxes):
        whole, part = tmp_path / "whole.json", tmp_path / "part.json"
        export_results(model, dataset, whole, classes=classes, settings=settings,
                       boxes=given)

        def interrupt(done, total):
            if done == 1:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            export_results(model, dataset, part, classes=classes, settings=settings,
                           boxes=given, progress=interrupt)
        assert not part.exists()
        with pytest.raises(ValueError, match="--resume"):  # never thrown away silently
            export_results(model, dataset, part, classes=classes, boxes=given,
                           settings=settings)
        with pytest.raises(ValueError, match="settings"):
            export_results(model, dataset, part, classes=classes, boxes=given,
                           settings=ExportSettings(batch_size=1, mask_threshold=0.4),
                           resume=True)
        summary = export_results(model, dataset, part, classes=classes,
                                 settings=settings, boxes=given, resume=True)
        assert summary.resumed == 1
        assert part.read_bytes() == whole.read_bytes()
        assert not list(tmp_path.glob(".part.json.partial*"))
        part.unlink()


def test_instance_pngs_hold_the_results_masks(tmp_path, data, trained):
    out, pngs = tmp_path / "results.json", tmp_path / "png"
    assert _export("--head", trained, *_val(data), "--out", out, "--png-dir", pngs,
                   "--score-threshold", 0.01).exit_code == 0
    results = json.loads(out.read_text())
    coco = json.loads((data / "instances_val.json").read_text())
    for image in coco["images"]:
        ids = np.array(Image.open(pngs / image["file_name"].replace(".jpg", ".png")))
        assert ids.shape == (image["height"], image["width"])
        mine = [r for r in results if r["image_id"] == image["id"]]
        covered = np.zeros(ids.shape, dtype=bool)
        for k, r in enumerate(mine, start=1):  # earlier (better) results win overlaps
            mask = mask_utils.decode(r["segmentation"]).astype(bool) & ~covered
            assert (ids[mask] == k).all()
            covered |= mask
        assert (ids[~covered] == 0).all()


def test_file_names_from_the_json_never_reach_outside_their_folder(tmp_path, data, trained):
    """An absolute file_name or one with '..' is refused before anything is written: the
    instance PNG of a json naming the user's own photo used to overwrite that photo."""
    coco = json.loads((data / "instances_val.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    for image in coco["images"]:
        (images / image["file_name"]).write_bytes((data / "images" / "val" /
                                                   image["file_name"]).read_bytes())
    for name in ("photo.jpg", "../photo.jpg"):
        photo = (images / name).resolve()
        photo.write_bytes((images / coco["images"][0]["file_name"]).read_bytes())
        before = photo.read_bytes()
        coco["images"][0]["file_name"] = str(photo) if name == "photo.jpg" else name
        annotations = tmp_path / "instances.json"
        annotations.write_text(json.dumps(coco))
        result = _export("--head", trained, "--images", images, "--annotations", annotations,
                         "--out", tmp_path / "r.json", "--png-dir", photo.parent)
        assert result.exit_code == 1, result.output
        assert "file_name" in result.output and str(annotations) in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert photo.read_bytes() == before and not (tmp_path / "r.json").exists()


def test_results_never_overwrite_the_input_images(tmp_path, data, trained):
    """PNG images with --png-dir (or predict's --out) set to their own folder: refused."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    for jpg in sorted((data / "images" / "val").iterdir())[:2]:
        Image.open(jpg).save(folder / jpg.with_suffix(".png").name)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    exported = _export("--head", trained, "--images", folder, "--out", tmp_path / "r.json",
                       "--png-dir", folder)
    predicted = runner.invoke(app, ["predict", str(folder), "--head", str(trained), "--out",
                                    str(folder)])
    for result in (exported, predicted):
        assert result.exit_code == 1 and "would overwrite that input image" in result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ------------------------------------------------------------------------- given boxes


def test_given_boxes_come_back_unchanged_with_masks(tmp_path, data, trained):
    path, entries = _given_boxes(data, tmp_path)
    out = tmp_path / "masked.json"
    result = _export("--head", trained, *_val(data), "--boxes", path, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 boxes" in result.output and "clipped" in result.output  # entries[0], entries[1]
    assert "nothing inside their image" in result.output
    masked = json.loads(out.read_text())
    assert len(masked) == len(entries)
    for given, back in zip(entries, masked, strict=True):
        kept = {k: v for k, v in back.items() if k not in ("segmentation", "mask_quality")}
        assert json.dumps(kept) == json.dumps(given)  # same fields, order and values
        assert set(back) - set(given) == {"segmentation", "mask_quality"}
    assert mask_utils.decode(masked[1]["segmentation"]).sum() == 0
    assert masked[1]["mask_quality"] == 0.0
    assert mask_utils.decode(masked[2]["segmentation"]).any()


def test_an_empty_mask_has_quality_and_score_0(tmp_path, data, trained):
    """A 5x5 px box's empty mask had mask_quality 0.74. At --mask-threshold 1.01 no pixel
    passes: every mask is empty, for the detector's boxes and for given ones."""
    path, _ = _given_boxes(data, tmp_path)
    for boxes in ([], ["--boxes", path]):
        out = tmp_path / "empty.json"
        result = _export("--head", trained, *_val(data), *boxes, "--out", out,
                         "--mask-threshold", 1.01)
        assert result.exit_code == 0, result.output
        results = json.loads(out.read_text())
        assert results and all(mask_utils.area(r["segmentation"]) == 0 for r in results)
        assert all(r["mask_quality"] == 0.0 for r in results)
        if not boxes:  # score = class score x mask quality; given boxes keep their own
            assert all(r["score"] == 0.0 for r in results)
        out.unlink()


def test_given_box_masks_are_the_heads_pasted_masks(data, trained):
    model = MaskFrozenDETR.from_pretrained(trained, device="cpu")
    detector, head = model.detector, model.head
    dataset = ImageFolder.from_coco(data / "images" / "val", data / "instances_val.json",
                                    transform=eval_transform(SCALE))
    classes = match_classes(detector.classes, dataset.category_ids, dataset.category_names)
    image, target = dataset[0]
    entries = [{"bbox": [10.0, 12.0, 60.0, 40.0], "category_id": 3},
               {"bbox": [30.5, 5.0, 25.0, 70.0], "category_id": 1}]
    masks, clipped, degenerate = masks_for_boxes(model, classes, (image, target),
                                                 entries)
    assert (clipped, degenerate) == (0, 0)
    # The reference, step by step: boxes to the view, embed, head, paste at the original size.
    (h, w), (vh, vw) = target["orig_size"].tolist(), target["size"].tolist()
    xyxy = torch.tensor([[10.0, 12.0, 70.0, 52.0], [30.5, 5.0, 55.5, 75.0]], dtype=torch.float64)
    view = (xyxy * torch.tensor([vw / w, vh / h] * 2, dtype=torch.float64)).float()
    out = head(detector.embed_boxes([image], [view], [torch.tensor(
        classes.to_detector([3, 1]))]))
    boxes = out.boxes.double() * torch.tensor([w / vw, h / vh] * 2, dtype=torch.float64)
    pasted = paste_masks(out.mask_logits.float().sigmoid(), boxes.float(), (h, w), 0.5)
    for (rle, quality), reference, iou in zip(masks, pasted, out.iou_logits, strict=True):
        assert np.array_equal(mask_utils.decode(rle).astype(bool), reference.numpy())
        assert quality == pytest.approx(float(iou.detach().sigmoid()))


def test_unknown_image_ids_are_named_and_nothing_is_written(tmp_path, data, trained):
    path = tmp_path / "detections.json"
    path.write_text(json.dumps([{"image_id": 424242, "bbox": [0, 0, 5, 5], "score": 1}]))
    out = tmp_path / "masked.json"
    result = _export("--head", trained, *_val(data), "--boxes", path, "--out", out)
    assert result.exit_code == 1 and "424242" in result.output and str(path) in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    path.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, "w", 5]}]))
    bad = _export("--head", trained, *_val(data), "--boxes", path, "--out", out)
    assert bad.exit_code == 1 and "entry 0" in bad.output and "bbox" in bad.output


def test_deeply_nested_json_is_one_line(tmp_path, data, trained):
    """100,000 nested '[' were a RecursionError traceback (--boxes, --annotations)."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    for arguments in (["--boxes", deep, *_val(data)],
                      ["--images", data / "images" / "val", "--annotations", deep]):
        result = _export("--head", trained, *arguments, "--out", tmp_path / "r.json")
        assert result.exit_code == 1, result.output
        assert f"{deep}: not valid JSON (nested too deeply)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.output


def test_brackets_in_paths_and_messages_are_printed_as_they_are(tmp_path, data, trained):
    """rich took them for markup: '[/]' was a MarkupError traceback, '[bold]x.pth' printed
    as 'x.pth', "'bbox' must be [x, y, w, h]" without its brackets."""
    for name in ("a[/]b.pt", "[bold]x.pth"):
        result = _export("--head", tmp_path / name, *_val(data), "--out", tmp_path / "r.json")
        assert result.exit_code == 1 and f"{tmp_path / name}: no such file" in result.stderr
    boxes = tmp_path / "[red]boxes.json"
    boxes.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 5]}]))
    bad = _export("--head", trained, *_val(data), "--boxes", boxes, "--out", tmp_path / "r.json")
    assert bad.exit_code == 1 and str(boxes) in bad.stderr
    assert "'bbox' must be [x, y, w, h]" in bad.stderr
    folder = tmp_path / "[b]photos"
    folder.mkdir()
    image = next((data / "images" / "val").iterdir())
    (folder / f"[i]{image.name}").write_bytes(image.read_bytes())
    shown = runner.invoke(app, ["predict", str(folder), "--head", str(trained), "--out",
                                str(tmp_path / "[u]viz")])
    assert shown.exit_code == 0, shown.output
    assert f"[i]{image.name}" in shown.output and f"{tmp_path / '[u]viz'}" in shown.output


# ------------------------------------------------------------------------- plain images


def test_plain_images_get_an_image_table(tmp_path, data, trained):
    out = tmp_path / "results.json"
    result = _export("--head", trained, "--images", data / "images" / "val", "--out", out)
    assert result.exit_code == 0, result.output
    table = tmp_path / "results.images.json"
    images = json.loads(table.read_text())["images"]
    coco = json.loads((data / "instances_val.json").read_text())
    # Numbered files (COCO naming): the number is the id, as in the annotations.
    assert sorted((im["id"], im["file_name"]) for im in images) == sorted(
        (im["id"], im["file_name"]) for im in coco["images"])
    COCO(str(table)).loadRes(str(out))


class _Payload:
    """A pickle that runs a shell command when loaded unsafely."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_checkpoint(folder, kind, trained):
    path = folder / f"{kind}.pt"
    if kind == "malicious":
        torch.save({"head": _Payload()}, path)
    else:
        raw = trained.read_bytes()
        path.write_bytes({"garbage": b"not a checkpoint", "empty": b"", "text": b"head: 1\n",
                          "truncated": raw[: len(raw) // 2]}[kind])
    return path


@pytest.mark.parametrize("kind", ["garbage", "empty", "text", "truncated", "malicious"])
def test_a_bad_head_checkpoint_is_one_line(tmp_path, data, detector_dir, trained, kind):
    """export --head and eval --checkpoint: an empty file was an IndexError, a text file
    "KeyError: 101", a malicious pickle torch's long text with ANSI codes."""
    bad = _bad_checkpoint(tmp_path, kind, trained)
    recipe(tmp_path / "r", data, detector_dir)
    for result in (_export("--head", bad, *_val(data), "--out", tmp_path / "r.json"),
                   runner.invoke(app, ["eval", str(tmp_path / "r" / "recipe.yaml"),
                                       "--checkpoint", str(bad)])):
        assert result.exit_code == 1 and str(bad) in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.output
        assert "\x1b" not in result.stderr and "Traceback" not in result.output
        assert {"garbage": "a text file", "empty": "file is empty", "text": "a text file",
                "truncated": "truncated", "malicious": "refused to load"}[kind] in result.stderr
        if kind == "malicious":  # the global named; frozenseg's own never need trusting
            assert "system" in result.stderr and "--trust-checkpoint" not in result.stderr


# ------------------------------------------------------------------------- predict


def test_predict_draws_overlays_and_counts_instances(tmp_path, data, trained):
    folder = data / "images" / "val"
    result = runner.invoke(app, ["predict", str(folder), "--head", str(trained), "--out",
                                 str(tmp_path / "viz"), "--threshold", "0.05"])
    assert result.exit_code == 0, result.output
    assert "instances with score >= 0.05" in result.output
    for image in sorted(folder.iterdir()):
        overlay = Image.open(tmp_path / "viz" / image.with_suffix(".png").name)
        width, height = Image.open(image).size
        factor = min(4, math.ceil(480 / min(width, height)))   # small ones drawn larger
        assert overlay.size == (width * factor, height * factor) and overlay.mode == "RGB"
        record = json.loads((tmp_path / "viz" / image.with_suffix(".json").name).read_text())
        assert (record["width"], record["height"]) == (width, height)   # the image's pixels
        assert all(i["score"] >= 0.05 for i in record["instances"])
        if record["instances"]:  # something was drawn over the picture
            plain = Image.open(image).convert("RGB").resize(overlay.size, Image.BICUBIC)
            assert not np.array_equal(np.asarray(overlay), np.asarray(plain))
    none = runner.invoke(app, ["predict", str(folder), "--head", str(trained), "--out",
                               str(tmp_path / "none"), "--threshold", "1.5"])
    assert none.exit_code == 0 and "lower --threshold" in none.output


def test_predict_draws_over_a_16_bit_png_as_it_looks(tmp_path, trained):
    """PIL's own conversion turned a 16-bit grayscale PNG white; the overlay (nothing drawn
    at threshold 1.5) is the picture, scaled to 8 bits."""
    deep = tmp_path / "deep.png"
    gradient = np.linspace(0, 65535, 96 * 128).reshape(96, 128).astype(np.uint16)
    Image.fromarray(gradient).save(deep)
    result = runner.invoke(app, ["predict", str(deep), "--head", str(trained), "--out",
                                 str(tmp_path / "viz"), "--threshold", "1.5", "--min-side", "0"])
    assert result.exit_code == 0, result.output
    overlay = np.asarray(Image.open(tmp_path / "viz" / "deep.png"))
    np.testing.assert_array_equal(overlay[..., 1], np.round(gradient / 257).astype(np.uint8))


def test_export_onnx_from_the_command_line(tmp_path, trained):
    pytest.importorskip("onnxruntime")
    from frozenseg.head.onnx import check_onnx

    out = tmp_path / "model.onnx"
    result = _export("--head", trained, "--format", "onnx", "--out", out, "--height", 64,
                     "--width", 96, "--dynamic")
    assert result.exit_code == 0, result.output
    detector, head, _ = load_trained(trained)
    check_onnx(out, detector, head, torch.rand(1, 3, 70, 90))  # raises on disagreement
