"""The training loop: it learns, it resumes exactly, it stops clearly."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from collections import Counter

import pytest
import torch

from frozenseg.cache import FeatureCache, write_cache
from frozenseg.data import CocoInstances
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector
from frozenseg.engine.data import eval_transform
from frozenseg.engine.task import TrainingError
from frozenseg.engine.train import LAST, Trainer
from frozenseg.formats import deimv2, deimv2_dinov3, huggingface_detr, lw_detr, rt_detr
from frozenseg.recipe import load_recipe
from tests.tiny import SCALE, recipe, save_detector, tiny_d_fine, tiny_detector

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out


def _key(result: dict) -> tuple:
    return result["image_id"], result["bbox"], result["category_id"]


def weights(trainer):
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model)
            .state_dict().items()}


@pytest.mark.parametrize("proposals", ["gt", "both"])
def test_resumed_run_equals_uninterrupted(tmp_path, data, detector_dir, proposals):
    whole = Trainer(recipe(tmp_path / "a", data, detector_dir, f"loss.proposals={proposals}"),
                    log=lambda _: None, evaluate=False)
    whole.run()
    part = recipe(tmp_path / "b", data, detector_dir, f"loss.proposals={proposals}")

    def interrupt(record):  # killed in step 4, step 3 logged; the last checkpoint is step 2's
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(part, log=lambda _: None, evaluate=False).run(progress=interrupt)
    second = Trainer(part, log=lambda _: None, evaluate=False)
    second.run(resume=True)
    assert second.position.step == 4 and second.position == whole.position
    a, b = weights(whole), weights(second)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    for run in ("a", "b"):  # resumed: step 3, logged before the stop, is not logged twice
        lines = (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "a" / "run" / "recipe.yaml").is_file()


def test_training_from_the_cache_equals_training_live(tmp_path, data, detector_dir):
    """With the evaluation view in both, the cache gives the same batches as the detector."""
    base = recipe(tmp_path / "live", data, detector_dir, "data.transform=evaluation",
                  "train.iterations=2")
    dataset = CocoInstances(base.data.train.images, base.data.train.annotations)
    write_cache(str(detector_dir), dataset, tmp_path / "cache", dtype="fp32", top_k=7,
                memory_layer=1, transform=eval_transform(SCALE))
    live = Trainer(base, log=lambda _: None, evaluate=False)
    live.run()
    cached = Trainer(recipe(tmp_path / "cached", data, detector_dir, "data.transform=evaluation",
                            "train.iterations=2", f"data.cache={tmp_path / 'cache'}"),
                     log=lambda _: None, evaluate=False)
    cached.run()
    a, b = weights(live), weights(cached)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_second_run_in_the_same_folder_needs_resume(tmp_path, data, detector_dir):
    r = recipe(tmp_path, data, detector_dir, "train.iterations=1")
    Trainer(r, log=lambda _: None, evaluate=False).run()
    assert (tmp_path / "run" / LAST).is_file()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(r, log=lambda _: None, evaluate=False).run()


def test_a_nan_loss_stops_with_the_step_and_terms(tmp_path, data, detector_dir, monkeypatch):
    trainer = Trainer(recipe(tmp_path, data, detector_dir), log=lambda _: None, evaluate=False)
    head = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        next(p for p in head.parameters() if p.requires_grad).fill_(float("nan"))
    # The step the loss turns NaN depends on where the parameter sits: NaN sampling
    # locations read zero in every back end (as in the CUDA kernel), the other weights not.
    with pytest.raises(TrainingError, match=r"non-finite loss at step \d+: loss_mask_bce nan.*"
                                            "no checkpoint with finite weights was written"):
        trainer.run()


def test_exploded_weights_are_never_checkpointed(tmp_path, data, detector_dir):
    """The step after a checkpoint blows the weights up: last.pt keeps the good weights,
    and the stop names it with its step (it used to name a last.pt holding NaNs)."""
    trainer = Trainer(recipe(tmp_path, data, detector_dir, "train.checkpoint_every=1"),
                      log=lambda _: None, evaluate=False)

    def explode(record):  # after step 2's optimizer step, before its checkpoint
        if record["step"] == 2:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("inf"))

    with pytest.raises(TrainingError, match=r"non-finite weights after step 2; the newest "
                                            r"checkpoint with finite weights is .*last.pt "
                                            r"\(step 1\)"):
        trainer.run(progress=explode)
    state = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert state["position"]["step"] == 1
    assert all(bool(v.isfinite().all()) for v in state["head"].values() if v.is_floating_point())


def test_cli_train_eval_and_dry_run(tmp_path, data, detector_dir):
    from typer.testing import CliRunner

    from frozenseg.cli import app

    runner = CliRunner()
    recipe(tmp_path, data, detector_dir)  # writes tmp_path/recipe.yaml
    path = str(tmp_path / "recipe.yaml")
    dry = runner.invoke(app, ["train", path, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "M trainable parameters" in dry.output and "GMACs" in dry.output
    trained = runner.invoke(app, ["train", path, "train.iterations=2"])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "run"
    assert {"last.pt", "best.pt", "recipe.yaml", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["segm"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    results = json.loads((run / "eval" / "results.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r)
               for r in results)
    again = runner.invoke(app, ["eval", path, "--checkpoint", str(run / "last.pt"),
                                "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    segm = json.loads((tmp_path / "again" / "metrics.json").read_text())["segm"]
    assert segm.pop("best_f1") == metrics["segm"].pop("best_f1")
    assert segm == pytest.approx(metrics["segm"], nan_ok=True)
    baseline = runner.invoke(app, ["eval", path, "head.trainable=false", "head.fuse_c1=false",
                                   "--out",
                                   str(tmp_path / "free")])
    assert baseline.exit_code == 0, baseline.output
    # The training-free head masks the same detections as the trained one (top-K <= the
    # per-image cap: every box stays), with masks of its own.
    free = json.loads((tmp_path / "free" / "results.json").read_text())
    trained = json.loads((tmp_path / "again" / "results.json").read_text())
    assert (sorted((r["image_id"], r["bbox"], r["category_id"]) for r in free)
            == sorted((r["image_id"], r["bbox"], r["category_id"]) for r in trained))
    assert any(r["segmentation"]["counts"] != e["segmentation"]["counts"]
               for r, e in zip(sorted(free, key=_key), sorted(trained, key=_key), strict=True))
    assert "segm" in json.loads((tmp_path / "free" / "metrics.json").read_text())
    typo = runner.invoke(app, ["train", path, "head.image_encodr=swin"])
    assert typo.exit_code == 1 and "did you mean head.image_encoder" in typo.output
    boxed = runner.invoke(app, ["eval", path, "eval.boxes=gt", "--checkpoint",
                                str(run / "last.pt"), "--out", str(tmp_path / "gt")])
    assert boxed.exit_code == 0, boxed.output
    gt_results = json.loads((tmp_path / "gt" / "results.json").read_text())
    val = json.loads((data / "instances_val.json").read_text())["annotations"]
    # One result per ground-truth box (crowd regions too: they are boxes of the image, and
    # COCOeval ignores what matches them), at most eval.max_per_image per image.
    per_image = Counter(a["image_id"] for a in val)
    cap = load_recipe(path).eval.max_per_image
    assert Counter(r["image_id"] for r in gt_results) == {
        image: min(n, cap) for image, n in per_image.items()}
    assert max(per_image.values()) <= cap  # the data is small enough for every box to stay
    assert sorted(r["category_id"] for r in gt_results) == sorted(a["category_id"] for a in val)
    needs = runner.invoke(app, ["eval", path])
    assert needs.exit_code == 1 and "checkpoint is needed" in needs.output


def test_a_cache_of_another_detector_is_refused(tmp_path, data, detector_dir):
    from frozenseg.cache import CacheError

    other = save_detector(tiny_detector(seed=3), tmp_path / "other", "other.pth")
    r = recipe(tmp_path, data, detector_dir, f"data.cache={tmp_path / 'cache'}")
    dataset = CocoInstances(r.data.train.images, r.data.train.annotations)
    write_cache(str(other), dataset, tmp_path / "cache", top_k=7, memory_layer=1,
                transform=eval_transform(SCALE))
    with pytest.raises(CacheError, match="made by detector other.pth.*not by"):
        Trainer(r, log=lambda _: None, evaluate=False)


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_finetuning_trains_the_detector_at_a_tenth_of_the_lr(tmp_path, data, detector_dir, mode):
    trainer = Trainer(recipe(tmp_path, data, detector_dir, f"detector.finetune={mode}",
                             "train.iterations=1", "loss.proposals=both"),
                      log=lambda _: None, evaluate=False)
    model = trainer.task.detector.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_group, detector_group = trainer.optimizer.param_groups
    assert detector_group["lr"] == pytest.approx(head_group["lr"] / 10)
    trainer.run()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("transformer.") for k in changed)
    assert any(k.startswith("backbone.") for k in changed) == (mode == "full")
    assert "detector" in torch.load(tmp_path / "run" / LAST, weights_only=True)


def test_finetuning_refuses_a_cache(tmp_path, data, detector_dir):
    with pytest.raises(TrainingError, match="remove data.cache"):
        Trainer(recipe(tmp_path, data, detector_dir, "detector.finetune=partial",
                       f"data.cache={tmp_path}"), log=lambda _: None, evaluate=False)


def test_cli_names_a_missing_detector_or_cache(tmp_path, data, detector_dir):
    from typer.testing import CliRunner

    from frozenseg.cli import app

    runner = CliRunner()
    recipe(tmp_path, data, detector_dir)
    path = str(tmp_path / "recipe.yaml")
    missing = runner.invoke(app, ["train", path, f"detector.path={tmp_path / 'nowhere'}"])
    assert missing.exit_code == 1 and "nowhere" in missing.output
    assert "not a detector folder" in missing.output and "frozenseg convert" in missing.output
    assert "Traceback" not in missing.output
    no_cache = runner.invoke(app, ["train", path, f"data.cache={tmp_path / 'nocache'}"])
    assert no_cache.exit_code == 1 and "nocache" in no_cache.output
    assert "not a feature cache" in no_cache.output
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 1, "name": "thing"}]}))
    nothing = runner.invoke(app, ["train", path, f"data.train.annotations={empty}"])
    assert nothing.exit_code == 1 and "no images to train on" in nothing.output


def test_cli_cache_from_a_recipe_then_train_on_it(tmp_path, data, detector_dir):
    from typer.testing import CliRunner

    from frozenseg.cache import FeatureCache
    from frozenseg.cli import app

    runner = CliRunner()
    recipe(tmp_path, data, detector_dir, f"data.cache={tmp_path / 'cache'}")
    path = str(tmp_path / "recipe.yaml")
    yaml_text = (tmp_path / "recipe.yaml").read_text()
    (tmp_path / "recipe.yaml").write_text(yaml_text.replace(
        "scale: 0.25", "scale: 0.25\n  views: 2"))
    # The cache folder as a key=value override, as for train.
    made = runner.invoke(app, ["cache", path, f"data.cache={tmp_path / 'cache'}", "--dtype",
                               "fp32"])
    assert made.exit_code == 0, made.output
    cache = FeatureCache(tmp_path / "cache")
    assert cache.views_per_image == 2 and cache.index["recipe"]["top_k"] == 7
    assert max(cache[0].image_size.tolist()) <= round(1333 * SCALE)
    trained = runner.invoke(app, ["train", path, f"data.cache={tmp_path / 'cache'}",
                                  "train.iterations=1"])
    assert trained.exit_code == 0, trained.output


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, data, detector_dir):
    """A cache of the train split (evaluation view), one shard."""
    out = tmp_path_factory.mktemp("cache") / "c"
    dataset = CocoInstances(data / "images" / "train", data / "instances_train.json")
    write_cache(str(detector_dir), dataset, out, dtype="fp32", top_k=7, memory_layer=1,
                transform=eval_transform(SCALE))
    return out


@pytest.mark.parametrize("damage,workers", [("flipped", 0), ("flipped", 1), ("truncated", 0)])
def test_training_refuses_a_damaged_cache_shard(tmp_path, data, detector_dir, cache_dir,
                                                damage, workers):
    """A flipped byte used to train silently (exit 0), a truncated shard gave a traceback:
    both stop in one line naming the shard and the command that rewrites it."""
    from typer.testing import CliRunner

    from frozenseg.cli import app

    shutil.copytree(cache_dir, tmp_path / "cache")
    shard = next((tmp_path / "cache").glob("shard-*.safetensors"))
    raw = bytearray(shard.read_bytes())
    if damage == "flipped":
        raw[len(raw) - 100] ^= 0x01  # in the tensor data: safetensors cannot tell
    shard.write_bytes(bytes(raw if damage == "flipped" else raw[: len(raw) // 2]))
    recipe(tmp_path, data, detector_dir)
    result = CliRunner().invoke(app, [
        "train", str(tmp_path / "recipe.yaml"), f"data.cache={tmp_path / 'cache'}",
        "data.transform=evaluation", "train.iterations=1", f"data.num_workers={workers}"])
    assert result.exit_code == 1, result.output
    assert str(shard) in result.stderr and "frozenseg cache --resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.output


def _cli_train(path, *arguments):
    from typer.testing import CliRunner

    from frozenseg.cli import app

    return CliRunner().invoke(app, ["train", str(path), *arguments])


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, data, detector_dir, damage):
    """An empty last.pt gave only "Aborted.", a truncated one a RuntimeError traceback."""
    r = recipe(tmp_path, data, detector_dir, "train.iterations=1")
    last = Trainer(r, log=lambda _: None, evaluate=False).save(LAST)
    raw = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2],
                      "text": b"step: 1\n"}[damage])
    result = _cli_train(tmp_path / "recipe.yaml", "train.iterations=1", "--resume")
    assert result.exit_code == 1, result.output
    assert str(last) in result.stderr and "--resume cannot continue" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.output


def test_resume_names_the_recipe_key_that_changed(tmp_path, data, detector_dir):
    """A shape-bearing key changed since the checkpoint: named, not a size-mismatch trace."""
    r = recipe(tmp_path, data, detector_dir)  # head.mapper_dim: 32
    Trainer(r, log=lambda _: None, evaluate=False).save(LAST)
    result = _cli_train(tmp_path / "recipe.yaml", "head.mapper_dim=16", "--resume")
    assert result.exit_code == 1, result.output
    assert "head.mapper_dim is 16 here, 32 in the checkpoint's recipe" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.output


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_one(
        tmp_path, data, detector_dir):
    """A real failed write: the file-size limit makes the kernel refuse the bytes (EFBIG),
    as a full disk does (ENOSPC); torch reported it as '[enforce fail at ...]'."""
    trainer = Trainer(recipe(tmp_path, data, detector_dir), log=lambda _: None, evaluate=False)
    kept = trainer.save(LAST).read_bytes()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(kept) // 2, hard))
    try:
        with pytest.raises(TrainingError) as err:
            trainer.save(LAST)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    message = str(err.value)
    assert str(tmp_path / "run" / LAST) in message and "is the disk full?" in message
    assert "enforce fail" not in message and "\n" not in message
    assert (tmp_path / "run" / LAST).read_bytes() == kept
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LAST]


def test_a_second_run_on_the_folder_refuses_naming_the_holder(tmp_path, data, detector_dir):
    """Two trainings (or two --resume) on one folder interleaved metrics.jsonl and raced on
    last.pt; the second refuses in one line; a killed run's lock (dead pid) is taken over."""
    from frozenseg.files import LOCK_FILE, folder_lock
    from tests.test_cache import _dead_pid

    recipe(tmp_path, data, detector_dir)
    with folder_lock(tmp_path / "run"):  # another process's lock: flock conflicts per open
        refused = _cli_train(tmp_path / "recipe.yaml", "train.iterations=1", "--resume")
    assert refused.exit_code == 1, refused.output
    assert f"in use by process {os.getpid()}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    (tmp_path / "run" / LOCK_FILE).write_text(f"{_dead_pid()}\n")  # a killed run's lock
    trainer = Trainer(recipe(tmp_path, data, detector_dir, "train.iterations=1"),
                      log=lambda _: None, evaluate=False)
    assert trainer.run().step == 1 and not (tmp_path / "run" / LOCK_FILE).exists()


