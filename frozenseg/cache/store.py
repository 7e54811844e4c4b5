"""The on-disk format of the feature cache: shards, the index, and reading them back.

A cache folder holds::

    DIR/index.json                 written atomically (temp name, then rename)
    DIR/shard-00000.safetensors    entries [0, N): (image, view) in dataset then view order
    DIR/shard-00001.safetensors    entries [N, 2N) ...

index.json holds the recipe (detector, dataset, views, dtype ...: what a resume must
match), the projected size, ``complete``, and per shard its file, sha256, image ids
and ``entries``: the [dataset index, view index] of each stored entry (an image that
could not be read has none).

A shard concatenates its images' tensors along the first axis; ``*_offsets`` tables
say where each image starts. For a shard of n stored images (S_i memory rows, K_i
queries each, L levels, C channels)::

    memory            (sum S_i, C)  storage dtype (float32 | float16 | bfloat16 | int8)
    memory_scale      (n, C)        float32, int8 only: x = q * scale, per image and channel
    queries           (sum K_i, C)  storage dtype; queries_scale (n, C) likewise for int8
    boxes             (sum K_i, 4)  float32, normalised (cx, cy, w, h) of the image
    scores            (sum K_i,)    float32; labels (sum K_i,) int64
    memory_offsets    (n + 1,)      int64, image i's rows are [off[i], off[i+1])
    query_offsets     (n + 1,)      int64
    spatial_shapes    (n, L, 2)     int64 (H, W) per level
    level_start_index (n, L)        int64
    valid_ratios      (n, L, 2)     float32 (all ones: images run alone, unpadded)
    image_ids         (n,)          int64 COCO image ids
    image_sizes       (n, 2)        int64 (H, W) of the detector's input (the view's output)
    gt_queries        (sum M_i, C)  storage dtype: the queries of the view's M_i ground-truth
                                    boxes, in target order; gt_offsets (n + 1,) int64

and, when the cache stores the backbone's stride-4 map (``store_c1``), for maps of
P_i = h_i * w_i positions and C1 channels::

    c1                (sum P_i, C1) storage dtype, position-major; c1_scale (n, C1) for int8
    c1_offsets        (n + 1,)      int64
    c1_shapes         (n, 2)        int64 (h, w)

and, as safetensors metadata, one key ``frozenseg``: a JSON object with ``dtype`` and
``views``, the list of the n view dicts (see :mod:`frozenseg.data.transforms`), so that
the same pixels can be rebuilt later. One key, because safetensors writes several in
hash order, which would make the bytes (and sha256) of identical shards differ by run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from frozenseg.detector.output import DetectorOutput
from frozenseg.files import inside

FORMAT_VERSION = 2
INDEX_FILE = "index.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "int8": torch.int8}
# The large float tensors; the rest stays full precision.
QUANTISED = ("memory", "queries", "gt_queries")


class CacheError(ValueError):
    """The cache cannot be written or read as asked; the message is one line saying why."""


def prompt_identity(detector) -> dict:
    """{"prompt": its text} for a prompted detector; {} otherwise (caches of closed-set
    detectors keep the identity they had before prompts)."""
    prompt = getattr(detector, "prompt", None)
    return {"prompt": prompt.text} if prompt is not None else {}


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- quantisation


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R, C) float32 -> (stored (R, C), int8 scale (C,) or None).

    int8 is symmetric per channel: scale_c = max_r |x_rc| / 127, so the error of a
    value is at most scale_c / 2 (round to nearest).
    """
    if dtype != "int8":
        return x.to(DTYPES[dtype]).contiguous(), None
    scale = (x.abs().amax(0) if len(x) else x.new_zeros(x.shape[1])).clamp_min(1e-12) / 127.0
    q = (x / scale).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.float()


