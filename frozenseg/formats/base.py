"""What a checkpoint format module provides, and the renaming machinery they share.

A format recognises a state dict by its keys, derives a :class:`DetectorConfig`
from tensor shapes (and the training arguments saved with it), and renames keys
to the canonical layout of :class:`frozenseg.detector.model.DeformableDETR`.
Converters are pure: state dict in, state dict out, with a record of every change.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from frozenseg.detector.config import DetectorConfig

StateDict = dict[str, torch.Tensor]


@dataclass
class Renamed:
    """A converted state dict and what happened to every source key."""

    state_dict: StateDict = field(default_factory=dict)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (source, canonical)
    kept: list[str] = field(default_factory=list)  # already canonical
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source, why)
    derived: list[tuple[str, str]] = field(default_factory=list)  # (canonical, how)

    def put(self, source: str, target: str, tensor: torch.Tensor) -> None:
        self.state_dict[target] = tensor
        if source == target:
            self.kept.append(source)
        else:
            self.renamed.append((source, target))


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    description: str
    # Key patterns (regular expressions) that every checkpoint of the format has.
    signature: tuple[str, ...]
    derive_config: Callable[[StateDict, dict], tuple[DetectorConfig, list[str]]]
    rename: Callable[[StateDict, DetectorConfig], Renamed]
    # Extra test beyond the signature, for formats whose signatures overlap.
    refine_match: Callable[[StateDict], bool] = lambda sd: True

    def missing_signature(self, state_dict: StateDict) -> list[str]:
        return [p for p in self.signature if not any(re.match(p, k) for k in state_dict)]

    def matches(self, state_dict: StateDict) -> bool:
        return not self.missing_signature(state_dict) and self.refine_match(state_dict)


Rule = tuple[str, "str | Callable[[re.Match], str]"]


def apply_rules(source: StateDict, rules: list[Rule], out: Renamed) -> list[str]:
    """Rename keys by the first matching (regex, replacement) rule; keep unmatched keys.

    A replacement is a ``re.sub`` template or a function of the match.

    Returns the source keys no rule matched (they are copied under their own name).
    """
    unmatched = []
    for key, tensor in source.items():
        new = rename_key(key, rules)
        if new is None:
            unmatched.append(key)
        out.put(key, key if new is None else new, tensor)
    return unmatched


def rename_key(key: str, rules: list[Rule]) -> str | None:
    """``key`` renamed by the first (regex, replacement) rule that matches it; None if none
    does."""
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return None


# (translated keys, their originals, the originals dropped with why[, the keys it made])
Translation = Callable[[StateDict], tuple]


def read_through(inner: CheckpointFormat, *, name: str, description: str,
                 signature: tuple[str, ...], translate: Translation,
                 settings: Callable[[dict], tuple[dict, list[str]]],
                 config_name: str,
                 fields: Callable[[dict], dict] | None = None) -> CheckpointFormat:
    """A format whose keys are translated into ``inner``'s (an official layout into
    transformers' names), so that both share one converter.

    ``translate(state_dict)`` gives (the translated keys, each translated key's original,
    the originals left out with why), and optionally {translated key: how it was made} for
    keys the original layout does not save (a layer scale of one it has no module for);
    ``settings(args)`` gives (the training config in
    ``inner``'s terms, notes). The record of the rename is told in the original keys, and
    ``inner``'s notes name ``config_name`` where they say config.json. ``fields(args)``,
    where given, are config fields the original settings say and ``inner``'s do not (DEIM's
    head activations), passed to ``inner.derive_config``."""
    def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
        inner_args, notes = settings(args)
        extra = fields(args) if fields else {}
        config, more = inner.derive_config(translate(state_dict)[0], inner_args, **extra)
        return config, notes + [n.replace("config.json ", f"{config_name} ") for n in more]

    def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
        translated, source, dropped, *made = translate(state_dict)
        return _told_in_source_names(inner.rename(translated, config), source, dropped,
                                     made[0] if made else {})

    return CheckpointFormat(name=name, description=description, signature=signature,
                            derive_config=derive_config, rename=rename)


def _told_in_source_names(inner: Renamed, source: dict[str, str],
                          dropped: list[tuple[str, str]], made: dict[str, str]) -> Renamed:
    """``inner``'s record in the original keys; several translated keys from one original
    (a stacked projection split) are reported once; the keys the translation ``made``
    are derived."""
    out = Renamed(state_dict=inner.state_dict, derived=list(inner.derived),
                  dropped=list(dropped))
    seen: set[tuple[str, str]] = set()
    for old, new in [*inner.renamed, *((k, k) for k in inner.kept)]:
        pair = (source.get(old, old), new)
        if old in made:
            out.derived.append((new, made[old]))
        elif pair not in seen:
            seen.add(pair)
            out.renamed.append(pair)
    out.dropped += [(source.get(k, k), why) for k, why in inner.dropped]
    return out


def substitute_keys(state_dict: StateDict, substitutions: list[tuple[str, str]]) -> StateDict:
    """Every key with every (regex, template) substitution applied, in order: one naming
    of a project's keys mapped onto another (e.g. transformers' old and new names)."""
    out = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in substitutions:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out


def saved_or_assumed(args: dict, name: str, default, notes: list[str], what: str):
    """``args[name]``, or ``default`` with a note saying what was assumed."""
    if name in args:
        return args[name]
    notes.append(f"{what}: args.{name} not saved, assumed {default}")
    return default


def positive(name: str, value, kind: type = int):
    """A training argument that must be a positive ``kind`` (int: a whole number), as
    that kind; ValueError naming the argument otherwise (a config of wrong types)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0 and (kind is not int
                                                                or value == int(value))):
        what = "a positive integer" if kind is int else "a positive number"
        raise ValueError(f"the training config's {name} is {value!r}: expected {what}")
    return kind(value)