def tiny_rt_detr() -> FrozenDetector:
    """A small random RT-DETR: ResNet-vd, hybrid encoder, 3 levels, selected queries."""
    torch.manual_seed(0)
    config = DetectorConfig(**rt_detr.FIXED, backbone={
        "name": "resnet_vd", "depths": (1, 1, 1, 1), "widths": (32, 64, 128, 256), "stem": 16},
        hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64,
        num_queries=10, num_classes=5, num_feature_levels=3, dn_labelbook_size=5)
    return FrozenDetector(build_detector(config), top_k=7)


def test_the_head_caches_trains_and_exports_on_an_rt_detr_detector(tmp_path, data):
    """A family without a stride-4 encoder map: the head reads the hybrid encoder's three
    maps (the decoder's memory) and ResNet-vd's stage-1 map as C1."""
    caches_trains_exports_and_predicts(tmp_path, data, tiny_rt_detr(), "rt_detr")


def tiny_plain_detr(variant: str) -> FrozenDetector:
    """A small random DETR, Conditional DETR or DAB-DETR (ResNet-50, 32 wide, 1 + 2 layers)."""
    torch.manual_seed(0)
    config = DetectorConfig(**huggingface_detr.FIXED[variant], hidden_dim=32, nheads=2,
                            enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=10,
                            num_classes=5, num_patterns=2 if variant == "dab_detr" else 0)
    return FrozenDetector(build_detector(config), top_k=7)