def decode(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored (R, C) -> float32 (R, C)."""
    return q.float() if scale is None else q.float() * scale


# ----------------------------------------------------------------------------- one image


@dataclass
class CachedImage:
    """One image of the cache, as the detector saw it alone (batch 1, no padding).

    memory (S, C), queries (K, C): float32, dequantised from the storage dtype;
    boxes (K, 4) normalised cxcywh, scores (K,), labels (K,) int64;
    spatial_shapes (L, 2), level_start_index (L,), valid_ratios (L, 2);
    image_size (2,) the detector input's (H, W); view: the dict that rebuilds that input;
    dataset_index, view_index: which image of the dataset and which of its views;
    gt_queries (M, C) float32: the queries of the view's ground-truth boxes, in the order
    of the dataset's target for that view; c1 (C1, H/4, W/4) float32 when the cache
    stores it, else None.
    """

    image_id: int
    dataset_index: int
    view_index: int
    view: dict
    image_size: torch.Tensor
    memory: torch.Tensor
    queries: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    gt_queries: torch.Tensor
    c1: torch.Tensor | None = None

    def to_output(self) -> DetectorOutput:
        """A DetectorOutput batch of one. Without a stored c1 (training recomputes the cheap
        backbone stage: FrozenDetector.stage1) c1 is an empty (1, 0, 0, 0) tensor."""
        k, s = len(self.scores), len(self.memory)
        c1 = torch.zeros(1, 0, 0, 0) if self.c1 is None else self.c1[None]
        return DetectorOutput(
            queries=self.queries[None], boxes=self.boxes[None], scores=self.scores[None],
            labels=self.labels[None], query_mask=torch.ones(1, k, dtype=torch.bool),
            memory=self.memory[None], memory_mask=torch.zeros(1, s, dtype=torch.bool),
            spatial_shapes=self.spatial_shapes, level_start_index=self.level_start_index,
            valid_ratios=self.valid_ratios[None], c1=c1, image_sizes=self.image_size[None],
        )


def pack_shard(items: list[dict], dtype: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-entry dicts (see :func:`frozenseg.cache.writer.image_record`; at least one)
    -> shard tensors and metadata, in the layout of the module docstring."""
    tensors: dict[str, torch.Tensor] = {}
    rows = {name: [item[name] for item in items] for name in QUANTISED}
    if "c1" in items[0]:  # (C1, h, w) -> (h * w, C1) rows, quantised per channel like memory
        rows["c1"] = [item["c1"].flatten(1).T for item in items]
        tensors["c1_offsets"] = _offsets([len(r) for r in rows["c1"]])
        tensors["c1_shapes"] = torch.tensor([list(item["c1"].shape[1:]) for item in items])
    for name, parts in rows.items():
        encoded = [encode(x, dtype) for x in parts]
        tensors[name] = torch.cat([q for q, _ in encoded])
        if dtype == "int8":
            tensors[f"{name}_scale"] = torch.stack([scale for _, scale in encoded])
    for name in ("boxes", "scores", "labels"):
        tensors[name] = torch.cat([item[name] for item in items])
    tensors["memory_offsets"] = _offsets([len(item["memory"]) for item in items])
    tensors["query_offsets"] = _offsets([len(item["scores"]) for item in items])
    tensors["gt_offsets"] = _offsets([len(item["gt_queries"]) for item in items])
    for name in ("spatial_shapes", "level_start_index", "valid_ratios", "image_sizes"):
        tensors[name] = torch.stack([item[name] for item in items])
    tensors["image_ids"] = torch.tensor([item["image_id"] for item in items], dtype=torch.int64)
    return {k: v.contiguous() for k, v in tensors.items()}, shard_metadata(items, dtype)


def shard_metadata(items: list[dict], dtype: str) -> dict[str, str]:
    """The safetensors metadata of a shard (see the module docstring)."""
    return {"frozenseg": json.dumps({"dtype": dtype, "views": [item["view"] for item in items]},
                                    sort_keys=True)}


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)


# ----------------------------------------------------------------------------- reading


