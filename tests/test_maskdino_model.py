"""Mask DINO joint mode: the model on the detector's modules, training on the synthetic
data, batching, images without annotations, and the round trips with detector folders."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from torchvision.ops import box_convert

import frozenseg
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.folder import write_detector
from frozenseg.detector.model import build_detector
from frozenseg.engine.train import Trainer
from frozenseg.maskdino.build import DINO_FIXED, build_maskdino
from frozenseg.maskdino.checkpoint import save_as_detector
from frozenseg.maskdino.model import MaskDINO
from frozenseg.recipe import load_recipe
from tests.weights import perturb

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out

TINY = {"backbone": {"name": "swin", "embed_dim": 32, "depths": [1, 1, 1, 1],
                     "num_heads": [1, 2, 4, 8], "window_size": 7},
        "hidden_dim": 64, "nheads": 4, "enc_layers": 2, "dim_feedforward": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    frozenseg.synth(root, images=8, seed=3)
    return root


def recipe(tmp_path, data, *overrides):
    split = {s: {"images": str(data / "images" / s),
                 "annotations": str(data / f"instances_{s}.json"),
                 "panoptic": str(data / f"panoptic_{s}.json"),
                 "panoptic_png": str(data / f"panoptic_{s}")} for s in ("train", "val")}
    body = {"mode": "maskdino",
            "data": {**split, "transform": "lsj", "scale": 0.15, "num_workers": 0},
            "maskdino": {"model": TINY, "num_queries": 12, "dec_layers": 2,
                         "num_denoising": 8, "num_points": 256, "backbone_lr_factor": 1.0},
            "train": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "lr": 1e-3,
                      "iterations": 2, "checkpoint_every": 0, "log_every": 1,
                      "weight_decay": 0.05}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(body))
    return load_recipe(tmp_path / "recipe.yaml", overrides)


def tiny_model(num_classes: int = 5, seed: int = 0, query_init: str = "selected") -> MaskDINO:
    torch.manual_seed(seed)
    config = DetectorConfig.from_dict({**TINY, **DINO_FIXED, "num_classes": num_classes,
                                       "num_queries": 10, "dec_layers": 2,
                                       "dn_labelbook_size": num_classes,
                                       "query_init": query_init})
    return perturb(MaskDINO(build_detector(config), num_denoising=6), seed=seed)


def test_training_steps_lower_the_loss(tmp_path, data):
    """The same batch, 25 steps: the loss must fall well below where it started."""
    trainer = Trainer(recipe(tmp_path, data), log=lambda _: None, evaluate=False)
    task = trainer.task
    batch = task.batch(task.collate([task.dataset[0], task.dataset[1]]))
    losses = []
    for _ in range(25):
        values = trainer.step(batch)
        losses.append(values["loss"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < 0.7 * losses[0], losses


def test_a_run_trains_evaluates_and_saves(tmp_path, data):
    r = recipe(tmp_path, data)
    trainer = Trainer(r, log=lambda _: None)
    trainer.run()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert "model" in state and state["class_names"] == trainer.task.class_names
    metrics = (tmp_path / "run" / "eval" / "metrics.json").read_text()
    for key in ('"panoptic"', '"semantic"', '"segm"', '"bbox"', '"PQ"', '"mIoU"'):
        assert key in metrics
    # The command line: evaluate the checkpoint again, and turn it into a frozen detector.
    from typer.testing import CliRunner

    from frozenseg.cli import app

    runner, last = CliRunner(), str(tmp_path / "run" / "last.pt")
    again = runner.invoke(app, ["eval", str(tmp_path / "recipe.yaml"), "--checkpoint", last,
                                "--out", str(tmp_path / "again")])
    assert again.exit_code == 0 and "PQ" in again.output, again.output
    for title in ("Panoptic quality per category", "Semantic segmentation", "mIoU"):
        assert title in again.output
    assert (json.loads((tmp_path / "again" / "metrics.json").read_text())["panoptic"]
            == json.loads(metrics)["panoptic"])
    converted = runner.invoke(app, ["convert", "--detector", last, "--out",
                                    str(tmp_path / "det")])
    assert converted.exit_code == 0, converted.output
    frozen = frozenseg.load_detector(tmp_path / "det")
    assert frozen.classes["names"] == trainer.task.class_names


def test_images_without_annotations_are_training_input(tmp_path, data):
    trainer = Trainer(recipe(tmp_path, data), log=lambda _: None, evaluate=False)
    task = trainer.task
    images, padding, targets = task.collate([task.dataset[0], task.dataset[1]])
    empty = {**targets[1], "labels": targets[1]["labels"][:0], "boxes": targets[1]["boxes"][:0],
             "masks": targets[1]["masks"][:0], "iscrowd": targets[1]["iscrowd"][:0],
             "isthing": targets[1]["isthing"][:0]}
    for batch_targets in ([targets[0], empty], [empty, empty]):
        values = trainer.step(task.batch((images, padding, batch_targets)))
        assert torch.isfinite(torch.tensor(values["loss"]))


def test_a_batch_of_two_equals_two_singles():
    model = tiny_model().eval()
    a, b = torch.rand(3, 96, 128), torch.rand(3, 64, 96)
    batch = torch.zeros(2, 3, 96, 128)
    batch[0], batch[1, :, :64, :96] = a, b
    padding = torch.ones(2, 96, 128, dtype=torch.bool)
    padding[0] = False
    padding[1, :64, :96] = False
    with torch.no_grad():
        both = model(batch, padding)
        singles = [model(x[None], torch.zeros(1, *x.shape[1:], dtype=torch.bool)) for x in (a, b)]
    for i, single in enumerate(singles):
        h, w = single.final.masks.shape[-2:]
        torch.testing.assert_close(both.final.logits[i], single.final.logits[0],
                                   atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(both.final.boxes[i], single.final.boxes[0],
                                   atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(both.final.masks[i, :, :h, :w], single.final.masks[0],
                                   atol=2e-3, rtol=1e-3)


def test_denoising_queries_only_in_training():
    model = tiny_model()
    images, padding = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.4]]),
                "masks": torch.zeros(2, 64, 64, dtype=torch.bool),
                "isthing": torch.tensor([True, False])}]
    trained = model.train()(images, padding, targets, generator=torch.Generator().manual_seed(0))
    assert trained.dn is not None and trained.denoising[0].logits.shape[1] == trained.dn.pad_size
    assert trained.final.logits.shape[1] == model.config.num_queries
    assert model.eval()(images, padding, targets).dn is None


def test_checkpointing_changes_memory_not_results():
    model = tiny_model().train()
    images, padding = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    plain = model(images, padding)
    model.set_checkpointing(backbone=True, encoder=True, decoder=True)
    checkpointed = model(images, padding)
    torch.testing.assert_close(plain.final.masks, checkpointed.final.masks)
    checkpointed.final.masks.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if n.startswith(("detector.backbone", "detector.transformer.encoder")))


# ------------------------------------------------------------------ detector round trips


def test_init_from_a_dino_detector_remaps_classes_by_name(tmp_path, data):
    """A converted DINO (mixed queries, other classes) starts the joint model: matching
    tensors load, class rows follow the names, the report names what was dropped."""
    torch.manual_seed(1)
    config = DetectorConfig.from_dict({**TINY, **DINO_FIXED, "query_init": "mixed",
                                       "num_classes": 3, "num_queries": 12, "dec_layers": 2,
                                       "dn_labelbook_size": 3})
    dino = perturb(build_detector(config), seed=1)
    names = ["star", "kite", "sky"]  # synth has star and sky; kite is not there
    write_detector(tmp_path / "dino", dino.state_dict(), config, format="test", source="x",
                   class_names=names)
    r = recipe(tmp_path, data, f"maskdino.init={tmp_path / 'dino'}")
    dataset_names = _class_names(r)
    model, report = build_maskdino(r, dataset_names)
    assert "matched by name" in " ".join(report) and "kite" in report[-1]
    source = dino.state_dict()
    for name in ("star", "sky"):
        k, row = dataset_names.index(name), names.index(name)
        torch.testing.assert_close(model.detector.class_embed[0].weight[k],
                                   source["class_embed.0.weight"][row])
        torch.testing.assert_close(model.detector.label_enc.weight[k],
                                   source["label_enc.weight"][row])
    torch.testing.assert_close(model.detector.transformer.encoder.layers[0].linear1.weight,
                               source["transformer.encoder.layers.0.linear1.weight"])


def _class_names(r) -> list[str]:
    from frozenseg.maskdino.task import MaskDINOTask

    return list(MaskDINOTask.training_data(r).category_names)


@pytest.mark.parametrize("query_init", ["selected", "mixed"])
def test_a_joint_model_is_a_frozen_detector_again(tmp_path, query_init):
    """save_as_detector -> load_detector: the frozen detector's decoder gives the joint
    model's final class logits and boxes (Mask DINO's queries, or DINO's own)."""
    model = tiny_model(num_classes=4, query_init=query_init).eval()
    folder = save_as_detector(model, tmp_path / "det", ["a", "b", "c", "d"])
    frozen = frozenseg.load_detector(folder)
    assert frozen.classes["names"] == ["a", "b", "c", "d"]
    images, padding = torch.rand(1, 3, 80, 96), torch.zeros(1, 80, 96, dtype=torch.bool)
    with torch.no_grad():
        joint = model(images, padding)
        raw = frozen.model(images, padding)
    torch.testing.assert_close(raw.logits[-1], joint.final.logits)
    torch.testing.assert_close(raw.boxes[-1], joint.final.boxes)
    assert dataclasses.asdict(frozen.config) == dataclasses.asdict(model.config)


