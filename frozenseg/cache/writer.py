"""Writing the feature cache: run the frozen detector once over a dataset.

Images are run ONE AT A TIME (batch 1), so that no padding from a batch-mate enters
the cached memory, queries or boxes: each image's features are exactly what the
detector computes for that image alone (valid_ratios are all ones).

Each shard is built in memory, saved to a temp name, hashed and renamed; only then is
it added to index.json (itself written atomically). A run killed anywhere therefore
leaves complete shards plus at most one temp file, and ``resume=True`` keeps the
shards whose sha256 verifies and writes the others.

Views. The cache holds ``views`` entries per image: view k of image i is sampled from
``transform`` with ``random.Random(f"{seed}:{i}:{k}")``, so the same arguments give
the same views on any machine, in any process. One evaluation view by default; with
``views > 1`` the default transform is :func:`frozenseg.data.transforms.scale_flip`.
Entries are stored in (image, view) order; ``shard_size`` counts entries.

Several processes (``accelerate launch frozenseg cache ...``): shard j is written by
process j mod P. Each process records its shards in ``index.part-<rank>.json``; when
all are done, process 0 merges them into the one index.json and marks it complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch

from frozenseg.cache.store import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_FILE,
    CacheError,
    bad_shards,
    pack_shard,
    prompt_identity,
    read_index,
    sha256_file,
    shard_metadata,
    shard_name,
)
from frozenseg.data.transforms import Transform, content_size, evaluation, scale_flip
from frozenseg.detector.classes import ClassMapping, match_classes
from frozenseg.files import LOCK_FILE, atomic_write_text, folder_lock, unshared

# A process's record of its shards while several processes write one cache.
_PART = re.compile(r"index\.part-\d+\.json$")
# Bytes per stored element of the large tensors; int8 adds a float32 scale per channel.
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
# Per query: 4 float32 box values, a float32 score and an int64 label.
_QUERY_EXTRA_BYTES = 4 * 4 + 4 + 8


def recipe_cache_job(recipe) -> dict:
    """``write_cache``'s arguments for what a recipe trains on: its train split, through
    its detector (top-K, memory layer, prompt), in ``data.views`` views at ``data.scale``, into
    ``data.cache`` (with C1 if ``data.store_c1``). ``frozenseg cache RECIPE`` and the demo both
    write this."""
    from frozenseg.data.coco import CocoInstances
    from frozenseg.engine.data import cache_views

    if not recipe.data.cache:
        raise CacheError("data.cache is null: name the cache folder to write (data.cache=DIR)")
    split = recipe.data.train
    return {"detector": recipe.detector.path, "out_dir": recipe.data.cache,
            "dataset": CocoInstances(split.images, split.annotations),
            "transform": cache_views(recipe.data.views, recipe.data.scale),
            "views": recipe.data.views, "seed": recipe.train.seed,
            "top_k": recipe.detector.top_k, "memory_layer": recipe.detector.memory_layer,
            "prompt": recipe.detector.prompt, "store_c1": recipe.data.store_c1}


def write_cache(
    detector, dataset, out_dir: str | Path, *, dtype: str = "fp16", shard_size: int = 256,
    max_gb: float | None = None, resume: bool = False, transform: Transform | None = None,
    views: int = 1, seed: int = 0, store_c1: bool = False, top_k: int = 100,
    memory_layer: int | None = None, prompt: str | None = None,
    device: str | torch.device | None = None, state=None,
    progress: Callable[[int, int], None] | None = None,
    on_shard: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Cache ``detector``'s outputs on ``dataset`` into ``out_dir``; return the index dict.

    detector: a FrozenDetector (its own top_k, memory_layer and prompt are used) or the folder
    ``frozenseg convert`` wrote (loaded with ``top_k``, ``memory_layer`` and, for an
    open-vocabulary detector, ``prompt``). The prompt is part of the cache's identity.
    dataset: a :class:`frozenseg.data.CocoInstances`; its own transform is ignored: each
    entry gets a view sampled from ``transform`` (module docstring).
    dtype: fp32 | fp16 | bf16 | int8, for memory, queries and c1 (the rest stays full).
    store_c1: also store the backbone's stride-4 map (large; for small datasets).
    max_gb: refuse (CacheError, nothing written) when the projected size is larger.
    device: where the detector runs; state: an ``accelerate.PartialState`` (or anything
    with process_index, num_processes, wait_for_everyone) to split the work.
    progress(done, total) once before the first entry (done: entries a resume kept),
    then after each entry of this process; on_shard(j) after shard j is recorded
    (tests interrupt a run from it); log(line) for the size projection.
    Raises CacheError (one line) for a non-empty folder without ``resume``, a cache
    of another recipe, or a projection over ``max_gb``.
    """
    _check_arguments(dtype, shard_size, views)
    state = state or _SingleProcess()
    detector, detector_id = _detector(detector, top_k, memory_layer, prompt)
    if device is not None:
        detector = detector.to(device)
    transform = transform or (evaluation() if views == 1 else scale_flip())
    out = Path(out_dir)
    recipe = _recipe(detector, detector_id, dataset, transform, dtype, shard_size, views, seed,
                     store_c1)
    _check_folder(out, recipe, resume)
    state.wait_for_everyone()  # every process has looked before process 0 writes
    entries = _entries(dataset, transform, views, seed)
    classes = match_classes(detector.classes, dataset.category_ids, dataset.category_names)
    projected = _project(detector, dataset, classes, entries, dtype, store_c1)
    if state.process_index == 0:
        (log or (lambda _: None))(_projection_line(projected, len(dataset), len(entries)))
    if max_gb is not None and projected["total_bytes"] > max_gb * 1e9:
        raise CacheError(f"projected cache size {projected['total_bytes'] / 1e9:.3f} GB is over "
                         f"--max-gb {max_gb:g} ({len(entries)} entries)")
    # Process 0 holds the folder while writing: a second cache process on it refuses
    # (FolderInUse) instead of doing all the work again beside it.
    with folder_lock(out) if state.process_index == 0 else contextlib.nullcontext():
        if state.process_index == 0:
            out.mkdir(parents=True, exist_ok=True)
            kept = _kept_shards(out)
            _write_index(out, {"format_version": FORMAT_VERSION, "recipe": recipe,
                               "projected": projected, "complete": False, "shards": kept})
            # only once the index no longer needs them:
            _remove_unkept(out, {s["file"] for s in kept})
        state.wait_for_everyone()
        writer = _ShardWriter(detector, dataset, classes, entries, out, dtype, shard_size,
                              store_c1, state)
        writer.run(progress, on_shard)
        state.wait_for_everyone()
        if state.process_index == 0:
            index = {**_merge_parts(out, read_index(out)), "complete": True}
            _write_index(out, index)
            _remove_unkept(out, {s["file"] for s in index["shards"]})  # the parts, now merged
        state.wait_for_everyone()
        return read_index(out)


