"""Mask DINO inference: instance/panoptic/semantic post-processing against references and
hand-made cases, batch = singles, and evaluation on the synthetic dataset with fake models
built from the ground truth (perfect: AP = PQ = mIoU = 100; perturbed: the computed drop)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frozenseg.data import CocoPanoptic, panoptic_to_semantic
from frozenseg.data.synth import synth
from frozenseg.data.transforms import Compose, evaluation
from frozenseg.maskdino.inference import EvalSplit, evaluate_maskdino
from frozenseg.maskdino.outputs import MaskDINOOutput, Predictions
from frozenseg.maskdino.postprocess import (
    InferenceSettings,
    instance_inference,
    mask_boxes,
    panoptic_inference,
    postprocess_image,
    semantic_inference,
    upsample_masks,
)

# pycocotools 2.0 with numpy 2 warns inside its own decode; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BIG = 20.0  # a confident logit: sigmoid(20) = 1 - 2e-9


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only contends on a shared 2-core machine
    (8x slower here under load). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ----------------------------------------------------------------------------- instance


def test_instance_top_k_and_scores_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k, h, w = 7, 5, 6, 9
    logits, masks = torch.randn(q, k, generator=g) * 2, torch.randn(q, h, w, generator=g) * 3
    boxes = torch.rand(q, 4, generator=g) * 0.5 + 0.25
    out = instance_inference(logits, boxes, masks, top_k=10)
    pairs = sorted(((torch.sigmoid(logits[i, c]).item(), i, c) for i in range(q)
                    for c in range(k)), reverse=True)[:10]
    reference = []
    for score, i, c in pairs:
        inside = [torch.sigmoid(masks[i, y, x]).item() for y in range(h) for x in range(w)
                  if masks[i, y, x] > 0]
        reference.append((score * (sum(inside) / (len(inside) + 1e-6)), i, c))
    reference.sort(reverse=True)
    assert torch.allclose(out["scores"], torch.tensor([r[0] for r in reference]), atol=1e-6)
    assert out["labels"].tolist() == [r[2] for r in reference]
    assert torch.equal(out["masks"], masks[[r[1] for r in reference]] > 0)
    cx, cy, bw, bh = boxes[[r[1] for r in reference]].unbind(-1)
    expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                            (cy + bh / 2) * h], -1)
    assert torch.allclose(out["boxes"], expected, atol=1e-5)


def test_instance_thing_filter_is_applied_after_top_k():
    logits = torch.full((3, 3), -BIG)
    logits[0, 2], logits[1, 2], logits[2, 0] = 3.0, 2.0, 1.0  # class 2 is stuff
    masks = torch.full((3, 4, 4), BIG)
    out = instance_inference(logits, torch.rand(3, 4), masks, top_k=2,
                             isthing=torch.tensor([True, True, False]))
    assert len(out["scores"]) == 0 and out["masks"].shape == (0, 4, 4)  # as official
    out = instance_inference(logits, torch.rand(3, 4), masks, top_k=3,
                             isthing=torch.tensor([True, True, False]))
    assert out["labels"].tolist() == [0]


def test_mask_boxes_are_pixel_edges_and_zero_when_empty():
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    assert mask_boxes(masks).tolist() == [[2.0, 1.0, 6.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- panoptic


def _panoptic_case():
    """8 x 10 image: q0, q1 things of class 0; q2, q3 stuff class 2 side by side; q4 (class
    1) wins only 16 of its 24 pixels; q5 scores 0.2 (< 0.25); columns 8-9 nobody's else."""
    regions = [(slice(None), slice(0, 4)), (slice(0, 4), slice(4, 8)), (slice(4, 8), slice(4, 6)),
               (slice(4, 8), slice(6, 8)), (slice(None), slice(7, 10)),
               (slice(0, 4), slice(8, 10))]
    classes, probs = [0, 0, 2, 2, 1, 1], [0.9, 0.9, 0.9, 0.9, 0.6, 0.2]
    logits = torch.full((6, 3), -BIG)
    masks = torch.full((6, 8, 10), -BIG)
    for i, (region, c, p) in enumerate(zip(regions, classes, probs, strict=True)):
        logits[i, c] = _logit(p)
        masks[i][region] = BIG
    return logits, masks, torch.tensor([True, True, False])