def test_a_bf16_training_step_is_finite():
    """bf16 autocast, the deformable op included (the fallback here; the kernel on a GPU)."""
    from frozenseg.maskdino.criterion import MaskDINOCriterion

    model = tiny_model().train()
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 20:40, 20:40] = True
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.47, 0.47, 0.31, 0.31]]),
                "masks": masks, "isthing": torch.tensor([True])}]
    images, padding = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, padding, targets, generator=torch.Generator().manual_seed(0))
        losses = MaskDINOCriterion(5, num_points=256)(out, targets,
                                                      generator=torch.Generator().manual_seed(0))
    assert out.final.masks.dtype == torch.bfloat16
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"].detach())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mask_enhanced_boxes_are_the_boxes_of_the_proposals_masks():
    """Sec. 3.2: the anchors become the boxes of the selected proposals' masks (> 0)."""
    masks = torch.full((1, 2, 16, 24), -1.0)
    masks[0, 0, 4:8, 6:18] = 1.0      # rows 4..7, columns 6..17 of a 16 x 24 grid
    masks[0, 1, 0:16, 0:12] = 1.0
    sizes = torch.tensor([[64, 96]])  # the image is the whole 64 x 96 (grid x 4)
    boxes = MaskDINO._mask_boxes(masks, sizes)
    expected = torch.tensor([[[12 / 24, 6 / 16, 12 / 24, 4 / 16],
                              [6 / 24, 8 / 16, 12 / 24, 16 / 16]]]).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(boxes, expected)
    model = tiny_model().eval()
    model.mask_enhanced_boxes = True
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert torch.isfinite(out.final.boxes).all()