@pytest.mark.parametrize("variant", ["detr", "conditional_detr", "dab_detr"])
def test_the_head_caches_trains_and_exports_on_a_plain_detr(tmp_path, data, variant):
    """One stride-32 level: the head's image encoder reads it, the fusion upsamples it x8 to
    C1; DETR's softmax scores, and given boxes (the Predictor's) as each family takes them."""
    caches_trains_exports_and_predicts(tmp_path, data, tiny_plain_detr(variant), variant)


def caches_trains_exports_and_predicts(tmp_path, data, frozen: FrozenDetector, name: str):
    """A few head steps on a random-weight detector of a family, from its feature cache;
    then the export CLI and a Predictor on the trained segmenter."""
    from typer.testing import CliRunner

    from frozenseg.cli import app

    detector = save_detector(frozen, tmp_path / name, name)
    run = recipe(tmp_path, data, detector, "data.transform=evaluation", "train.iterations=2",
                 f"data.cache={tmp_path / 'cache'}")
    dataset = CocoInstances(run.data.train.images, run.data.train.annotations)
    write_cache(str(detector), dataset, tmp_path / "cache", dtype="fp16", top_k=7,
                memory_layer=1, transform=eval_transform(SCALE))
    trainer = Trainer(run, log=lambda _: None, evaluate=False)
    trainer.run()
    assert trainer.position.step == 2
    out = tmp_path / "results.json"
    exported = CliRunner().invoke(app, [
        "export", "--head", str(tmp_path / "run" / LAST), "--images",
        str(data / "images" / "val"), "--annotations", str(data / "instances_val.json"),
        "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    results = json.loads(out.read_text())
    assert results and all("segmentation" in r and 0 <= r["mask_quality"] <= 1
                           for r in results)
    # The one object users hold: a Predictor on the trained segmenter.
    from frozenseg.head.predictor import Predictor
    from frozenseg.head.segmenter import MaskFrozenDETR

    predictor = Predictor(MaskFrozenDETR.from_pretrained(tmp_path / "run" / LAST, device="cpu"))
    image = torch.rand(3, 90, 120)
    predictor.set_image(image)
    found = predictor.predict(max_instances=5)
    assert len(found.masks) == 5 and found.masks[0].shape == (90, 120)
    given = predictor.predict(boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0]]))
    assert given.masks.shape == (1, 90, 120)