def refuse_unsupported(family: str, checks: list[tuple[dict, dict, str]]) -> None:
    """ValueError in one line for the first setting outside what frozenseg reproduces.
    checks: (supported {name: accepted values}, the saved settings, what they are)."""
    for table, settings, what in checks:
        for name, accepted in table.items():
            if name in settings and settings[name] not in accepted:
                raise ValueError(f"{family} with {what} {name}={settings[name]!r} is not "
                                 f"supported (supported: {', '.join(map(repr, accepted))})")


class Opaque:
    """An expression of a Python config that is not plain data (a name, arithmetic)."""


def _literal(node: ast.AST):
    """Plain data of a config expression: literals, lists, tuples, dicts and ``dict(...)``
    calls; anything else is an :class:`Opaque` (nothing is evaluated)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        return -value if isinstance(value, (int, float)) else Opaque()
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "dict" and not node.args):
        return {k.arg: _literal(k.value) for k in node.keywords if k.arg is not None}
    return Opaque()


def python_config(text: str) -> dict:
    """The top-level assignments of a Python config (mmengine's dumps, Grounding DINO's
    ``GroundingDINO_SwinT_OGC.py``) that are plain data, read with ``ast``: nothing in the
    text is run. Nested values that are not data are :class:`Opaque`. SyntaxError (or
    ValueError) when the text is not Python."""
    settings = {target.id: _literal(stmt.value) for stmt in ast.parse(text).body
                if isinstance(stmt, ast.Assign)
                for target in stmt.targets if isinstance(target, ast.Name)}
    return {name: value for name, value in settings.items() if not isinstance(value, Opaque)}


def count_indexed(state_dict: StateDict, prefix: str) -> int:
    """How many ``prefix{i}.`` blocks exist (1 + the largest i), 0 if none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def backbone_levels(state_dict: StateDict, input_proj: str, stage_channels: list[int]):
    """Which backbone stages the 1x1 input projections read (the last ones), and how many
    levels in all."""
    levels = count_indexed(state_dict, input_proj)
    from_backbone = [
        state_dict[f"{input_proj}{i}.0.weight"].shape[1] for i in range(levels)
        if state_dict[f"{input_proj}{i}.0.weight"].shape[-1] == 1
    ]
    n = len(from_backbone)
    stages = tuple(range(len(stage_channels) - n, len(stage_channels)))
    expected = [stage_channels[s] for s in stages]
    if from_backbone != expected:
        raise ValueError(
            f"input projections read {from_backbone} channels, but backbone stages {stages} "
            f"give {expected}"
        )
    return stages, levels