class _SingleProcess:
    process_index, num_processes = 0, 1

    def wait_for_everyone(self) -> None:
        pass


def _check_arguments(dtype: str, shard_size: int, views: int) -> None:
    if dtype not in DTYPES:
        raise CacheError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise CacheError(f"shard size must be at least 1, not {shard_size}")
    if views < 1:
        raise CacheError(f"views must be at least 1, not {views}")


def _entries(dataset, transform: Transform, views: int, seed: int) -> list[tuple[int, int, dict]]:
    """(dataset index, view index, view) for every entry, in storage order."""
    return [(i, k, transform.sample_view((im["height"], im["width"]),
                                         random.Random(f"{seed}:{i}:{k}")))
            for i, im in enumerate(dataset.images) for k in range(views)]


def _detector(detector, top_k: int, memory_layer: int | None, prompt: str | None):
    """(FrozenDetector, identity dict): a folder's config.json hash, or the weights' hash,
    and the prompt of an open-vocabulary detector."""
    if isinstance(detector, (str, os.PathLike)):
        from frozenseg.detector.folder import config_path, read_meta
        from frozenseg.detector.frozen import load_detector

        model = load_detector(detector, top_k=top_k, memory_layer=memory_layer)
        if prompt is not None:
            model.set_prompt(prompt)
        meta = read_meta(detector)
        return model, {"config_sha256": sha256_file(config_path(detector)),
                       "source": meta.get("source", ""), "source_sha256": meta.get("sha256", ""),
                       **prompt_identity(model)}
    return detector, {"weights_sha256": _weights_sha256(detector), **prompt_identity(detector)}