def test_the_head_trains_on_a_d_fine_detector_and_predicts(tmp_path, data):
    """A few steps of the head on D-FINE's outputs (the FDR decoder's queries and boxes,
    the hybrid encoder's maps, HGNetV2's stage-1 map as C1), then the Predictor on it:
    its detections and masks for given boxes."""
    from frozenseg.head.predictor import Predictor
    from frozenseg.head.segmenter import MaskFrozenDETR

    detector = save_detector(tiny_d_fine(), tmp_path / "d_fine", "d_fine")
    trainer = Trainer(recipe(tmp_path, data, detector, "train.iterations=3"),
                      log=lambda _: None, evaluate=False)
    trainer.run()
    assert trainer.position.step == 3
    predictor = Predictor(MaskFrozenDETR.from_pretrained(tmp_path / "run" / LAST, device="cpu"))
    predictor.set_image(torch.rand(3, 90, 120))
    found = predictor.predict(max_instances=4)
    assert len(found.masks) == 4 and found.masks[0].shape == (90, 120)

def tiny_lw_detr(family: str = "lw") -> FrozenDetector:
    """A small random LW-DETR (CAE ViT, P3 and P5 projector levels) or RF-DETR (DINOv2,
    one level): no encoder, the projector's maps are the memory."""
    torch.manual_seed(0)
    backbone = {"name": "vit_projector", "flavour": "cae" if family == "lw" else "dinov2",
                "dim": 48, "heads": 2, "mlp_dim": 96, "patch": 8,
                "pretrain_grid": 6, "window_side": 2, "window_blocks": (0, 2),
                "out_layers": (1, 3, 4), "scales": (2.0, 0.5) if family == "lw" else (1.0,),
                "projector_dim": 32, "blocks": 1, "expansion": 0.5,
                "norm": "batch" if family == "lw" else "layer", "norm_eps": 1e-5,
                "activation": "silu"}
    levels = len(backbone["scales"])
    config = DetectorConfig(**lw_detr.FIXED, backbone=backbone, hidden_dim=32, nheads=2,
                            dec_cross_heads=4, enc_layers=0, dec_layers=2, dim_feedforward=64,
                            num_queries=10, num_classes=5, num_feature_levels=levels,
                            backbone_levels=tuple(range(1, levels + 1)), dec_n_points=2)
    return FrozenDetector(build_detector(config), top_k=7)