def test_training_init_starts_every_box_at_its_reference_and_classes_at_the_prior(tmp_path,
                                                                                   data):
    """From random weights (no maskdino.init) the model starts as DINO's code does: box
    heads output zero deltas (each prediction is its reference box, so matched boxes are
    sensible from step one) and class probabilities sit around the focal prior 0.01
    (the classifiers' bias; their weights are random), not around 0.5."""
    model, _ = build_maskdino(recipe(tmp_path, data), [f"c{i}" for i in range(5)])
    model.eval()
    images, padding = torch.rand(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        out = model(images, padding)
        encoded = model._encode(images, padding)
        proposals = model.detector.select_proposals(encoded.encoder_states[-1], encoded.mask,
                                                    encoded.shapes)
    anchors = proposals.box_logits.sigmoid()
    torch.testing.assert_close(out.encoder.boxes, anchors)
    for layer in out.layers:  # zero deltas: the reference, up to inverse_sigmoid's clamp
        torch.testing.assert_close(layer.boxes, anchors, atol=1e-5, rtol=1e-4)
    for logits in [out.encoder.logits, *(layer.logits for layer in out.layers)]:
        assert 0.003 < logits.sigmoid().median() < 0.03


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_the_recipes_box_noise_reaches_the_denoising_queries(tmp_path, data, scale):
    """maskdino.box_noise_scale is the lambda of the denoising boxes: 0 gives the targets'
    own boxes, DINO's 1.0 moves a positive's corners by up to half its size."""
    model, _ = build_maskdino(recipe(tmp_path, data, f"maskdino.box_noise_scale={scale}"),
                              [f"c{i}" for i in range(5)])
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.3, 0.6, 0.2, 0.3]])
    dn = model.denoising([{"labels": torch.tensor([1, 3]), "boxes": boxes}],
                         generator=torch.Generator().manual_seed(0))
    positives = box_convert(dn.boxes[dn.positive].view(-1, 2, 4), "cxcywh", "xyxy")
    # Each corner moves by up to lambda * half the box's size (in normalised units).
    moved = (positives - box_convert(boxes, "cxcywh", "xyxy")).abs()
    reach = (boxes[:, 2:] / 2).repeat(1, 2)
    if scale == 0:
        torch.testing.assert_close(moved, torch.zeros_like(moved), atol=1e-6, rtol=0)
    else:
        assert (moved <= scale * reach + 1e-6).all()
        assert (moved > 0.5 * scale * reach).any()  # and Mask DINO's 0.4 could not