def sampling_points(state_dict: StateDict, heads: int, levels: int) -> dict[str, int]:
    """enc_n_points and dec_n_points from the canonical attention-weight rows.

    Rows are heads x levels x points, so shapes alone cannot tell heads from points:
    ``heads`` must come from the training arguments (or an assumption noted as such).
    """
    rows = {
        "enc_n_points": "transformer.encoder.layers.0.self_attn.attention_weights.weight",
        "dec_n_points": "transformer.decoder.layers.0.cross_attn.attention_weights.weight",
    }
    return {name: points_per_head(state_dict, key, heads, levels) for name, key in rows.items()}


def points_per_head(state_dict: StateDict, key: str, heads: int, levels: int) -> int:
    """Sampling points per head and level, from an attention-weight tensor of heads x
    levels x points rows; ValueError naming ``key`` when the rows do not divide."""
    points, rest = divmod(state_dict[key].shape[0], heads * levels)
    if rest:
        raise ValueError(f"{key} has {state_dict[key].shape[0]} rows, not a multiple of "
                         f"{heads} heads x {levels} levels")
    return points


def level_points(state_dict: StateDict, key: str, scales: re.Pattern, heads: int, levels: int,
                 saved: int | list[int] | None = None) -> int | tuple[int, ...]:
    """Sampling points per level of a D-FINE (or RT-DETR v2) attention whose weight tensor
    ``key`` has heads x sum(points) rows: one count (an int) where every level has the same,
    else one per level (a tuple). The counts are read from the saved sampling scales (keys
    matching ``scales``: 1 / n for each of a level's n points, every layer alike), else from
    ``saved`` (the config's count or list), else the rows split evenly; the config, where
    saved, must agree with the scales."""
    total = points_per_head(state_dict, key, heads, 1)
    tensors = [(k, state_dict[k].float()) for k in state_dict if scales.match(k)]
    given = None if saved is None else [saved] * levels if isinstance(saved, int) else list(
        saved)
    counts = _counts_from_scale(*tensors[0]) if tensors else given or [total // levels] * levels
    for other, scale in tensors[1:]:
        if not torch.equal(scale, tensors[0][1]):
            raise ValueError(f"{other} differs from {tensors[0][0]}: the layers sample "
                             "different point counts, which is not supported")
    if len(counts) != levels or sum(counts) != total or given not in (None, counts):
        raise ValueError(f"{key} has {total} points per head, the config {saved!r}: not "
                         f"{levels} levels of {counts} points")
    return counts[0] if len(set(counts)) == 1 else tuple(counts)


def _counts_from_scale(key: str, scale: torch.Tensor) -> list[int]:
    """[n_1, n_2, ...] from a sampling-scale vector of n_1 values 1 / n_1, then n_2 of 1 / n_2..."""
    counts, start = [], 0
    while start < len(scale):
        n = round(1.0 / float(scale[start])) if scale[start] > 0 else 0
        block = scale[start:start + n]
        if n < 1 or len(block) != n or not torch.allclose(block, torch.full((n,), 1.0 / n)):
            raise ValueError(f"{key} is not 1 / n for each of a level's n points")
        counts.append(n)
        start += n
    return counts


def pad_level_points(tensor: torch.Tensor, heads: int, counts: tuple[int, ...],
                     coords: int = 1) -> torch.Tensor:
    """A checkpoint's per-level points -> :class:`frozenseg.ops.MSDeformAttn`'s padded
    layout. Rows heads x sum(counts) x coords (each head's points level after level, x and
    y for ``coords=2``) become heads x levels x max(counts) x coords, the padded points'
    rows zero (the attention masks them out)."""
    rest = tensor.shape[1:]
    rows = tensor.reshape(heads, sum(counts), coords, *rest)
    out = tensor.new_zeros(heads, len(counts), max(counts), coords, *rest)
    for level, part in enumerate(rows.split(list(counts), dim=1)):
        out[:, level, : counts[level]] = part
    return out.reshape(-1, *rest)


# The decoder cross-attention's rows per sampling point (canonical names): x, y offsets; weights.
POINT_ROWS = re.compile(
    r"^transformer\.decoder\.layers\.\d+\.cross_attn\.(sampling_offsets|attention_weights)\.")


def pad_decoder_points(out: Renamed, config: DetectorConfig) -> None:
    """Per-level point counts (``config.dec_n_points`` a tuple): each decoder
    cross-attention's heads x sum(points) rows scattered, in place, into the attention's
    heads x levels x max(points) layout, each recorded in ``out.derived``. One count on
    every level is the layout already: nothing to do."""
    counts = config.dec_n_points
    if not isinstance(counts, tuple):
        return
    sd = out.state_dict
    for key in [k for k in sd if POINT_ROWS.match(k)]:
        coords = 2 if POINT_ROWS.match(key)[1] == "sampling_offsets" else 1
        sd[key] = pad_level_points(sd[key], config.nheads, counts, coords)
        out.derived.append((key, f"points {list(counts)} per level padded to {max(counts)}, "
                                  "the padding's rows zero"))


def merge_qkv(out: Renamed, pattern: re.Pattern, names: tuple[str, str, str],
              target: str = "{prefix}.in_proj_{kind}") -> None:
    """Separate query, key, value projections -> one stacked tensor (nn.MultiheadAttention's
    in_proj by default; ``target`` names it from the module prefix and weight|bias).

    ``pattern`` matches a renamed key as (module prefix, projection name, weight|bias);
    ``names`` are the projections' names in q, k, v order. The record of renames then
    names the stacked tensor."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in list(out.state_dict):
        if m := pattern.match(key):
            groups.setdefault((m[1], m[3]), {})[m[2]] = key
    targets = {}
    for (prefix, kind), keys in groups.items():
        stacked = target.format(prefix=prefix, kind=kind)
        out.state_dict[stacked] = torch.cat([out.state_dict.pop(keys[n]) for n in names])
        targets.update({keys[n]: stacked for n in names})
    out.renamed = [(source, targets.get(target, target)) for source, target in out.renamed]


IN_PROJ = re.compile(r"^(.*)\.in_proj_(weight|bias)$")


def put_split_in_proj(out: Renamed, key: str, tensor: torch.Tensor,
                      rename: Callable[[str], str]) -> bool:
    """nn.MultiheadAttention's stacked ``in_proj_{weight,bias}`` -> the separate q, k and v
    projections (``{prefix}.{q,k,v}_proj.{weight,bias}``, then ``rename``d) in ``out``;
    False (nothing put) when ``key`` is not a stacked projection."""
    m = IN_PROJ.match(key)
    if m is None:
        return False
    for part, chunk in zip("qkv", tensor.chunk(3), strict=True):
        out.put(key, rename(f"{m[1]}.{part}_proj.{m[2]}"), chunk)
    return True


def check_duplicate(state_dict: StateDict, key: str, original: str) -> None:
    """A head registered twice in the original model must be saved twice the same."""
    if not torch.equal(state_dict[key], state_dict[original]):
        raise ValueError(f"{key} differs from {original}: they are one module in the "
                         "original model, so the checkpoint is inconsistent")
