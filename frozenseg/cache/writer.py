"""Writing the feature cache: run the frozen detector once over a dataset.

Images are run ONE AT A TIME (batch 1), so that no padding from a batch-mate enters
the cached memory, queries or boxes: each image's features are exactly what the
detector computes for that image alone (valid_ratios are all ones).

Each shard is built in memory, saved to a temp name, hashed and renamed; only then is
it added to index.json (itself written atomically). A run killed anywhere therefore
leaves complete shards plus at most one temp file, and ``resume=True`` keeps the
shards whose sha256 verifies and continues from the first missing one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from frozenseg.cache.store import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_FILE,
    CacheError,
    atomic_write_text,
    bad_shards,
    pack_shard,
    read_index,
    sha256_file,
    shard_metadata,
    shard_name,
)
from frozenseg.data.transforms import Transform, content_size, evaluation

# Bytes per stored element of the large tensors; int8 adds a float32 scale per channel.
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
# Per query: 4 float32 box values, a float32 score and an int64 label.
_QUERY_EXTRA_BYTES = 4 * 4 + 4 + 8


def write_cache(
    detector, dataset, out_dir: str | Path, *, dtype: str = "fp16", shard_size: int = 256,
    max_gb: float | None = None, resume: bool = False, transform: Transform | None = None,
    top_k: int = 100, memory_layer: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_shard: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Cache ``detector``'s outputs on ``dataset`` into ``out_dir``; return the index dict.

    detector: a FrozenDetector (its own top_k and memory_layer are used) or the folder
    ``frozenseg convert`` wrote (loaded with ``top_k`` and ``memory_layer``).
    dataset: a :class:`frozenseg.data.CocoInstances`; its own transform is ignored: each
    image gets ``transform``'s view (default :func:`frozenseg.data.evaluation`).
    dtype: fp32 | fp16 | bf16 | int8, for memory and queries (the rest stays full).
    max_gb: refuse (CacheError, nothing written) when the projected size is larger.
    progress(done, total) once before the first image (done: images kept by a resume),
    then after each image; on_shard(j) after shard j is recorded
    (tests interrupt a run from it); log(line) for the size projection.
    Raises CacheError (one line) for a non-empty folder without ``resume``, a cache
    of another recipe, or a projection over ``max_gb``.
    """
    if dtype not in DTYPES:
        raise CacheError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise CacheError(f"shard size must be at least 1, not {shard_size}")
    detector, detector_id = _detector(detector, top_k, memory_layer)
    transform = transform or evaluation()
    out = Path(out_dir)
    recipe = _recipe(detector, detector_id, dataset, transform, dtype, shard_size)
    kept = _existing_shards(out, recipe, resume)
    views = [transform.sample_view((im["height"], im["width"])) for im in dataset.images]
    projected = _project(detector, dataset, views, dtype)
    (log or (lambda _: None))(_projection_line(projected, len(views)))
    if max_gb is not None and projected["total_bytes"] > max_gb * 1e9:
        raise CacheError(f"projected cache size {projected['total_bytes'] / 1e9:.3f} GB is over "
                         f"--max-gb {max_gb:g} ({len(views)} images)")
    out.mkdir(parents=True, exist_ok=True)
    index = {"format_version": FORMAT_VERSION, "recipe": recipe, "projected": projected,
             "complete": False, "shards": kept}
    _write_index(out, index)
    _write_shards(detector, dataset, views, out, index, dtype, shard_size, progress, on_shard)
    index["complete"] = True
    _write_index(out, index)
    return index


def _detector(detector, top_k: int, memory_layer: int | None):
    """(FrozenDetector, identity dict): a folder's config.json hash, or the weights' hash."""
    if isinstance(detector, (str, os.PathLike)):
        from frozenseg.convert import CONFIG_FILE
        from frozenseg.detector.frozen import load_detector

        folder = Path(detector)
        model = load_detector(folder, top_k=top_k, memory_layer=memory_layer)
        meta = json.loads((folder / CONFIG_FILE).read_text())
        return model, {"config_sha256": sha256_file(folder / CONFIG_FILE),
                       "source": meta.get("source", ""), "source_sha256": meta.get("sha256", "")}
    return detector, {"weights_sha256": _weights_sha256(detector)}