def test_panoptic_overlap_threshold_merging_and_score_threshold():
    logits, masks, isthing = _panoptic_case()
    ids, segments = panoptic_inference(logits, masks, isthing, temperature=None)
    expected = torch.zeros(8, 10, dtype=torch.int32)
    expected[:, :4], expected[:4, 4:8], expected[4:, 4:8] = 1, 2, 3
    assert torch.equal(ids, expected)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in segments] == [
        (1, 0, True, 32), (2, 0, True, 16), (3, 2, False, 16)]
    assert segments[0]["score"] == pytest.approx(0.9)
    # A lower overlap threshold keeps q4 (16 / 24 = 0.67): its won pixels it holds.
    ids, segments = panoptic_inference(logits, masks, isthing, temperature=None,
                                       overlap_threshold=0.6)
    assert (ids[:, 8:] == 4).all() and segments[-1]["category_id"] == 1


def test_panoptic_keeps_on_sigmoid_scores_on_softmax():
    logits, masks, isthing = _panoptic_case()
    ids, segments = panoptic_inference(logits, masks, isthing, overlap_threshold=0.6)
    # q5's softmax(sigmoid / T) score is high, but its sigmoid (0.2) is below 0.25.
    assert (ids[4:, 8:] == 4).all() and (ids[:4, 8:] == 4).all()
    probs = torch.sigmoid(logits[0]) / 0.06
    assert segments[0]["score"] == pytest.approx(F.softmax(probs, 0).max().item())


def test_panoptic_with_no_kept_query_is_void():
    ids, segments = panoptic_inference(torch.full((3, 2), -BIG), torch.zeros(3, 4, 5),
                                       torch.tensor([True, False]))
    assert segments == [] and ids.shape == (4, 5) and not ids.any()


# ----------------------------------------------------------------------------- semantic


@pytest.mark.parametrize("temperature", [None, 0.06])
def test_semantic_equals_an_explicit_loop(temperature):
    g = torch.Generator().manual_seed(1)
    q, k, h, w = 4, 3, 3, 5
    logits, masks = torch.randn(q, k, generator=g), torch.randn(q, h, w, generator=g)
    out = semantic_inference(logits.double(), masks.double(), temperature=temperature)
    probs = torch.sigmoid(logits.double())
    if temperature is not None:
        probs = torch.exp(probs / temperature) / torch.exp(probs / temperature).sum(1, True)
    for c in range(k):
        for y in range(h):
            for x in range(w):
                value = sum(probs[i, c] * torch.sigmoid(masks[i, y, x].double())
                            for i in range(q))
                assert out[c, y, x].item() == pytest.approx(value.item(), rel=1e-5)


# ----------------------------------------------------------------------------- frames


def test_upsample_stride_one_is_a_crop_and_stride_four_stays_constant():
    grid = torch.randn(2, 6, 7)
    assert torch.equal(upsample_masks(grid, (5, 4), stride=1), grid[:, :5, :4])
    flat = upsample_masks(torch.full((1, 4, 4), 3.0), (13, 10), (26, 31))
    assert flat.shape == (1, 26, 31) and torch.allclose(flat, torch.tensor(3.0))


