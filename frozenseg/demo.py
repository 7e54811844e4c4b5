"""``frozenseg demo``: the whole flow, end to end, on the detector frozenseg ships.

:func:`run_demo` runs, in one folder, each stage of the real workflow:

1. ``synth``: the synthetic COCO-format dataset (``synth/``, 20% of it val) in the plain
   world, its shapes from 32 px: as the shipped detector's last training data;
2. ``convert``: ``assets/synth_dino.pth`` (official DINO layout) into ``detector/``;
3. ``cache``: the frozen detector's features over the train split (``cache/``);
4. ``train``: the head of ``assets/demo.yaml`` from the detector's own detections, for a
   fixed number of steps (``run/last.pt``): the same figures on any machine, only the
   time differs;
5. ``export``: COCO results (RLE masks) for the val split (``results/results.json``);
6. ``evaluate``: the detector's box AP and the head's mask AP on them
   (``results/metrics.json``);
7. ``overlays``: PNGs of a few val images (``overlays/``), drawn from the score
   threshold with the best F1 on the val split (mask IoU 0.5), which the table shows.

Run again, it reuses what is done: a stage is skipped when its output is complete and
everything it was made from was itself reused; a stage that does work makes every later
one start over (their folders are removed first). Interrupted, the cache and the
training resume where they stopped. Models are loaded only by the stages that run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from frozenseg.files import atomic_write_text

ASSETS = Path(__file__).resolve().parent / "assets"
DETECTOR = ASSETS / "synth_dino.pth"
RECIPE = ASSETS / "demo.yaml"
DEFAULT_IMAGES = 200        # 160 train, 40 val
DEFAULT_STEPS = 200         # of head training: as good as 240 (BENCHMARKS.md), 2 minutes
MIN_OBJECT = 32             # px, the smallest shape: as the shipped detector's training data
WORLD = "plain"             # the synthetic world it was last trained in
OVERLAYS = 6                # val images drawn
OVERLAY_SCORE = 0.2         # drawn from this score when val chose none (nothing matched)
RESULTS, OVERLAYS_DIR = "results", "overlays"
_TRAINED = "demo.json"      # in run/: a finished demo run's steps and training seconds
_MARKER = "frozenseg-demo.json"  # in the demo's folder: it is one (its folders may be replaced)


class DemoError(ValueError):
    """The demo cannot run as asked; the message is one line naming the path."""


def _no_bar(*_):
    return contextlib.nullcontext()


@dataclass
class DemoHooks:
    """How the stages report. ``images(description)`` and ``training(recipe)``: context
    managers giving a progress callback (``update(done, total)`` over images, ``update(record)``
    per training step) or None; ``log(line)``: a message."""

    images: Callable = _no_bar
    training: Callable = _no_bar
    log: Callable[[str], None] = lambda line: None


@dataclass
class Stage:
    name: str
    seconds: float
    reused: bool
    detail: str     # what it made, in a few words
    path: Path      # where


@dataclass
class DemoSummary:
    out: Path
    stages: list[Stage] = field(default_factory=list)
    box_ap: float | None = None     # the detector's box AP on val, percent
    mask_ap: float | None = None    # the head's mask AP on val, percent
    # the score threshold with the best F1 on val (masks, IoU 0.5), and that F1
    threshold: float | None = None
    f1: float | None = None

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def run_demo(out: str | Path, *, steps: int = DEFAULT_STEPS,
             images: int = DEFAULT_IMAGES, detector: str | Path = DETECTOR,
             trust: bool = False, hooks: DemoHooks | None = None) -> DemoSummary:
    """Run (or reuse) every stage in ``out`` (module docstring) and say what each did.

    steps: of head training (``train.iterations``); images: synthetic images in all;
    detector: the checkpoint converted (default the shipped one; any file ``frozenseg
    convert`` reads, for the synthetic shapes' classes); trust: load it as ``frozenseg
    convert --trust-checkpoint`` does (runs the pickle's code). Raises DemoError for bad
    arguments; the stages' own errors (one line) pass through.
    """
    out, hooks, detector = Path(out).resolve(), hooks or DemoHooks(), Path(detector)
    _check(out, steps, images, detector)
    atomic_write_text(out / _MARKER, json.dumps({"made_by": "frozenseg demo"}) + "\n")
    summary, recipe = DemoSummary(out), demo_recipe(out, steps)
    trained = _Trained(recipe, out)
    stages = {
        "synth": lambda: _synth(out / "synth", images, hooks),
        "convert": lambda: _convert(detector, Path(recipe.detector.path), trust, hooks),
        "cache": lambda: _cache(recipe, hooks),
        "train": lambda: _train(recipe, steps, hooks),
        "export": lambda: _export(recipe, trained, hooks),
        "evaluate": lambda: _evaluate(recipe, trained, hooks, summary),
        "overlays": lambda: _overlays(recipe, trained, hooks, summary.threshold),
    }
    worked = set()
    for name, run in stages.items():
        if worked & set(_MADE_FROM[name]):
            _clear(name, recipe, out)
        started = time.perf_counter()
        reused, detail, path = run()
        summary.stages.append(Stage(name, time.perf_counter() - started, reused, detail, path))
        if not reused:
            worked.add(name)
    return summary


# What each stage is made from: when one of these does work, the stage starts over.
_MADE_FROM = {"synth": (), "convert": (), "cache": ("synth", "convert"), "train": ("cache",),
              "export": ("train",), "evaluate": ("export",), "overlays": ("evaluate",)}


def _check(out: Path, steps: int, images: int, detector: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: exists and is not a folder (--out names the demo's folder)")
    if out.is_dir() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise DemoError(f"{out}: not empty and not a frozenseg demo folder; choose a new or "
                        "empty one (the demo replaces what it made there)")
    if steps < 1:
        raise DemoError(f"--steps must be at least 1, got {steps}")
    if images < 10:
        raise DemoError(f"--images must be at least 10 (20% of them are val), got {images}")
    if detector == DETECTOR and not detector.is_file():
        raise DemoError(f"{DETECTOR}: no shipped detector in this build yet (it is trained "
                        "with recipes/synth_detector.yaml); pass --detector CHECKPOINT")
    if not detector.exists():
        raise DemoError(f"{detector}: no such checkpoint (a file, or a save_pretrained folder)")


def demo_recipe(out: str | Path, steps: int = DEFAULT_STEPS):
    """assets/demo.yaml with its paths under ``out``, ``steps`` iterations and no time limit
    (the lr drops fall at their fractions of ``steps``)."""
    from frozenseg.recipe import load_recipe, recipe_from_dict, recipe_to_dict

    out = Path(out)
    data = recipe_to_dict(load_recipe(RECIPE))
    data["detector"]["path"] = str(out / data["detector"]["path"])
    for split in ("train", "val"):
        for key in ("images", "annotations"):
            data["data"][split][key] = str(out / data["data"][split][key])
    data["data"]["cache"] = str(out / data["data"]["cache"])
    data["train"]["output_dir"] = str(out / data["train"]["output_dir"])
    data["train"]["iterations"], data["train"]["max_minutes"] = steps, None
    return recipe_from_dict(data, str(RECIPE))


def _clear(stage: str, recipe, out: Path) -> None:
    """Remove what ``stage`` made before: what it is made from has changed."""
    folders = {"cache": recipe.data.cache, "train": recipe.train.output_dir,
               "export": out / RESULTS, "overlays": out / OVERLAYS_DIR}
    if stage in folders:
        shutil.rmtree(folders[stage], ignore_errors=True)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ stages
# Each returns (reused, what it made in a few words, where).


def _synth(folder: Path, images: int, hooks: DemoHooks):
    from frozenseg.data.synth import synth

    with hooks.images("Rendering the synthetic dataset") as update:
        made = synth(folder, images=images, seed=0, min_object=MIN_OBJECT, world=WORLD,
                     overwrite=True, progress=update)
    return made.reused, f"{made.train} train + {made.val} val images", folder


def _convert(detector: Path, folder: Path, trust: bool, hooks: DemoHooks):
    """Skipped when ``folder`` holds a conversion of this very file (its config.json
    records the source's sha256) with the synthetic dataset's class names."""
    from frozenseg.convert import convert_checkpoint
    from frozenseg.data.synth import THINGS
    from frozenseg.detector.folder import DetectorFolderError, read_meta

    names = [c.name for c in THINGS]
    try:
        meta = read_meta(folder)
    except DetectorFolderError:
        meta = {}
    if (meta.get("sha256") == _digest(detector)
            and meta.get("classes", {}).get("names") == names):
        return True, f"{meta['format']}, {len(names)} classes", folder
    with hooks.images("Converting the detector") as update:
        report = convert_checkpoint(detector, folder, class_names=names, trust=trust,
                                    overwrite=True)
        if update:
            update(1, 1)
    return False, f"{report.format}, {report.config.num_classes} classes", folder


def _digest(detector: Path) -> str:
    """What a conversion records of its source: a file's sha256; a folder's weights' (as
    ``load_checkpoint`` finds them)."""
    from frozenseg.cache.store import sha256_file
    from frozenseg.checkpoint import load_checkpoint

    return sha256_file(detector) if detector.is_file() else load_checkpoint(detector).sha256


def _cache(recipe, hooks: DemoHooks):
    """Skipped when complete; an interrupted cache resumes."""
    from frozenseg.cache import recipe_cache_job, write_cache
    from frozenseg.cache.store import read_index

    folder = Path(recipe.data.cache)
    index = read_index(folder) if folder.is_dir() else None
    reused = bool(index and index["complete"])
    if not reused:
        with hooks.images("Caching the detector's features") as update:
            index = write_cache(**recipe_cache_job(recipe), device=_device(), resume=True,
                                progress=update, log=hooks.log)
    entries = sum(len(s["entries"]) for s in index["shards"])
    return reused, f"{entries} images", folder


def _train(recipe, steps: int, hooks: DemoHooks):
    """Skipped when run/ holds a finished demo run of ``steps``; a run interrupted
    resumes from its last checkpoint."""
    from frozenseg.engine.train import LAST, Trainer

    folder = Path(recipe.train.output_dir)
    if finished_run(folder, steps) is not None:
        return True, f"{steps} steps", folder / LAST
    if (folder / _TRAINED).is_file():  # finished with other steps: train anew
        shutil.rmtree(folder)
    trainer = Trainer(recipe, log=hooks.log, evaluate=False)  # evaluate: the export's results
    started = time.perf_counter()
    with hooks.training(recipe) as update:
        position = trainer.run(resume=True, progress=update)
    record = {"step": position.step, "steps": steps,
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(folder / _TRAINED, json.dumps(record) + "\n")
    return False, f"{position.step} steps", folder / LAST


def finished_run(folder: Path, steps: int) -> dict | None:
    """The record of a finished demo run of ``steps`` in ``folder`` (its steps and
    training seconds, as timed when it ran), else None."""
    import torch

    from frozenseg.engine.train import LAST

    try:
        record = json.loads((folder / _TRAINED).read_text())
        # Memory-mapped: only the position is read, not the weights.
        state = torch.load(folder / LAST, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, ValueError, RuntimeError):  # none yet, or not one to trust
        return None
    step = state["position"]["step"]
    return record if (record.get("step"), record.get("steps")) == (step, steps) else None


class _Trained:
    """(detector, head) from run/last.pt, loaded once when a stage first needs them."""

    def __init__(self, recipe, out: Path) -> None:
        from frozenseg.engine.train import LAST

        self.recipe, self.out, self._loaded = recipe, out, None
        self.checkpoint = Path(recipe.train.output_dir) / LAST

    def load(self):
        if self._loaded is None:
            from frozenseg.head.segmenter import MaskFrozenDETR
            from frozenseg.head.trained import load_trained

            detector, head, _ = load_trained(self.checkpoint, recipe=self.recipe)
            self._loaded = MaskFrozenDETR(detector, head, self.recipe).to(_device()).eval()
        return self._loaded

    def newer(self, *paths: Path) -> bool:
        """Whether every path exists and was written after the checkpoint."""
        made = self.checkpoint.stat().st_mtime
        return all(p.is_file() and p.stat().st_mtime >= made for p in paths)


def _export(recipe, trained: _Trained, hooks: DemoHooks):
    """The val split's COCO results, as ``frozenseg export`` writes them."""
    from frozenseg.data import ImageFolder
    from frozenseg.detector.classes import match_classes
    from frozenseg.engine.data import eval_transform
    from frozenseg.head.export import ExportSettings, export_results

    path = trained.out / RESULTS / "results.json"
    if trained.newer(path):
        return True, f"{len(json.loads(path.read_text()))} results", path
    split, settings = recipe.data.val, recipe.eval
    dataset = ImageFolder.from_coco(split.images, split.annotations,
                                    transform=eval_transform(recipe.data.scale))
    model = trained.load()
    classes = match_classes(model.detector.classes, dataset.category_ids,
                            dataset.category_names)
    with hooks.images("Exporting val masks") as update:
        made = export_results(
            model, dataset, path, classes=classes, resume=True,
            settings=ExportSettings(settings.score_threshold, settings.max_per_image,
                                    settings.mask_threshold, recipe.train.batch_size),
            job={"head": str(trained.checkpoint), "images": split.images}, progress=update)
    return False, f"{made.results} results on {made.images + made.resumed} images", path


def _evaluate(recipe, trained: _Trained, hooks: DemoHooks, summary: DemoSummary):
    """Box AP (the detector's boxes) and mask AP (the head's masks) of the exported results."""
    from frozenseg.evaluation.coco import coco_evaluate, write_metrics

    results = trained.out / RESULTS / "results.json"
    path = results.with_name("metrics.json")
    reused = trained.newer(results, path) and path.stat().st_mtime >= results.stat().st_mtime
    if reused:
        metrics = json.loads(path.read_text())
    else:
        with hooks.images("Evaluating (pycocotools)") as update:
            metrics = coco_evaluate(recipe.data.val.annotations, results)
            write_metrics(metrics, path)
            if update:
                update(1, 1)
    summary.box_ap, summary.mask_ap = metrics["bbox"]["AP"], metrics["segm"]["AP"]
    best = metrics["segm"].get("best_f1", {})
    summary.threshold, summary.f1 = best.get("score"), best.get("f1")
    return reused, f"box AP {_ap(summary.box_ap)}, mask AP {_ap(summary.mask_ap)}", path


def _overlays(recipe, trained: _Trained, hooks: DemoHooks, threshold: float | None):
    """Overlay PNGs (and json) of the first val images, as ``frozenseg predict`` draws,
    from ``threshold`` (the val split's best-F1 score) or OVERLAY_SCORE."""
    from frozenseg.data import ImageFolder
    from frozenseg.detector.classes import match_classes
    from frozenseg.engine.data import eval_transform
    from frozenseg.head.overlay import predict_overlays

    folder = trained.out / OVERLAYS_DIR
    val = ImageFolder.from_coco(recipe.data.val.images, recipe.data.val.annotations)
    files = [val.image_path(i) for i in range(min(OVERLAYS, len(val)))]
    pngs = [folder / f.with_suffix(".png").name for f in files]
    if trained.newer(*pngs):
        return True, f"{len(pngs)} images", folder
    model = trained.load()
    classes = match_classes(model.detector.classes, val.category_ids, val.category_names)
    names = dict(zip(val.category_ids, val.category_names, strict=True))
    with hooks.images("Drawing overlays") as update:
        predict_overlays(model, ImageFolder(files, transform=eval_transform(
            recipe.data.scale)), folder, classes=classes, names=names,
            threshold=OVERLAY_SCORE if threshold is None else threshold,
            progress=update)
    return False, f"{len(pngs)} images", folder


# ------------------------------------------------------------------------------ report


def _ap(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"


def summary_table(summary: DemoSummary) -> Table:
    """One table: each stage's time (or "reused"), what it made and where; the two APs."""
    table = Table(title=f"frozenseg demo: {escape(str(summary.out))}")
    for column, justify in (("stage", "left"), ("seconds", "right"), ("made", "left"),
                            ("written to", "left")):
        table.add_column(column, justify=justify)
    for s in summary.stages:
        seconds = "reused" if s.reused else f"{s.seconds:.1f}"
        where = s.path.relative_to(summary.out) if s.path.is_relative_to(summary.out) else s.path
        table.add_row(s.name, seconds, escape(s.detail), escape(str(where)))
    table.add_section()
    table.add_row("[bold]detector box AP", "", f"[bold]{_ap(summary.box_ap)}", "val split")
    table.add_row("[bold]head mask AP", "", f"[bold]{_ap(summary.mask_ap)}", "val split")
    if summary.threshold is not None:
        table.add_row("overlay score", "", f"{summary.threshold:.2f} (best F1 {summary.f1:.2f})",
                      "val split")
    table.add_section()
    for stage, command in NEXT_STEPS:
        table.add_row(f"[dim]{stage}", "", escape(command), "")
    table.caption = f"total {sum(s.seconds for s in summary.stages):.1f} s"
    return table


# The same stages for a detector and data of one's own: the table's closing rows.
NEXT_STEPS = (
    ("next: your detector", "frozenseg convert --detector YOURS.pth --out detectors/mine"),
    ("next: your data", "frozenseg train recipes/base.yaml detector.path=detectors/mine "
                        "data.train.images=... (and the other data.* paths)"),
    ("next: your images", "frozenseg predict photos/ --head runs/base/best.pt --out viz/"),
)
