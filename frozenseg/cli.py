"""The ``frozenseg`` command line: thin wrappers that parse, then call the library."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import frozenseg
from frozenseg.demo import DEFAULT_IMAGES, DEFAULT_STEPS

app = typer.Typer(
    help="Turn a frozen DETR-family detector into an instance segmenter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"frozenseg {frozenseg.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """frozenseg: masks for the detector you already have."""


@app.command()
def doctor(
    build_ops: bool = typer.Option(
        False, "--build-ops",
        help="Compile the CUDA op even without a GPU; exit non-zero if compilation fails.",
    ),
    arch: str = typer.Option(
        None, "--arch",
        help="Compute capabilities to build for, e.g. '8.0;9.0' (default: TORCH_CUDA_ARCH_LIST, "
        "else the visible GPUs, else 8.0;9.0).",
    ),
) -> None:
    """Versions, GPU, and whether the deformable-attention kernels build and agree."""
    import torch

    from frozenseg import doctor as checks

    findings = checks.environment()
    with console.status("Building the CPU op (the first build takes about half a minute)..."):
        findings.extend(checks.cpu_kernel())
    has_gpu = torch.cuda.is_available()
    if build_ops or has_gpu:
        with console.status("Building the CUDA op (the first build takes a few minutes)..."):
            findings.append(checks.kernel_build(arch))
        if has_gpu and findings[-1].ok:
            findings.extend(checks.kernel_agreement())
    else:
        findings.append(checks.Finding(
            "CUDA op build", "skipped: no GPU (frozenseg doctor --build-ops compiles it anyway); "
            "the PyTorch fallback is used"))
    table = Table(title="frozenseg doctor", show_header=False)
    marks = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: ""}
    for finding in findings:
        table.add_row(finding.name, escape(finding.value), marks[finding.ok])
    console.print(table)
    failures = [f for f in findings
                if f.ok is False and f.name.startswith(("CUDA op", "kernel", "CPU"))]
    for failure in failures:  # unwrapped, so the compiler's message can be copied whole
        console.print(f"[red]error:[/] {failure.name}: {escape(failure.value)}", soft_wrap=True)
    if failures:
        raise typer.Exit(code=1)


def _fail(message: str) -> None:
    """One line on stderr, exit code 1. The message is escaped: paths and messages hold
    brackets ("[x, y, w, h]", a file named "[1]/x.pth") that rich would take for markup."""
    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", soft_wrap=True,
                               highlight=False)
    raise typer.Exit(code=1)


def _warn(line: str) -> None:
    """A warning line; ``line`` is escaped (see _fail)."""
    console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _say(line: str) -> None:
    """A line printed as it is: no markup (it holds paths and names), no highlighting."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _error_line(err: BaseException) -> str:
    """An exception's message on one line. One raised in a DataLoader worker comes back
    as "Caught X in DataLoader worker process N." with the worker's traceback, whose last
    line is the original "module.X: message": that message is the line."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].partition(": ")[2]
    return text.splitlines()[0] if text else type(err).__name__


def _naming(path: Path, err: BaseException) -> str:
    """The error's line, led by ``path`` unless it names the file already."""
    line = _error_line(err)
    return line if str(path) in line else f"{path}: {line}"


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a command reports in one line: bad input, a refused job, or a failed step whose
    message says why (frozenseg's own errors are ValueErrors, except these two)."""
    from frozenseg.engine.task import TrainingError
    from frozenseg.files import FolderInUse

    return ValueError, KeyError, TrainingError, FolderInUse


def _one_line_errors(*where: str, naming: bool = False,
                     also: tuple[type[BaseException], ...] = ()):
    """Decorate a command: its expected errors (and ``also``) become one line on stderr and
    exit code 1 (see _fail), not a traceback. ``where``: the parameters holding the path the
    command works on, the first one given; an OSError without a file name (a full disk, a
    read-only folder) names it, and with ``naming`` every message is led by it."""

    def decorate(command):
        @functools.wraps(command)
        def run(**params):
            path = next((params[name] for name in where if params.get(name) is not None), None)
            try:
                return command(**params)
            except (typer.Exit, typer.Abort):
                raise
            except OSError as err:
                if isinstance(err, FileNotFoundError) and not err.filename:
                    _fail(_error_line(err))
                _fail(f"{err.filename or path}: {err.strerror or err}")
            except Exception as err:
                if not isinstance(err, (*_expected_errors(), *also)):
                    raise
                _fail(_naming(path, err) if naming and path else _error_line(err))

        return run

    return decorate


def _read_class_names(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as err:
        _fail(f"{path}: cannot read class names ({err.strerror})")
    from frozenseg.data.common import parse_json

    try:
        names = parse_json(text, path)
    except ValueError:  # not JSON: one name per line
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        _fail(f"{path}: expected a JSON list of strings or one class name per line")
    return names


def _print_report(report) -> None:
    from frozenseg.detector.config import DetectorConfig
    from frozenseg.detector.frozen import DEFAULT_TOP_K

    console.print(f"format: [bold]{report.format}[/] ({escape(report.source)}, sha256 "
                  f"{report.sha256[:12]})")
    config = Table(title="derived config", show_header=False,
                   caption="*: differs from DetectorConfig's default")
    defaults = DetectorConfig().to_dict()
    for key, value in report.config.to_dict().items():
        shown = str(value)
        if key == "num_select":  # the original's top-k; FrozenDetector has its own
            shown += (f" (the original's post-processing; frozenseg keeps the top "
                      f"{DEFAULT_TOP_K}, load_detector(top_k=...))")
        config.add_row(key, escape(shown), "" if defaults.get(key) == value else "*")
    console.print(config)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    keys = Table(title="keys")
    for column in ("what", "count", "examples"):
        keys.add_column(column)
    rows = [
        ("matched as is", report.kept, lambda k: k),
        ("renamed", report.renamed, lambda p: f"{p[0]} -> {p[1]}"),
        ("dropped", report.dropped, lambda p: f"{p[0]} ({p[1]})"),
        ("derived", report.derived, lambda p: f"{p[0]} ({p[1]})"),
        ("missing", report.missing, lambda k: k),
        ("unexpected", report.unexpected, lambda k: k),
        ("shape mismatch", report.mismatched, lambda m: f"{m[0]}: {list(m[1])} vs {list(m[2])}"),
    ]
    for what, items, show in rows:
        style = "red" if what in ("missing", "unexpected", "shape mismatch") and items else ""
        examples = "\n".join(escape(show(i)) for i in items[:3])
        keys.add_row(what, str(len(items)), examples, style=style)
    console.print(keys)


FORMAT_HELP = ("auto: recognised from the keys; or force one of dino, deformable_detr, "
               "h_deformable_detr, detrex_dino, huggingface, rt_detr, huggingface_rt_detr, "
               "detr, conditional_detr, dab_detr, huggingface_detr, "
               "huggingface_conditional_detr, huggingface_dab_detr, d_fine (official D-FINE, "
               "DEIM), huggingface_d_fine (D-FINE, DEIM), huggingface_deimv2, deimv2 (official "
               "DEIMv2: its YAML as --config or config.yaml beside it), "
               "huggingface_grounding_dino (open vocabulary: its tokenizer files beside it), "
               "grounding_dino (official Grounding DINO: --config, --tokenizer), "
               "huggingface_lw_detr (LW-DETR and RF-DETR), lw_detr (official LW-DETR), mmdet "
               "(mmdetection DINO, Deformable DETR), mmdet_detr (mmdetection DETR, "
               "Conditional DETR, DAB-DETR), mmdet2 (mmdetection 2.x Deformable DETR), co_dino.")
CONFIG_HELP = (
    "The training config, when the checkpoint does not carry it (JSON or YAML, e.g. "
    "detrex's config.yaml; or Python, read as data: the official Grounding DINO's "
    "GroundingDINO_SwinT_OGC.py); overrides ckpt['args']."
)
TOKENIZER_HELP = ("Grounding DINO: the folder of its tokenizer files (vocab.txt or "
                  "tokenizer.json: bert-base-uncased's for the official models), when they "
                  "are not beside the checkpoint.")
DETECTOR_HELP = ("The checkpoint: a .pth/.pt/.bin/.safetensors file, a sharded "
                 "*.index.json, or a folder holding one (e.g. a save_pretrained folder).")
WEIGHTS_HELP = ("auto: the EMA copy where the file has one (what the projects evaluate); "
                "model: the trained weights; ema: the EMA copy or an error.")
FLAG = " "  # a flag's metavar: typer would otherwise show <bool>, as if it took a value
TRUST_HELP = ("Flag: allow any pickled Python object. This runs code from the file: "
              "use it for files from a source you trust only.")


@app.command()
@_one_line_errors("out")
def convert(
    detector: Path = typer.Option(..., "--detector", help=DETECTOR_HELP),
    out: Path = typer.Option(
        ..., "--out", help="Folder to write detector.safetensors + config.json (a new one)."
    ),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    num_classes: int = typer.Option(
        None, "--num-classes", help="Check the classifier has N classes."
    ),
    class_names: Path = typer.Option(None, "--class-names", help="JSON list or one name per line."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP,
                                          metavar=FLAG),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("auto", "--weights", help=WEIGHTS_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", metavar=FLAG,
        help="Flag: replace --out when it holds a detector convert wrote (--to dino: a file).",
    ),
    to: str = typer.Option("frozenseg", "--to", help="frozenseg: a detector folder; dino: "
                           "one .pth file in the official DINO layout (a DINO detector only, "
                           "e.g. a joint-mode run with maskdino.query_init=mixed)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
) -> None:
    """Convert a DETR-family checkpoint into a verified frozen detector."""
    if to not in ("frozenseg", "dino"):
        _fail(f"--to {to}: expected frozenseg or dino")
    options = {"format": format, "num_classes": num_classes,
               "names": _read_class_names(class_names), "trust": trust_checkpoint,
               "config": config, "weights": weights, "overwrite": overwrite,
               "tokenizer": tokenizer}
    if to == "dino":
        _convert_to_dino(detector, out, options)
        return
    report = _convert_to_folder(detector, out, options)
    if report is not None:
        _print_report(report)
        from frozenseg.detector.folder import CONFIG_FILE, WEIGHTS_FILE

        tokenizer = f" (+ the prompt tokenizer, {out / 'tokenizer'})" if (
            report.config.open_vocabulary) else ""
        console.print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE}{tokenizer}",
                      highlight=False, soft_wrap=True, markup=False)


def _convert_to_folder(detector: Path, out: Path, options: dict):
    """Any checkpoint convert reads -> a detector folder: the conversion report, or None
    for a joint-mode checkpoint (its detector is written as it is)."""
    from frozenseg.convert import convert_checkpoint
    from frozenseg.maskdino.checkpoint import is_joint_checkpoint

    if detector.is_file() and is_joint_checkpoint(detector):
        _joint_to_detector(detector, out, options["overwrite"])
        return None
    with console.status("Converting ..."):
        return convert_checkpoint(detector, out, format=options["format"],
                                  num_classes=options["num_classes"],
                                  class_names=options["names"], trust=options["trust"],
                                  config=options["config"], weights=options["weights"],
                                  overwrite=options["overwrite"],
                                  tokenizer=options["tokenizer"])


def _convert_to_dino(detector: Path, out: Path, options: dict) -> None:
    """Convert as usual into a temporary folder, then write that detector in DINO's
    layout: a checkpoint the official DINO code (and ``frozenseg convert``) reads."""
    import tempfile

    from frozenseg.detector.frozen import load_detector
    from frozenseg.formats.dino import save_official

    if out.exists() and not (out.is_file() and options["overwrite"]):
        _fail(f"{out}: exists; pass --overwrite to replace the file" if out.is_file()
              else f"{out}: exists and is not a file: choose a new --out")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        folder = Path(tmp) / "detector"
        _convert_to_folder(detector, folder, options)
        frozen = load_detector(folder)
        try:
            save_official(frozen.model.state_dict(), frozen.config, out)
        except ValueError as err:
            _fail(f"{detector}: {err}")
    console.print(f"wrote {out} (official DINO layout, {frozen.config.num_classes} classes)",
                  highlight=False, soft_wrap=True, markup=False)


def _joint_to_detector(checkpoint: Path, out: Path, overwrite: bool) -> None:
    """A Mask DINO checkpoint of the joint mode -> a detector folder for the head pipeline."""
    from frozenseg.convert import ConversionError
    from frozenseg.maskdino.checkpoint import load_joint, save_as_detector

    try:
        model, info = load_joint(checkpoint)
        save_as_detector(model, out, info["class_names"], source=checkpoint.name,
                         overwrite=overwrite)
    except ConversionError:
        raise
    except (ValueError, RuntimeError, KeyError) as err:
        _fail(f"{checkpoint}: {str(err).strip().splitlines()[0]}")
    console.print(f"Mask DINO checkpoint (joint mode): its detector, {len(info['class_names'])} "
                  f"classes, written to {out}", highlight=False, soft_wrap=True, markup=False)


@app.command()
@_one_line_errors("checkpoint")
def inspect(
    checkpoint: Path = typer.Argument(..., help=DETECTOR_HELP),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP,
                                          metavar=FLAG),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("auto", "--weights", help=WEIGHTS_HELP),
) -> None:
    """Everything convert does (load, convert, build, load strictly, run, serialise), without
    writing anything: a clean report means convert succeeds."""
    from frozenseg.convert import inspect_checkpoint

    _, report = inspect_checkpoint(checkpoint, format=format, trust=trust_checkpoint,
                                   config=config, weights=weights)
    _print_report(report)
    if not report.ok:
        _fail(f"{checkpoint}: {report.problem()}")