@pytest.mark.parametrize("family", ["lw", "rf"])
def test_the_head_trains_on_an_lw_detr_detector(tmp_path, data, family):
    """A family without an encoder: the head reads the projector's levels (the decoder's
    memory) and C1, the finest level at stride 4, sized from the detector (head_dims); a
    Predictor on the trained segmenter masks detections and given boxes."""
    from frozenseg.head.predictor import Predictor
    from frozenseg.head.segmenter import MaskFrozenDETR

    detector = save_detector(tiny_lw_detr(family), tmp_path / family, "lw_detr")
    run = recipe(tmp_path, data, detector, "data.transform=evaluation", "train.iterations=2")
    trainer = Trainer(run, log=lambda _: None, evaluate=False)
    before = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    trainer.run()
    assert trainer.position.step == 2
    after = trainer.task.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    predictor = Predictor(MaskFrozenDETR.from_pretrained(tmp_path / "run" / LAST, device="cpu"))
    predictor.set_image(torch.rand(3, 90, 120))
    found = predictor.predict(max_instances=5)
    assert len(found.masks) == 5 and found.masks[0].shape == (90, 120)
    given = predictor.predict(boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0]]))
    assert given.masks.shape == (1, 90, 120)


# DEIMv2's two kinds beside D-FINE's, as the converters derive them from the tests' tiny
# transformers models (test_convert_deimv2.LITE["atto"], test_convert_deimv2_dinov3 "s").
DEIMV2_BACKBONES = {
    # DINOv3 ViT (distilled-tiny kind: no registers, the last map normed) + the adapter,
    # whose stem is C1.
    "dinov3_sta": {"name": "dinov3_sta", "dim": 32, "heads": 2, "patch": 16, "mlp_dim": 64,
                   "registers": 0, "key_bias": False, "gated_mlp": False,
                   "activation": "gelu", "rope_theta": 100.0, "out_layers": (2, 3, 4),
                   "normed": (False, False, True), "eps": 1e-5, "adapter_dim": 8},
    # Atto's three-stage HGNetV2: its stride-16 stage feeds the lite encoder, stage 1 is C1.
    "lite": {"name": "hgnetv2", "stem": (8, 16), "lab": True, "in_channels": (16, 32, 48),
             "mid_channels": (8, 16, 16), "out_channels": (32, 48, 64), "blocks": (1, 1, 1),
             "layers": (2, 2, 2), "kernels": (3, 3, 5), "light": (False, False, True),
             "downsample": (False, True, True)},
}
DEIMV2_ENCODERS = {
    "dinov3_sta": {**deimv2_dinov3.FIXED, "enc_layers": 1, "encoder_ffn_dim": 48,
                   "num_feature_levels": 3, "csp_expansion": 0.5, "csp_trailing_conv": False},
    "lite": {"encoder": "lite", "enc_layers": 0, "aifi_levels": (), "backbone_levels": (2,),
             "num_feature_levels": 2, "csp_expansion": 0.25},
}