def _weights_sha256(detector) -> str:
    """A detector object has no config.json: its identity is the hash of its weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(detector.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _recipe(detector, detector_id: dict, dataset, transform, dtype: str, shard_size: int):
    """What makes two caches interchangeable (compared on resume)."""
    path = Path(dataset.annotations_json)
    return {
        "detector": detector_id,
        "dataset": {"annotations": str(path.resolve()), "sha256": sha256_file(path),
                    "images": len(dataset)},
        "view": repr(transform), "dtype": dtype, "memory_layer": detector.memory_layer,
        "top_k": detector.top_k, "shard_size": shard_size,
    }


def _existing_shards(out: Path, recipe: dict, resume: bool) -> list[dict]:
    """The shards a run keeps: none for a fresh folder; on resume, the leading ones that
    verify (later ones, and temp files, are deleted)."""
    if not out.exists() or not any(out.iterdir()):
        return []
    if not resume:
        raise CacheError(f"{out} is not empty; pass --resume to continue a cache there, "
                         "or choose another folder")
    index = read_index(out)
    if index is None:
        raise CacheError(f"{out} is not empty and holds no {INDEX_FILE}: not a cache to resume")
    if index["recipe"] != recipe:
        raise CacheError(f"{out} holds a cache of another recipe: it has "
                         f"{_identity(index['recipe'])}; this run is {_identity(recipe)}")
    shards = index["shards"]
    bad = set(bad_shards(out, shards))
    kept = shards[: next((j for j, s in enumerate(shards) if s["file"] in bad), len(shards))]
    _remove_unkept(out, {s["file"] for s in kept})
    return kept


def _identity(recipe: dict) -> str:
    """One line naming a recipe's detector, dataset and storage."""
    det = recipe["detector"]
    who = (f"detector {det.get('source') or '?'} (config sha256 {det['config_sha256'][:12]})"
           if "config_sha256" in det else f"detector weights sha256 {det['weights_sha256'][:12]}")
    data = recipe["dataset"]
    return (f"{who}, dataset {data['annotations']} (sha256 {data['sha256'][:12]}), "
            f"dtype {recipe['dtype']}, memory layer {recipe['memory_layer']}, "
            f"top-k {recipe['top_k']}, shard size {recipe['shard_size']}, view {recipe['view']}")


def _remove_unkept(out: Path, kept: set[str]) -> None:
    """Delete temp files and shards not in ``kept`` (they are rewritten)."""
    for path in out.iterdir():
        is_temp = path.name.startswith(".") and ".tmp" in path.name
        is_shard = path.name.startswith("shard-") and path.name not in kept
        if path.is_file() and (is_temp or is_shard):
            path.unlink()


# ----------------------------------------------------------------------------- running


def image_record(detector, dataset, index: int, view: dict) -> dict | None:
    """Image ``index`` under ``view``, run alone -> the per-image tensors a shard stores
    (float32), or None when the dataset cannot read the image (it has warned)."""
    loaded = dataset.get_view(index, view)
    if loaded is None:
        return None
    image, target = loaded
    out = detector([image])
    return {
        "memory": out.memory[0].float(), "queries": out.queries[0].float(),
        "boxes": out.boxes[0].float(), "scores": out.scores[0].float(),
        "labels": out.labels[0].long(), "spatial_shapes": out.spatial_shapes.long(),
        "level_start_index": out.level_start_index.long(),
        "valid_ratios": out.valid_ratios[0].float(), "image_sizes": out.image_sizes[0].long(),
        "image_id": int(target["image_id"]), "view": view,
    }


def _write_shards(detector, dataset, views, out, index, dtype, shard_size, progress, on_shard):
    total = len(views)
    if progress:  # first call: the images kept from an earlier run (0 for a fresh cache)
        progress(min(total, len(index["shards"]) * shard_size), total)
    for j in range(len(index["shards"]), -(-total // shard_size)):
        start, stop = j * shard_size, min(total, (j + 1) * shard_size)
        items = []
        for i in range(start, stop):
            record = image_record(detector, dataset, i, views[i])
            if record is not None:
                items.append(record)
            if progress:
                progress(i + 1, total)
        index["shards"].append(_save_shard(out, j, items, dtype, (start, stop)))
        _write_index(out, index)
        if on_shard:
            on_shard(j)


def _save_shard(out: Path, j: int, items: list[dict], dtype: str, span: tuple[int, int]):
    """Save to a temp name, hash, rename; return the index entry."""
    from safetensors.torch import save_file

    tensors, meta = pack_shard(items, dtype) if items else ({}, shard_metadata([], dtype))
    final = out / shard_name(j)
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        digest = sha256_file(tmp)
        os.replace(tmp, final)
    finally:  # an interrupted save leaves no temp file (a hard kill may: resume removes it)
        tmp.unlink(missing_ok=True)
    return {"file": final.name, "sha256": digest, "dataset_indices": list(span),
            "image_ids": [item["image_id"] for item in items]}


def _write_index(out: Path, index: dict) -> None:
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")


# ----------------------------------------------------------------------------- size


def _project(detector, dataset, views: list[dict], dtype: str) -> dict:
    """Projected bytes: the first readable image is run; other images' memory rows scale
    with their input area (the encoder's levels are fixed strides of the input)."""
    for i, view in enumerate(views):
        record = image_record(detector, dataset, i, view)
        if record is not None:
            break
    else:
        raise CacheError(f"{dataset.annotations_json}: no image could be read")
    rows, channels = record["memory"].shape
    k = len(record["scores"])
    area0 = _area(views[i])
    element = _ELEMENT_BYTES[dtype]
    scale_bytes = 2 * channels * 4 if dtype == "int8" else 0  # memory + queries scales

    def size(view):
        s = round(rows * _area(view) / area0)
        return s * channels * element + k * (channels * element + _QUERY_EXTRA_BYTES) + scale_bytes

    first = size(views[i])
    return {"first_image_bytes": first, "total_bytes": sum(size(v) for v in views)}


def _area(view: dict) -> int:
    h, w = content_size(view)
    return h * w


def _projection_line(projected: dict, images: int) -> str:
    return (f"projected size: {projected['first_image_bytes'] / 1e6:.2f} MB per image (first "
            f"image), {projected['total_bytes'] / 1e9:.3f} GB for {images} images")