@app.command()
@_one_line_errors("out")
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the dataset into."),
    images: int = typer.Option(200, "--images", help="Images in all (20% of them are val)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    min_size: int = typer.Option(160, "--min-size", help="Smallest image side, pixels."),
    max_size: int = typer.Option(320, "--max-size", help="Largest image side, pixels."),
    min_object: int = typer.Option(8, "--min-object", help="Smallest shape's size, pixels."),
    image_format: str = typer.Option("jpg", "--image-format", help="jpg (quality 90) or png."),
    world: str = typer.Option(
        "scenes", "--world", help="scenes (textured, up to 10 shapes) or plain (calm, up to 4)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a synth dataset made with other parameters."
    ),
) -> None:
    """Write a deterministic synthetic COCO-format dataset (instances, panoptic, semantic)."""
    from rich.progress import Progress

    from frozenseg.data.synth import synth as make_dataset

    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("Rendering", total=images)
        summary = make_dataset(
            out, images=images, seed=seed, min_size=min_size, max_size=max_size,
            min_object=min_object, image_format=image_format, world=world, overwrite=overwrite,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    what = "already there, reused" if summary.reused else f"wrote in {summary.seconds:.1f} s"
    _say(f"{summary.images} images ({summary.train} train, {summary.val} val), "
         f"{summary.instances} instances + {summary.crowd} crowd regions, {summary.classes} "
         f"classes, {summary.empty_images} images without instances; {what}: {out}")


def _rate_column(unit: str = "img/s"):
    """A rich progress column showing the task's speed (images, or steps, per second)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:.2f} {unit}")

    return Rate()


@app.command()
@_one_line_errors("out", "recipe")
def cache(
    recipe: Path = typer.Argument(None, help="A recipe: caches its train split with its "
                                  "detector (path, top_k, memory_layer, prompt) into data.cache, "
                                  "data.views views at data.scale; the flags below that name "
                                  "these are then ignored."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of the recipe, "
                                          "e.g. data.cache=cache/coco_train"),
    detector: Path = typer.Option(None, "--detector", help="A folder frozenseg convert wrote."),
    images: Path = typer.Option(None, "--images", help="The folder of the dataset's images."),
    annotations: Path = typer.Option(None, "--annotations", help="The COCO instances json."),
    out: Path = typer.Option(None, "--out", help="The cache folder to write."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16, bf16, int8 or fp32 (memory, "
                              "queries; boxes and scores stay fp32)."),
    shard_size: int = typer.Option(256, "--shard-size", help="Images per shard file."),
    max_gb: float = typer.Option(None, "--max-gb", help="Refuse if the projected size is larger."),
    resume: bool = typer.Option(False, "--resume", help="Keep verified shards, write the rest."),
    memory_layer: int = typer.Option(None, "--memory-layer", help="Encoder layer (1-based) "
                                     "to store; default 4, or the last if fewer."),
    top_k: int = typer.Option(100, "--top-k", help="Predictions kept per image."),
    short: int = typer.Option(800, "--short", help="Evaluation resize: shorter side."),
    max_size: int = typer.Option(1333, "--max-size", help="Evaluation resize: longer side cap."),
    views: int = typer.Option(1, "--views", help="Views per image: 1 is the evaluation resize; "
                              "K > 1 are K fixed augmented views (flip, shorter side "
                              "480..800 x short/800), seeded."),
    seed: int = typer.Option(0, "--seed", help="Seed of the augmented views."),
    store_c1: bool = typer.Option(False, "--store-c1", help="Also store the backbone's "
                                  "stride-4 map (large; training then skips the backbone; "
                                  "a recipe: data.store_c1)."),
    verify: Path = typer.Option(None, "--verify", help="Check every shard of this cache's "
                                "sha256 and exit (1 naming a bad shard)."),
    prompt: str = typer.Option(None, "--prompt", help="Open vocabulary (Grounding DINO): what "
                               "to find, e.g. \"cat . dog .\" (a recipe: detector.prompt)."),
) -> None:
    """Run the frozen detector once over a dataset into a feature cache (or --verify one)."""
    from frozenseg.data import CocoInstances
    from frozenseg.data.transforms import evaluation
    from frozenseg.engine.data import cache_views

    if verify is not None:
        _verify_cache(verify)
        return
    if recipe is not None:
        job = _recipe_cache_job(recipe, overrides or [])
        job["store_c1"] = job["store_c1"] or store_c1
    else:
        missing = [name for name, value in (("--detector", detector), ("--images", images),
                                            ("--annotations", annotations), ("--out", out))
                   if value is None]
        if missing:
            _fail(f"missing {', '.join(missing)} (or pass a RECIPE, or --verify DIR)")
        job = {"detector": detector, "dataset": CocoInstances(images, annotations),
               "out_dir": out, "memory_layer": memory_layer, "top_k": top_k, "views": views,
               "prompt": prompt, "store_c1": store_c1,
               "seed": seed, "transform": evaluation(short, max_size) if views == 1
               else cache_views(views, short / 800)}
    out, views = job["out_dir"], job["views"]
    index = _write_cache(job, dtype=dtype, shard_size=shard_size, max_gb=max_gb,
                         resume=resume)
    if index is None:  # another process of a distributed run: process 0 reports
        return
    count = sum(len(s["entries"]) for s in index["shards"])
    what = f"{count} images" if views == 1 else f"{count} entries ({views} views per image)"
    _say(f"cached {what} in {len(index['shards'])} shards: {out}")


def _verify_cache(folder: Path) -> None:
    from frozenseg.cache import verify_cache

    bad = verify_cache(folder)
    if bad:
        _fail(f"{folder / bad[0]}: sha256 does not match index.json"
              + (f" (and {len(bad) - 1} more bad shards)" if len(bad) > 1 else ""))
    _say(f"{folder}: every shard verifies")


def _recipe_cache_job(path: Path, overrides: list[str]) -> dict:
    from frozenseg.cache import CacheError, recipe_cache_job

    try:
        return recipe_cache_job(_load_recipe(path, overrides))
    except CacheError as err:
        _fail(f"{path}: {err}")


def _write_cache(job: dict, **options) -> dict:
    """Under ``accelerate launch`` (or torchrun) each process takes its share of shards;
    the index comes back to process 0 only (None elsewhere)."""
    import torch
    from accelerate import PartialState
    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    from frozenseg.cache import write_cache

    state = PartialState(cpu=not torch.cuda.is_available())
    columns = (*Progress.get_default_columns()[:2], MofNCompleteColumn(), _rate_column(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal or not state.is_main_process) as bar:
        task = bar.add_task("Caching", total=len(job["dataset"]) * job["views"])
        index = write_cache(**job, device=state.device, state=state,
                            progress=_ProgressUpdate(bar, task), log=_say, **options)
    return index if state.is_main_process else None


class _ProgressUpdate:
    """progress(done, total) for write_cache: the first call (images a resume kept) restarts
    the bar there, so that images/s and the ETA count only images run now."""

    def __init__(self, bar, task) -> None:
        self.bar, self.task, self.started = bar, task, False

    def __call__(self, done: int, total: int) -> None:
        if not self.started:
            self.bar.reset(self.task, total=total, completed=done)
            self.started = True
        else:
            self.bar.update(self.task, completed=done)


def _load_recipe(path: Path, overrides: list[str]):
    """The recipe, and (mode head, its detector folder at hand) detector.prompt checked
    against the detector: either is a one-line error naming the file."""
    from frozenseg.recipe import load_recipe

    try:
        loaded = load_recipe(path, overrides)
    except (ValueError, OSError) as err:
        _fail(_error_line(err))
    if loaded.mode == "head" and Path(loaded.detector.path).is_dir():
        from frozenseg.head.task import check_prompt

        try:
            check_prompt(loaded)
        except ValueError as err:
            _fail(_naming(path, err))
    return loaded


@app.command()
def recipes() -> None:
    """The recipes frozenseg ships: pass a name to train, cache or eval instead of a path."""
    from frozenseg.recipe.packaged import describe, packaged_dir, packaged_recipes

    found = packaged_recipes()
    if not found:
        _fail("no packaged recipes found (a broken install?)")
    table = Table(title=f"recipes in {escape(str(packaged_dir()))}")
    table.add_column("name")
    table.add_column("what")
    for name, path in found.items():
        table.add_row(escape(name), escape(describe(path)))
    console.print(table)


@app.command()
@_one_line_errors("recipe")
def train(
    recipe: Path = typer.Argument(..., help="A recipe YAML, or the name of a packaged one "
                                  "(frozenseg recipes)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.output_dir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the head's parameters and "
                                 "FLOPs for one validation image, then exit."),
) -> None:
    """Train the mask head a recipe describes (on its cache, or with the detector live)."""
    from frozenseg.engine.train import Trainer

    loaded = _load_recipe(recipe, overrides or [])
    if dry_run:
        _dry_run(loaded)
        return
    trainer = Trainer(loaded, log=_say)
    _print_lines(trainer.task.describe())
    with _training_progress(loaded) as update:
        position = trainer.run(resume=resume, progress=update)
    _say(f"trained {position.step} steps: {Path(loaded.train.output_dir) / 'last.pt'}")


def _training_progress(recipe):
    """A context giving update(record): a rich bar with ETA, loss, lr, it/s, peak memory."""

    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    @contextlib.contextmanager
    def context():
        columns = (TextColumn("Training"), BarColumn(), MofNCompleteColumn(), _rate_column("it/s"),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns, console=console, transient=True,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task("train", total=recipe.train.iterations, status="")

            def update(record: dict) -> None:
                memory = (f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G"
                          if torch.cuda.is_available() else "")
                bar.update(task, completed=record["step"], status=(
                    f"loss {record['loss']:.4f} lr {record['lr']:.2e}{memory}"))

            yield update

    return context()


def _dry_run(recipe) -> None:
    """What the recipe trains and what it costs, without training."""
    from accelerate import PartialState

    from frozenseg.engine.task import build_task

    _print_lines(build_task(recipe, PartialState()).describe(measure=True))


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        console.print(escape(line), highlight=False)


@app.command("eval")
@_one_line_errors("checkpoint", "recipe", naming=True, also=(RuntimeError,))
def evaluate(
    recipe: Path = typer.Argument(..., help="A recipe YAML (see recipes/)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="A head checkpoint (last.pt, "
                                    "best.pt); not needed for the training-free baseline."),
    out: Path = typer.Option(None, "--out", help="Where results.json and metrics.json go "
                             "(default: train.output_dir/eval)."),
) -> None:
    """COCO box and mask AP of a trained head on the recipe's val split."""
    import torch

    from frozenseg.evaluation.coco import metrics_table, per_class_table
    from frozenseg.head.inference import evaluate as run_evaluation
    from frozenseg.head.segmenter import MaskFrozenDETR
    from frozenseg.head.trained import load_trained

    loaded = _load_recipe(recipe, overrides or [])
    if loaded.mode == "maskdino":
        _evaluate_joint(loaded, checkpoint, out)
        return
    detector, head, _ = load_trained(checkpoint, recipe=loaded)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = out or Path(loaded.train.output_dir) / "eval"
    metrics = run_evaluation(MaskFrozenDETR(detector, head, loaded).to(device), folder)
    console.print(metrics_table(metrics))
    console.print(per_class_table(metrics, "segm"))
    _say(f"results and metrics: {folder}")


def _evaluate_joint(recipe, checkpoint: Path | None, out: Path | None) -> None:
    """frozenseg eval in mode maskdino: AP, PQ and mIoU of a joint checkpoint."""
    import torch

    from frozenseg.evaluation.coco import metrics_table
    from frozenseg.evaluation.panoptic import (
        panoptic_table,
        per_class_panoptic_table,
        semantic_table,
    )
    from frozenseg.maskdino.checkpoint import load_joint
    from frozenseg.maskdino.task import evaluate_joint

    if checkpoint is None:
        _fail("--checkpoint is needed (a joint-mode last.pt or best.pt)")
    model, _ = load_joint(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = out or Path(recipe.train.output_dir) / "eval"
    metrics, _, line = evaluate_joint(model.to(device), recipe, folder)
    if "bbox" in metrics:
        console.print(metrics_table(metrics))
    if "panoptic" in metrics:
        console.print(panoptic_table(metrics["panoptic"]))
        console.print(per_class_panoptic_table(metrics["panoptic"]))
    if "semantic" in metrics:
        console.print(semantic_table(metrics["semantic"], per_class=True))
    _say(f"{line}; results and metrics: {folder}")


# ------------------------------------------------------------------------ masks out


# Shared by export and predict: which trained head, on which detector.
_HEAD_OPTION = typer.Option(None, "--head", help="A head checkpoint (last.pt, best.pt); it "
                            "carries its recipe.")
_DETECTOR_OPTION = typer.Option(None, "--detector", help="The converted detector folder "
                                "(default: the one the head was trained with).")
_RECIPE_OPTION = typer.Option(None, "--recipe", help="Use this recipe instead of the head's "
                              "(needed for the training-free baseline).")
_PROMPT_OPTION = typer.Option(None, "--prompt", help="Open vocabulary (Grounding DINO): what to "
                              "find, phrases separated by ' . ', e.g. \"cat . dog .\"; each "
                              "phrase is a class. Default: the recipe's detector.prompt.")


def _trained(head: Path | None, recipe: Path | None, detector: Path | None,
             prompt: str | None = None):
    """The MaskFrozenDETR on the best device: the head checkpoint's own recipe unless one
    is given; ``--detector`` and ``--prompt`` replace the recipe's detector path and prompt."""
    import torch

    from frozenseg.head.segmenter import MaskFrozenDETR
    from frozenseg.head.trained import load_trained

    if head is None and recipe is None:
        _fail("--head CKPT is needed (or --recipe for the training-free baseline)")
    overrides = [f"detector.path={detector}"] if detector is not None else []
    if prompt is not None:  # a YAML double-quoted string: any text stays text
        overrides.append(f"detector.prompt={json.dumps(prompt)}")
    loaded = _load_recipe(recipe, overrides) if recipe is not None else None
    found, model, resolved = load_trained(head, recipe=loaded,
                                          overrides=[] if loaded else overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return MaskFrozenDETR(found, model, resolved).to(device).eval()


def _images(paths: list[Path], annotations: Path | None, scale: float):
    """The images (files, folders, or a COCO json's image table) at the evaluation view."""
    from frozenseg.data import ImageFolder
    from frozenseg.engine.data import eval_transform

    transform = eval_transform(scale)
    if annotations is not None:
        if len(paths) != 1 or not paths[0].is_dir():
            _fail("--annotations needs --images to be the one folder its file names refer to")
        return ImageFolder.from_coco(paths[0], annotations, transform=transform)
    return ImageFolder(paths, transform=transform)


def _image_progress(description: str):
    """A rich bar over images; yields update(done, total) (see _ProgressUpdate)."""

    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    @contextlib.contextmanager
    def context():
        columns = (*Progress.get_default_columns()[:2], MofNCompleteColumn(), _rate_column(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True,
                      disable=not console.is_terminal) as bar:
            yield _ProgressUpdate(bar, bar.add_task(description, total=None))

    return context()


@app.command()
@_one_line_errors("out")
def export(
    out: Path = typer.Option(..., "--out", help="The results json to write (--format onnx: "
                             "the .onnx file)."),
    head: Path = _HEAD_OPTION,
    detector: Path = _DETECTOR_OPTION,
    images: list[Path] = typer.Option(None, "--images", help="A folder of images (searched "
                                      "recursively), or image files; repeatable."),
    annotations: Path = typer.Option(None, "--annotations", help="A COCO json whose images "
                                     "(and categories) to use, under --images."),
    boxes: Path = typer.Option(None, "--boxes", help="Another detector's COCO results json: "
                               "the same entries come back with masks added."),
    score_threshold: float = typer.Option(0.0, "--score-threshold", help="Drop detections "
                                          "scoring lower (the detector's own boxes only)."),
    max_per_image: int = typer.Option(100, "--max-per-image", help="Best detections kept "
                                      "per image (the detector's own boxes only)."),
    mask_threshold: float = typer.Option(0.5, "--mask-threshold", help="On the mask "
                                         "probability."),
    png_dir: Path = typer.Option(None, "--png-dir", help="Also write an instance PNG per "
                                 "image here (pixel k = the image's k-th result)."),
    batch_size: int = typer.Option(2, "--batch-size", help="Images per head batch."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted export."),
    format: str = typer.Option("json", "--format", help="json (COCO results) or onnx "
                               "(detector + head as one ONNX graph)."),
    height: int = typer.Option(None, "--height", help="ONNX: the input height traced."),
    width: int = typer.Option(None, "--width", help="ONNX: the input width traced."),
    dynamic: bool = typer.Option(False, "--dynamic", help="ONNX: any input size."),
    recipe: Path = _RECIPE_OPTION,
    prompt: str = _PROMPT_OPTION,
) -> None:
    """Masks for a detector's predictions, or for any detector's boxes, as COCO results."""
    from frozenseg.detector.classes import classes_for
    from frozenseg.head.export import ExportSettings, export_results, read_boxes

    if format not in ("json", "onnx"):
        _fail(f"--format {format}: expected json or onnx")
    model = _trained(head, recipe, detector, prompt)
    if format == "onnx" and model.detector.prompt is not None:
        _fail("--format onnx: Grounding DINO's text side is not exported; use json")
    if format == "onnx":
        _export_onnx(model.detector, model.head, out, height, width, dynamic)
        return
    if not images:
        _fail("--images DIR is needed")
    dataset = _images(images, annotations, model.recipe.data.scale)
    classes, _ = classes_for(model.detector.classes, dataset.category_ids,
                             dataset.category_names)
    given = read_boxes(boxes, [im["id"] for im in dataset.images]) if boxes else None
    job = {"detector": str(model.recipe.detector.path), "head": str(head),
           "images": [str(p) for p in images], "annotations": str(annotations)}
    settings = ExportSettings(score_threshold, max_per_image, mask_threshold, batch_size)
    with _image_progress("Exporting") as update:
        summary = export_results(model, dataset, out, classes=classes,
                                 settings=settings, boxes=given, png_dir=png_dir,
                                 resume=resume, job=job, progress=update)
    _print_export(summary, given, png_dir)


def _print_export(summary, boxes, png_dir) -> None:
    done = f"{summary.images} images" + (f" (+{summary.resumed} before the interruption)"
                                         if summary.resumed else "")
    _say(f"{summary.results} results for {done}: {summary.path}")
    if summary.skipped:
        _warn(f"{summary.skipped} images could not be read (named above) and have no results")
    if summary.clipped:
        _warn(f"{summary.clipped} boxes of {boxes.path} reach outside their image: clipped "
              "for the head (their bbox is kept)")
    if summary.degenerate:
        _warn(f"{summary.degenerate} boxes of {boxes.path} have nothing inside their image: "
              "empty masks, mask_quality 0")
    for path in ([png_dir] if png_dir else []) + summary.files:
        _say(f"also: {path}")


def _export_onnx(detector, head, out: Path, height: int | None, width: int | None,
                 dynamic: bool) -> None:
    from frozenseg.head.onnx import export_onnx

    path = export_onnx(detector.cpu(), head.cpu(), out, height=height, width=width,
                       dynamic=dynamic)
    _say(f"ONNX graph (detector + head): {path}")


@app.command()
@_one_line_errors("out")
def predict(
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(..., "--out", help="Where overlays and json go."),
    head: Path = _HEAD_OPTION,
    detector: Path = _DETECTOR_OPTION,
    threshold: float = typer.Option(0.5, "--threshold", help="Draw instances scoring at "
                                    "least this (score = class score x predicted mask IoU)."),
    max_instances: int = typer.Option(100, "--max-instances", help="At most this many per "
                                      "image, best first."),
    min_side: int = typer.Option(480, "--min-side", help="Draw images whose shorter side is "
                                 "under this up to 4x larger (0: at their own size); the json "
                                 "keeps the image's pixels."),
    recipe: Path = _RECIPE_OPTION,
    prompt: str = _PROMPT_OPTION,
) -> None:
    """Overlay PNGs (masks, edges, boxes, labels, scores) and a json per image."""
    from frozenseg.detector.classes import classes_for
    from frozenseg.head.overlay import predict_overlays

    model = _trained(head, recipe, detector, prompt)
    dataset = _images(images, None, model.recipe.data.scale)
    classes, names = classes_for(model.detector.classes, dataset.category_ids,
                                 dataset.category_names)
    with _image_progress("Predicting") as update:
        summaries = predict_overlays(model, dataset, out, classes=classes, names=names,
                                     threshold=threshold, max_instances=max_instances,
                                     min_side=min_side, progress=update)
    console.print(_prediction_table(summaries, threshold))
    _say(f"overlays and json: {out}")


def _prediction_table(summaries, threshold: float, rows: int = 20) -> Table:
    """Instances kept per image, and why: the best score against the threshold."""
    table = Table(title=f"instances with score >= {threshold:g}")
    for column in ("image", "kept", "of", "best score"):
        table.add_column(column, justify="left" if column == "image" else "right")
    for s in summaries[:rows]:
        best = "-" if s.best is None else f"{s.best:.3f}"
        table.add_row(escape(s.file_name), str(s.kept), str(s.candidates),
                      best if s.kept or s.best is None else f"[yellow]{best}[/]")
    if len(summaries) > rows:
        table.add_row(f"... {len(summaries) - rows} more", "", "", "")
    kept = sum(s.kept for s in summaries)
    table.add_row(f"[bold]{len(summaries)} images", f"[bold]{kept}",
                  str(sum(s.candidates for s in summaries)), "")
    if any(s.kept == 0 and s.candidates for s in summaries):
        table.caption = (f"a yellow best score is below {threshold:g}: nothing drawn there "
                         "(lower --threshold to see more)")
    return table


# ------------------------------------------------------------------------ the demo


@app.command()
@_one_line_errors("out")
def demo(
    out: Path = typer.Option(Path("frozenseg-demo"), "--out", help="The demo's folder: "
                             "dataset, detector, cache, run, results, overlays."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="Steps of head training: the "
                              "figures depend on them, not on the machine (about 2.5 minutes "
                              "on 2 CPU cores; the other stages add about a minute)."),
    images: int = typer.Option(DEFAULT_IMAGES, "--images", help="Synthetic images in all, at "
                               "least 10 (20% of them are val)."),
    detector: Path = typer.Option(None, "--detector", help="A checkpoint to convert instead "
                                  "of the shipped one (any format frozenseg convert reads)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="See convert: "
                                          "--detector may run code (trusted files only)."),
) -> None:
    """The whole flow on the detector frozenseg ships: synth, convert, cache, train, export,
    evaluate, overlays. Run it again: it reuses what is done."""
    from frozenseg.demo import DETECTOR, DemoHooks, run_demo, summary_table

    hooks = DemoHooks(images=_image_progress, training=_training_progress, log=_say)
    summary = run_demo(out, steps=steps, images=images, hooks=hooks,
                       detector=detector or DETECTOR, trust=trust_checkpoint)
    console.print(summary_table(summary))