def _weights_sha256(detector) -> str:
    """A detector object has no config.json: its identity is the hash of its weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(detector.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _recipe(detector, detector_id: dict, dataset, transform, dtype: str, shard_size: int,
            views: int, seed: int, store_c1: bool) -> dict:
    """What makes two caches interchangeable (compared on resume)."""
    path = Path(dataset.annotations_json)
    return {
        "detector": detector_id,
        "dataset": {"annotations": str(path.resolve()), "sha256": sha256_file(path),
                    "images": len(dataset)},
        "view": repr(transform), "dtype": dtype, "memory_layer": detector.memory_layer,
        "top_k": detector.top_k, "shard_size": shard_size, "views": views, "seed": seed,
        "store_c1": store_c1,
    }


def _check_folder(out: Path, recipe: dict, resume: bool) -> None:
    """Refuse a non-empty folder without resume, or one holding another recipe's cache."""
    if not out.exists() or not any(p.name != LOCK_FILE for p in out.iterdir()):
        return
    if not resume:
        raise CacheError(f"{out} is not empty; pass --resume to continue a cache there, "
                         "or choose another folder")
    index = read_index(out)
    if index is None:
        raise CacheError(f"{out} is not empty and holds no {INDEX_FILE}: not a cache to resume")
    if index["recipe"] != recipe:
        raise CacheError(f"{out} holds a cache of another recipe: it has "
                         f"{_identity(index['recipe'])}; this run is {_identity(recipe)}")


def _kept_shards(out: Path) -> list[dict]:
    """The recorded shards (index and process parts) whose sha256 verifies."""
    index = read_index(out)
    shards = _merge_parts(out, index)["shards"] if index else []
    bad = set(bad_shards(out, shards))
    return [s for s in shards if s["file"] not in bad]


def _identity(recipe: dict) -> str:
    """One line naming a recipe's detector, dataset and storage."""
    det = recipe["detector"]
    who = (f"detector {det.get('source') or '?'} (config sha256 {det['config_sha256'][:12]})"
           if "config_sha256" in det else f"detector weights sha256 {det['weights_sha256'][:12]}")
    who += f", prompt {det['prompt']!r}" if "prompt" in det else ""
    data = recipe["dataset"]
    return (f"{who}, dataset {data['annotations']} (sha256 {data['sha256'][:12]}), "
            f"dtype {recipe['dtype']}, memory layer {recipe['memory_layer']}, "
            f"top-k {recipe['top_k']}, shard size {recipe['shard_size']}, view {recipe['view']}")


def _remove_unkept(out: Path, kept: set[str]) -> None:
    """Delete temp files, process parts, and shards not in ``kept`` (they are rewritten)."""
    for path in out.iterdir():
        is_temp = path.name.startswith(".") and ".tmp" in path.name
        is_shard = path.name.startswith("shard-") and path.name not in kept
        if path.is_file() and (is_temp or is_shard or _PART.match(path.name)):
            path.unlink()


# ----------------------------------------------------------------------------- running


def image_record(detector, dataset, classes: ClassMapping, index: int, view: dict,
                 store_c1: bool = False) -> dict | None:
    """Image ``index`` under ``view``, run alone -> the per-entry tensors a shard stores
    (float32, on the CPU), or None when the dataset cannot read the image (it has warned).

    Besides the detections, the queries of the view's ground-truth boxes (with their
    labels as the detector's classes, ``classes``; FrozenDetector.detect_and_embed) are
    kept: training can add them as proposals, which needs the decoder, so it cannot be
    done from the cache later.
    """
    loaded = dataset.get_view(index, view)
    if loaded is None:
        return None
    image, target = loaded
    labels = classes.detector_labels(target["labels"], dataset.category_ids)
    out, gt = detector.detect_and_embed([image], [target["boxes"]],
                                        None if labels is None else [labels])
    record = {
        "memory": out.memory[0].float(), "queries": out.queries[0].float(),
        "boxes": out.boxes[0].float(), "scores": out.scores[0].float(),
        "labels": out.labels[0].long(), "spatial_shapes": out.spatial_shapes.long(),
        "level_start_index": out.level_start_index.long(),
        "valid_ratios": out.valid_ratios[0].float(), "image_sizes": out.image_sizes[0].long(),
        "gt_queries": gt.queries[0].float(),
    }
    if store_c1:
        record["c1"] = out.c1[0].float()
    record = {name: tensor.cpu() for name, tensor in record.items()}
    return {**record, "image_id": int(target["image_id"]), "view": view}