class FeatureCache:
    """Read a cache folder: ``len(cache)`` entries (images x views, in (image, view)
    order, without the images that could not be read), ``cache[i]`` a
    :class:`CachedImage`; ``position(image, view)`` finds an entry.

    Shards are opened with safetensors' ``safe_open`` (memory-mapped): ``cache[i]``
    reads only image i's rows (``get_slice``), nothing is loaded up front. Items come
    back dequantised to float32 whatever the storage dtype. Only a complete cache
    (every shard written) can be opened.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.index = read_index(self.dir)
        if self.index is None:
            raise CacheError(f"{self.dir}: no {INDEX_FILE} (not a feature cache)")
        if not self.index.get("complete"):
            raise CacheError(f"{self.dir}: the cache is incomplete (finish it with --resume)")
        self._where = [(j, i) for j, shard in enumerate(self.index["shards"])
                       for i in range(len(shard["image_ids"]))]
        self.entries = [tuple(e) for shard in self.index["shards"] for e in shard["entries"]]
        self._position = {entry: p for p, entry in enumerate(self.entries)}
        self._open: dict[int, tuple] = {}

    def __getstate__(self) -> dict:
        """Pickles into DataLoader workers without its open files (each reopens its own)."""
        return {**self.__dict__, "_open": {}}

    @property
    def views_per_image(self) -> int:
        return self.index["recipe"]["views"]

    def position(self, dataset_index: int, view_index: int) -> int | None:
        """Where entry (image, view) is, or None when that image could not be read."""
        return self._position.get((dataset_index, view_index))

    def __len__(self) -> int:
        return len(self._where)

    @property
    def image_ids(self) -> list[int]:
        return [i for shard in self.index["shards"] for i in shard["image_ids"]]

    def verify(self) -> list[str]:
        """Names of the shards whose sha256 differs from the index's (empty: all good)."""
        return bad_shards(self.dir, self.index["shards"])

    def _shard(self, j: int):
        """Shard j, opened once per process; its sha256 is checked first (hashing is cheap
        next to the training steps the shard feeds), so a damaged shard stops training
        with its name instead of training on flipped bytes or failing deep in a read."""
        if j not in self._open:
            from safetensors import safe_open

            shard = self.index["shards"][j]
            path = inside(self.dir, shard["file"])
            check_shard(path, shard["sha256"])
            handle = safe_open(path, framework="pt")
            views = json.loads(handle.metadata()["frozenseg"])["views"]
            self._open[j] = (handle, views)
        return self._open[j]

    def __getitem__(self, index: int) -> CachedImage:
        if not -len(self) <= index < len(self):
            raise IndexError(f"cache index {index} out of range for {len(self)} images")
        j, i = self._where[index]
        f, views = self._shard(j)
        m0, m1 = (int(v) for v in f.get_slice("memory_offsets")[i : i + 2])
        q0, q1 = (int(v) for v in f.get_slice("query_offsets")[i : i + 2])
        int8 = "memory_scale" in f.keys()

        def rows(name, a, b):
            scale = f.get_slice(f"{name}_scale")[i] if int8 else None
            return decode(f.get_slice(name)[a:b], scale)

        c1 = None
        if "c1" in f.keys():
            p0, p1 = (int(v) for v in f.get_slice("c1_offsets")[i : i + 2])
            h, w = (int(v) for v in f.get_slice("c1_shapes")[i])
            c1 = rows("c1", p0, p1).T.reshape(-1, h, w)
        g0, g1 = (int(v) for v in f.get_slice("gt_offsets")[i : i + 2])
        dataset_index, view_index = self.entries[index]
        return CachedImage(
            image_id=int(f.get_slice("image_ids")[i]), dataset_index=dataset_index,
            view_index=view_index, view=views[i], c1=c1, gt_queries=rows("gt_queries", g0, g1),
            image_size=f.get_slice("image_sizes")[i], memory=rows("memory", m0, m1),
            queries=rows("queries", q0, q1), boxes=f.get_slice("boxes")[q0:q1],
            scores=f.get_slice("scores")[q0:q1], labels=f.get_slice("labels")[q0:q1],
            spatial_shapes=f.get_slice("spatial_shapes")[i],
            level_start_index=f.get_slice("level_start_index")[i],
            valid_ratios=f.get_slice("valid_ratios")[i],
        )


def read_index(out_dir: Path) -> dict | None:
    """The folder's index.json, or None when there is none."""
    path = out_dir / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: unreadable index ({err})") from err
    if index.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format version {index.get('format_version')}, "
                         f"this frozenseg reads {FORMAT_VERSION}")
    return index


def check_shard(path: Path, sha256: str) -> None:
    """Raise a one-line CacheError unless the shard at ``path`` is there with ``sha256``."""
    if not path.is_file():
        problem = "is missing"
    elif sha256_file(path) != sha256:
        problem = "is damaged (its sha256 is not the one in index.json)"
    else:
        return
    raise CacheError(f"{path}: the cache shard {problem}; rewrite it with "
                     f"frozenseg cache --resume (same arguments)")


def bad_shards(out_dir: Path, shards: list[dict]) -> list[str]:
    """Files of ``shards`` that are missing or whose sha256 is not the recorded one."""
    def ok(shard: dict) -> bool:
        path = out_dir / shard["file"]
        return path.is_file() and sha256_file(path) == shard["sha256"]

    return [s["file"] for s in shards if not ok(s)]


def verify_cache(out_dir: str | Path) -> list[str]:
    """Bad shard names of a cache folder (any state, complete or not)."""
    index = read_index(Path(out_dir))
    if index is None:
        raise CacheError(f"{out_dir}: no {INDEX_FILE} (not a feature cache)")
    return bad_shards(Path(out_dir), index["shards"])