def test_a_batch_of_two_equals_two_single_images():
    g = torch.Generator().manual_seed(2)
    sizes, q, k = [(13, 17), (9, 22)], 6, 4
    logits, boxes = torch.randn(2, q, k, generator=g), torch.rand(2, q, 4, generator=g)
    batch = torch.full((2, q, 4, 6), 50.0)  # padding cells: garbage that must not leak
    singles = []
    for b, (h, w) in enumerate(sizes):
        grid = torch.randn(q, -(-h // 4), -(-w // 4), generator=g) * 4
        batch[b, :, :grid.shape[1], :grid.shape[2]] = grid
        singles.append(grid)
    isthing = torch.tensor([True, True, False, False])
    settings = InferenceSettings(object_mask_threshold=0.0, overlap_threshold=0.0)
    for b, (h, w) in enumerate(sizes):
        orig = (2 * h + 1, 2 * w - 3)
        one = postprocess_image(logits[b], boxes[b], singles[b], (h, w), orig,
                                isthing=isthing, settings=settings)
        both = postprocess_image(logits[b], boxes[b], batch[b], (h, w), orig,
                                 isthing=isthing, settings=settings)
        assert torch.equal(one["semantic"], both["semantic"])
        assert torch.equal(one["panoptic"][0], both["panoptic"][0])
        assert one["panoptic"][1] == both["panoptic"][1] and one["panoptic"][1]
        for key in ("scores", "labels", "masks", "boxes"):
            assert torch.equal(one["instance"][key], both["instance"][key])


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    # 10 images: the train split (8) holds image 8, which has no thing at all.
    synth(out, images=10, seed=0, min_size=64, max_size=112, image_format="png", workers=1)
    return out


IDENTITY = Compose([])


class FakeMaskDINO(nn.Module):
    """Predictions made from the ground truth of the images it is shown, in dataset order.

    One query per panoptic segment (class logit +20, crowds +5 so that real instances rank
    first; mask logits +-20 on the stride grid, the cell's coverage for stride > 1), the
    rest empty; padding cells hold +50 (must not leak). ``drop``: {(image_id, segment n)};
    ``relabel``: {(image_id, segment n): class}."""

    def __init__(self, dataset: CocoPanoptic, *, stride: int = 1, queries: int = 24,
                 drop=(), relabel=None) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))
        self.dataset, self.stride, self.queries = dataset, stride, queries
        self.drop, self.relabel, self.seen = set(drop), dict(relabel or {}), 0

    def forward(self, images, padding_mask):
        sizes = torch.stack([(~padding_mask[:, :, 0]).sum(1), (~padding_mask[:, 0]).sum(1)], -1)
        rows, cols = (-(-n // self.stride) for n in images.shape[-2:])
        logits = torch.full((len(images), self.queries, self.dataset.num_classes), -BIG)
        boxes = torch.full((len(images), self.queries, 4), 0.5)
        masks = torch.full((len(images), self.queries, rows, cols), 50.0)
        for b in range(len(images)):
            _, target = self.dataset[self.seen]
            self.seen += 1
            assert target["size"].tolist() == sizes[b].tolist()
            self._fill(target, logits[b], boxes[b], masks[b])
        final = Predictions(logits, boxes, masks)
        return MaskDINOOutput(layers=[final], encoder=final, denoising=None, dn=None,
                              image_sizes=sizes, padded_size=tuple(images.shape[-2:]))

    def _fill(self, target, logits, boxes, masks) -> None:
        h, w = target["size"].tolist()
        grid = F.avg_pool2d(target["masks"][:, None].float(), self.stride, ceil_mode=True)[:, 0]
        masks[:, :grid.shape[1], :grid.shape[2]] = -BIG
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        image_id, j = target["image_id"], 0
        for n, label in enumerate(target["labels"].tolist()):
            if (image_id, n) in self.drop:
                continue
            confidence = 5.0 if target["iscrowd"][n] else BIG
            logits[j, self.relabel.get((image_id, n), label)] = confidence
            masks[j, :grid.shape[1], :grid.shape[2]] = 2 * BIG * (grid[n] - 0.5)
            x0, y0, x1, y1 = (target["boxes"][n] / scale).tolist()
            boxes[j] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
            j += 1


def _fake(root: Path, transform=IDENTITY, **kwargs) -> FakeMaskDINO:
    split = EvalSplit.synth(root, "train")
    return FakeMaskDINO(CocoPanoptic(split.images, split.panoptic_json, split.panoptic_png,
                                     transform=transform), **kwargs)


def _evaluate(root: Path, out: Path, model, transform=IDENTITY, **kwargs) -> dict:
    return evaluate_maskdino(model, EvalSplit.synth(root, "train"), out, transform=transform,
                             settings=InferenceSettings(mask_stride=model.stride), **kwargs)


@pytest.fixture(scope="module")
def perfect(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("perfect")
    return out, _evaluate(synth_dir, out, _fake(synth_dir), batch_size=3)


def test_perfect_predictions_score_100(perfect, synth_dir):
    out, metrics = perfect
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(100.0)
    for group in ("all", "things", "stuff"):
        assert metrics["panoptic"][group]["PQ"] == pytest.approx(100.0)
    assert metrics["semantic"]["mIoU"] == pytest.approx(100.0)
    instances = json.loads((synth_dir / "instances_train.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {im["id"] for im in instances["images"]}
    # The split has an image without any instance annotation.
    assert {im["id"] for im in instances["images"]} - {a["image_id"] for a in
                                                       instances["annotations"]}
    assert json.loads((out / "metrics.json").read_text())["segm"]["AP"] == pytest.approx(100)


def test_batch_size_does_not_change_the_metrics(perfect, synth_dir, tmp_path):
    metrics = _evaluate(synth_dir, tmp_path, _fake(synth_dir), batch_size=1)
    # NaN (absent classes) != NaN: compare the JSON texts.
    assert json.dumps(metrics, sort_keys=True) == json.dumps(perfect[1], sort_keys=True)


def test_semantic_png_ground_truth_agrees(synth_dir, tmp_path):
    base = EvalSplit.synth(synth_dir, "train")
    metrics = evaluate_maskdino(_fake(synth_dir), base, tmp_path, tasks=["semantic"],
                                transform=IDENTITY, settings=InferenceSettings(mask_stride=1))
    assert set(metrics) == {"semantic"} and metrics["semantic"]["mIoU"] == pytest.approx(100)
    assert not (tmp_path / "results.json").exists()


def _first_segment(root: Path, thing: bool) -> tuple[int, int, dict]:
    """(image id, segment index, target) of the first non-crowd thing (or stuff) segment."""
    split = EvalSplit.synth(root, "train")
    _, target = CocoPanoptic(split.images, split.panoptic_json, split.panoptic_png)[0]
    n = next(i for i in range(len(target["labels"]))
             if bool(target["isthing"][i]) == thing and not target["iscrowd"][i])
    return target["image_id"], n, target


def _coco_ap(n: int) -> float:
    """AP (%) of a class with n GT, n - 1 found at precision 1 and one never (COCO's rule)."""
    recall = np.arange(1, n) / n
    thresholds = np.linspace(0.0, 1.0, 101)
    return 100 * float(np.mean(np.searchsorted(recall, thresholds, side="left") < len(recall)))


def _mean_pq(per_class: dict, changed: dict) -> float:
    values = [changed.get(name, row["PQ"]) for name, row in per_class.items()
              if name in changed or row["TP"] + row["FP"] + row["FN"]]
    return float(np.mean(values))


def test_a_dropped_instance_costs_its_share(perfect, synth_dir, tmp_path):
    image_id, n, target = _first_segment(synth_dir, thing=True)
    dataset = CocoPanoptic(*(getattr(EvalSplit.synth(synth_dir, "train"), f) for f in
                             ("images", "panoptic_json", "panoptic_png")))
    name = dataset.category_names[int(target["labels"][n])]
    metrics = _evaluate(synth_dir, tmp_path, _fake(synth_dir, drop={(image_id, n)}))
    tp = perfect[1]["panoptic"]["per_class"][name]["TP"]
    assert metrics["panoptic"]["per_class"][name]["FN"] == 1
    pq_class = 100 * (tp - 1) / (tp - 1 + 0.5)
    assert metrics["panoptic"]["all"]["PQ"] == pytest.approx(
        _mean_pq(perfect[1]["panoptic"]["per_class"], {name: pq_class}))
    instances = json.loads((synth_dir / "instances_train.json").read_text())
    category = dataset.category_ids[int(target["labels"][n])]
    count = sum(1 for a in instances["annotations"]
                if a["category_id"] == category and not a["iscrowd"])
    per_class = perfect[1]["per_class"]["segm"]
    present = [v for v in per_class.values() if not math.isnan(v)]
    expected = (sum(present) - 100 + _coco_ap(count)) / len(present)
    assert metrics["segm"]["AP"] == pytest.approx(expected)


def test_a_relabelled_stuff_segment_costs_its_pixels(perfect, synth_dir, tmp_path):
    image_id, n, target = _first_segment(synth_dir, thing=False)
    dataset = CocoPanoptic(*(getattr(EvalSplit.synth(synth_dir, "train"), f) for f in
                             ("images", "panoptic_json", "panoptic_png")))
    old = int(target["labels"][n])
    new = next(c for c in dataset.stuff_classes if c not in target["labels"].tolist())
    metrics = _evaluate(synth_dir, tmp_path, _fake(synth_dir, relabel={(image_id, n): new}))
    assert metrics["bbox"]["AP"] == pytest.approx(100) and metrics["segm"]["AP"] == \
        pytest.approx(100)
    names, per_class = dataset.category_names, perfect[1]["panoptic"]["per_class"]
    tp_old, tp_new = per_class[names[old]]["TP"], per_class[names[new]]["TP"]
    changed = {names[old]: 100 * (tp_old - 1) / (tp_old - 0.5),
               names[new]: 100 * tp_new / (tp_new + 0.5)}
    assert metrics["panoptic"]["all"]["PQ"] == pytest.approx(_mean_pq(per_class, changed))
    area = np.zeros(dataset.num_classes)
    for i in range(len(dataset)):
        labels = panoptic_to_semantic(dataset[i][1]).flatten()
        area += np.bincount(labels[labels != 255].numpy(), minlength=dataset.num_classes)
    moved = int(target["masks"][n].sum())
    iou = np.where(area > 0, 1.0, np.nan)
    iou[old] = (area[old] - moved) / area[old]
    iou[new] = area[new] / (area[new] + moved)
    assert metrics["semantic"]["mIoU"] == pytest.approx(100 * np.nanmean(iou))


@pytest.mark.parametrize("short, stride", [(160, 1), (96, 4)])
def test_resized_views_map_back_to_the_original(synth_dir, tmp_path, short, stride):
    view = evaluation(short=short, max_size=2 * short)
    model = _fake(synth_dir, transform=view, stride=stride)
    metrics = _evaluate(synth_dir, tmp_path, model, transform=view, batch_size=2)
    if stride == 1:  # upscaled views: the masks come back exactly
        assert [metrics["bbox"]["AP"], metrics["segm"]["AP"], metrics["panoptic"]["all"]["PQ"],
                metrics["semantic"]["mIoU"]] == pytest.approx([100.0] * 4)
    else:  # stride-4 masks of small shapes: coarse, but in place (98, 56, 76, 89 here)
        assert metrics["bbox"]["AP"] > 95 and metrics["segm"]["AP"] > 50
        assert metrics["panoptic"]["all"]["PQ"] > 70 and metrics["semantic"]["mIoU"] > 85


class _Blind(nn.Module):
    """Predicts nothing: every class and mask logit very negative."""

    def forward(self, images, padding_mask):
        b, rows, cols = len(images), -(-images.shape[-2] // 4), -(-images.shape[-1] // 4)
        final = Predictions(torch.full((b, 5, 12), -BIG), torch.full((b, 5, 4), 0.5),
                            torch.full((b, 5, rows, cols), -BIG))
        sizes = torch.stack([(~padding_mask[:, :, 0]).sum(1), (~padding_mask[:, 0]).sum(1)], -1)
        return MaskDINOOutput([final], final, None, None, sizes, tuple(images.shape[-2:]))


def test_a_model_that_finds_nothing_scores_zero(synth_dir, tmp_path):
    metrics = evaluate_maskdino(_Blind(), EvalSplit.synth(synth_dir, "train"), tmp_path,
                                transform=evaluation(80, 160))
    assert metrics["panoptic"]["all"]["PQ"] == 0.0
    assert metrics["segm"]["AP"] == pytest.approx(0.0, abs=1e-6)


def test_tasks_must_have_their_files(synth_dir, tmp_path):
    split = EvalSplit(images=synth_dir / "images" / "train",
                      instances_json=synth_dir / "instances_train.json")
    assert split.available_tasks() == ("instance",)
    with pytest.raises(ValueError, match="panoptic"):
        evaluate_maskdino(_Blind(), split, tmp_path, tasks=["panoptic"])
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_maskdino(_Blind(), split, tmp_path, tasks=["depth"])


def test_the_readme_says_where_the_joint_mode_departs_from_the_official_code():
    """The two deliberate differences from IDEA-Research/MaskDINO are written down."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    joint = readme[readme.index("## Joint mode: Mask DINO"):readme.index("## Masks out")]
    differences = joint[joint.index("Differences from the official code"):]
    assert "Stuff targets get no box cost" in differences and "panoptic_on" in differences
    assert "original image size" in differences and "detrex PR #247" in differences