class _ShardWriter:
    """Writes this process's missing shards (j mod P == rank) and records each one."""

    def __init__(self, detector, dataset, classes, entries, out, dtype, shard_size, store_c1,
                 state):
        self.detector, self.dataset, self.classes = detector, dataset, classes
        self.entries, self.out = entries, out
        self.dtype, self.shard_size, self.store_c1, self.state = dtype, shard_size, store_c1, state
        done = {s["file"] for s in read_index(out)["shards"]}
        shards = range(-(-len(entries) // shard_size))
        mine = [j for j in shards if j % state.num_processes == state.process_index]
        self.todo = [j for j in mine if shard_name(j) not in done]
        self.total = sum(len(self._span(j)) for j in mine)
        self.records: list[dict] = []

    def _span(self, j: int) -> range:
        return range(j * self.shard_size, min(len(self.entries), (j + 1) * self.shard_size))

    def run(self, progress, on_shard) -> None:
        done = self.total - sum(len(self._span(j)) for j in self.todo)
        if progress:  # first call: the entries kept from an earlier run (0 for a fresh cache)
            progress(done, self.total)
        for j in self.todo:
            items = []
            for e in self._span(j):
                i, k, view = self.entries[e]
                record = image_record(self.detector, self.dataset, self.classes, i, view,
                                      self.store_c1)
                if record is not None:
                    items.append({**record, "entry": [i, k]})
                done += 1
                if progress:
                    progress(done, self.total)
            self._record(_save_shard(self.out, j, items, self.dtype))
            if on_shard:
                on_shard(j)

    def _record(self, shard: dict) -> None:
        """One process: straight into index.json. Several: into this process's part."""
        if self.state.num_processes == 1:
            index = read_index(self.out)
            index["shards"] = _sorted(index["shards"] + [shard])
            _write_index(self.out, index)
            return
        self.records.append(shard)
        atomic_write_text(self.out / f"index.part-{self.state.process_index}.json",
                          json.dumps(self.records, indent=1) + "\n")


def _merge_parts(out: Path, index: dict) -> dict:
    """The index with every process part's shards added. The part files stay: the caller
    removes them once it has written the merged index."""
    shards = list(index["shards"])
    for part in sorted(p for p in out.iterdir() if _PART.match(p.name)):
        shards += json.loads(part.read_text())
    return {**index, "shards": _sorted(shards)}


def _sorted(shards: list[dict]) -> list[dict]:
    """Shard records in shard order, each once."""
    return sorted({s["file"]: s for s in shards}.values(), key=lambda s: s["file"])


def _save_shard(out: Path, j: int, items: list[dict], dtype: str) -> dict:
    """Save to a temp name, hash, rename; return the index entry."""
    from safetensors.torch import save_file

    tensors, meta = pack_shard(items, dtype) if items else ({}, shard_metadata([], dtype))
    final = out / shard_name(j)
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    try:
        save_file(unshared(tensors), tmp, metadata=meta)
        digest = sha256_file(tmp)
        os.replace(tmp, final)
    finally:  # an interrupted save leaves no temp file (a hard kill may: resume removes it)
        tmp.unlink(missing_ok=True)
    return {"file": final.name, "sha256": digest,
            "image_ids": [item["image_id"] for item in items],
            "entries": [item["entry"] for item in items]}


def _write_index(out: Path, index: dict) -> None:
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")


# ----------------------------------------------------------------------------- size


def _project(detector, dataset, classes, entries: list, dtype: str, store_c1: bool) -> dict:
    """Projected bytes: the first readable entry is run; other entries' rows scale with
    their input area (the encoder's levels and c1 are fixed strides of the input)."""
    for i, _, view in entries:
        record = image_record(detector, dataset, classes, i, view, store_c1)
        if record is not None:
            break
    else:
        raise CacheError(f"{dataset.annotations_json}: no image could be read")
    element = _ELEMENT_BYTES[dtype]
    area0 = _area(view)
    k, channels = record["queries"].shape
    maps = [record["memory"]] + ([record["c1"].flatten(1).T] if store_c1 else [])
    quantised = 2 + len(maps)  # int8 stores a float32 scale per channel of each
    fixed = k * (channels * element + _QUERY_EXTRA_BYTES) + record["gt_queries"].numel() * element
    fixed += quantised * channels * 4 if dtype == "int8" else 0

    def size(view: dict) -> int:
        scale = _area(view) / area0
        return fixed + sum(round(len(m) * scale) * m.shape[1] * element for m in maps)

    return {"first_image_bytes": size(view),
            "total_bytes": sum(size(view) for _, _, view in entries)}


def _area(view: dict) -> int:
    h, w = content_size(view)
    return h * w


def _projection_line(projected: dict, images: int, entries: int) -> str:
    views = f" x {entries // max(images, 1)} views" if entries != images else ""
    return (f"projected size: {projected['first_image_bytes'] / 1e6:.2f} MB per image (first "
            f"image), {projected['total_bytes'] / 1e9:.3f} GB for {images} images{views}")