def tiny_deimv2(kind: str) -> FrozenDetector:
    """A small random DEIMv2: the DINOv3 backbone with the hybrid encoder, or HGNetV2 with
    the lite encoder (no AIFI, two levels); DEIMv2's FDR decoder on either."""
    torch.manual_seed(0)
    config = DetectorConfig(**{**deimv2.FIXED, **DEIMV2_ENCODERS[kind]},
                            backbone=DEIMV2_BACKBONES[kind], hidden_dim=32, nheads=2,
                            dec_layers=2, dim_feedforward=32, num_queries=10, num_classes=5,
                            dn_labelbook_size=5, csp_blocks=1, hybrid_projections=False,
                            fdr_bins=8, lqe_hidden_dim=16, ref_point_layers=3,
                            ref_point_hidden_dim=32)
    return FrozenDetector(build_detector(config), top_k=7)


@pytest.mark.parametrize("kind", DEIMV2_BACKBONES)
def test_the_head_trains_on_a_deimv2_detector(tmp_path, data, kind):
    """DEIMv2's DINOv3 + adapter backbone (C1 the adapter's stem, recomputed without the
    ViT) and its lite encoder: the C1 training recomputes for a cached view is the live
    forward's; the head trains from the cache, exports and predicts masks."""
    frozen = tiny_deimv2(kind)
    caches_trains_exports_and_predicts(tmp_path, data, frozen, "deimv2")
    item = FeatureCache(tmp_path / "cache")[0]
    dataset = CocoInstances(data / "images" / "train", data / "instances_train.json")
    image, _ = dataset.get_view(item.dataset_index, item.view)
    assert image.shape[-1] % 32 and image.shape[-2] % 32  # the adapter's padding and crop
    torch.testing.assert_close(frozen.stage1([image]), frozen([image]).c1, rtol=0, atol=0)