def test_a_joint_run_with_dinos_queries_converts_to_the_official_dino_layout(tmp_path, data):
    """maskdino.query_init=mixed trains a detector that is exactly DINO: `convert --to dino`
    writes it in DINO's own layout, which the ordinary conversion then recognises as an
    official DINO checkpoint and loads into the same detector (same logits and boxes)."""
    from typer.testing import CliRunner

    from frozenseg.cli import app

    trainer = Trainer(recipe(tmp_path, data, "maskdino.query_init=mixed", "train.iterations=1"),
                      log=lambda _: None, evaluate=False)
    trainer.run()
    last = str(tmp_path / "run" / "last.pt")
    runner, official = CliRunner(), tmp_path / "dino.pth"
    to_dino = ["convert", "--detector", last, "--to", "dino", "--out", str(official)]
    written = runner.invoke(app, to_dino)
    assert written.exit_code == 0, written.output
    again = runner.invoke(app, to_dino)  # an existing file is replaced only when asked
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, [*to_dino, "--overwrite"]).exit_code == 0
    names = trainer.task.class_names
    report = frozenseg.convert_checkpoint(official, tmp_path / "det", class_names=names)
    assert report.format == "dino"
    frozen = frozenseg.load_detector(tmp_path / "det")
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    images, padding = torch.rand(1, 3, 80, 96), torch.zeros(1, 80, 96, dtype=torch.bool)
    with torch.no_grad():
        joint, raw = model(images, padding), frozen.model(images, padding)
    torch.testing.assert_close(raw.logits[-1], joint.final.logits)
    torch.testing.assert_close(raw.boxes[-1], joint.final.boxes)
    # Mask DINO's own queries are not DINO's: refused in one line, nothing written.
    selected = tmp_path / "selected"
    Trainer(recipe(selected, data, "train.iterations=1"), log=lambda _: None,
            evaluate=False).run()
    refused = runner.invoke(app, ["convert", "--detector", str(selected / "run" / "last.pt"),
                                  "--to", "dino", "--out", str(tmp_path / "no.pth")])
    assert refused.exit_code == 1 and "mixed queries" in refused.output
    assert not (tmp_path / "no.pth").exists()
