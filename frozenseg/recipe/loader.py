"""Recipes: a YAML file (with the bases it names) plus ``key=value`` overrides -> a typed Recipe.

A recipe may name ``base: other.yaml`` (or a list of bases, applied in order; relative to the
recipe's own folder; bases may have bases). Its mapping is deep-merged over the bases':
mappings merge, anything else (numbers, strings, lists, null) replaces. Overrides such as
``train.lr=1e-4`` or ``data.cache=null`` are applied last; their values are YAML.

Scalars are read as YAML 1.2 reads them: ``1e-4`` is a number and ``no``/``yes``/``on``/``off``
stay strings (``train.precision: no``); only ``true``/``false`` are booleans.

Every key is checked: an unknown key, a wrong type or a value out of range is a
:class:`RecipeError` naming the dotted key and the file that set it (``command line`` for an
override). Paths inside a recipe (detector, data, output) are relative to the folder the
command runs in, not to the recipe file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from frozenseg.files import atomic_write_text
from frozenseg.recipe.packaged import resolve_recipe
from frozenseg.recipe.schema import MODE_SECTIONS, Recipe, RecipeError

COMMAND_LINE = "command line"


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: 1e-4 is a float; yes/no/on/off are strings."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver(_FLOAT, _EXPONENT_FLOAT, list("-+0123456789."))


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """The recipe at ``path`` (a file, or the name of a packaged recipe:
    :mod:`frozenseg.recipe.packaged`) with its bases merged in, then ``key.sub=value``
    overrides."""
    try:
        path = resolve_recipe(path)
    except FileNotFoundError as err:
        raise RecipeError(str(err)) from None
    origins: dict[str, str] = {}
    data = _load_file(path, origins, chain=())
    return _validated(data, origins, str(path), overrides)


def recipe_from_dict(data: dict, source: str, overrides: Iterable[str] = ()) -> Recipe:
    """A recipe from plain data (``recipe_to_dict``'s, e.g. the one a head checkpoint
    carries), then overrides; ``source`` names it in error messages."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, not a {type(data).__name__}")
    data, origins = copy.deepcopy(data), {}
    # Checkpoints written before recipes were a union by mode carry every mode's sections.
    mode = data.get("mode", "head")
    for other, sections in MODE_SECTIONS.items():
        for name in sections if other != mode else ():
            data.pop(name, None)
    _record(data, source, origins)
    return _validated(data, origins, source, overrides)


def _validated(data: dict, origins: dict[str, str], source: str,
               overrides: Iterable[str]) -> Recipe:
    for item in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(data, item, origins)
    return _Validator(origins, source).section(Recipe, data, "")


def _load_file(path: Path, origins: dict[str, str], chain: tuple[tuple[Path, str], ...]) -> dict:
    real = path.resolve()
    if any(real == seen for seen, _ in chain):
        raise RecipeError("base cycle: " + " -> ".join([name for _, name in chain] + [str(path)]))
    data = _read_yaml(path, chain[-1][1] if chain else None)
    bases = data.pop("base", None)
    bases = [bases] if isinstance(bases, str) else bases or []
    if not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise RecipeError(f"{path}: base must be a file name or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        parent = _load_file(path.parent / base, origins, (*chain, (real, str(path))))
        merged = _merge(merged, parent)
    _record(data, str(path), origins)
    return _merge(merged, data)


def _read_yaml(path: Path, referrer: str | None) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        named = f"{referrer}: base {path}" if referrer else str(path)
        raise RecipeError(f"{named}: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:  # the parser recurses: thousands of nested '[' exhaust the stack
        raise RecipeError(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, not a {type(data).__name__}")
    return data


def _merge(base: dict, child: dict) -> dict:
    """``child`` deep-merged over ``base``: mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _record(data: dict, source: str, origins: dict[str, str], prefix: str = "") -> None:
    """Remember which file (or the command line) set each dotted key."""
    for key, value in data.items():
        dotted = _join(prefix, key)
        origins[dotted] = source
        if isinstance(value, dict):
            _record(value, source, origins, dotted)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 0.0001)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise RecipeError(f"{COMMAND_LINE}: {item!r} is not key=value (e.g. train.lr=1e-4)")
    try:
        return key, yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        raise RecipeError(f"{COMMAND_LINE}: {key}: {text!r} is not a YAML value") from None


def _apply_override(data: dict, item: str, origins: dict[str, str]) -> None:
    key, value = parse_override(item)
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
            origins[".".join(parts[: i + 1])] = COMMAND_LINE
        elif not isinstance(node[part], dict):
            raise RecipeError(f"{COMMAND_LINE}: {'.'.join(parts[: i + 1])} is a value, "
                              f"not a section: cannot set {key}")
        node = node[part]
    origins[key] = COMMAND_LINE
    if isinstance(value, dict):  # a mapping merges into the section, as in a file
        _record(value, COMMAND_LINE, origins, key)
        if isinstance(node.get(parts[-1]), dict):
            value = _merge(node[parts[-1]], value)
    node[parts[-1]] = value


class _Validator:
    """Turns the merged mapping into dataclasses, checking every key against the field types."""

    def __init__(self, origins: dict[str, str], default: str) -> None:
        self.origins, self.default = origins, default

    def where(self, key: str) -> str:
        """The file (or the command line) that set ``key``, or else its nearest section."""
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.default

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{self.where(key)}: {message}")

    def section(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            self.fail(prefix, f"{prefix} must be a mapping of keys, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        for name in data:
            if name not in hints:
                self._unknown(prefix, str(name), [f.name for f in fields])
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in data:
                self.fail(prefix, f"missing key {_join(prefix, f.name)}")
        values = {f.name: self.value(data[f.name], hints[f.name], _join(prefix, f.name))
                  for f in fields if f.name in data}
        try:
            return cls(**values)
        except ValueError as err:  # the section's own checks name the key first
            named = re.match(r"[\w.]+", str(err))
            self.fail(named[0] if named else prefix, str(err))

    def _unknown(self, prefix: str, name: str, valid: list[str]) -> typing.NoReturn:
        key = _join(prefix, name)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = (f"did you mean {_join(prefix, close[0])}?" if close
                else f"valid keys: {', '.join(_join(prefix, v) for v in valid)}")
        self.fail(key, f"unknown key {key} ({hint})")

    def value(self, value: Any, hint: Any, key: str) -> Any:
        if dataclasses.is_dataclass(hint):
            return self.section(hint, value, key)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Literal:
            if isinstance(value, str) and value in args:
                return value
            self.fail(key, f"{key} is {value!r}; one of {', '.join(args)}")
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1 and _fits(value, inner[0]):
                return self.value(value, inner[0], key)
        elif origin is tuple:
            if isinstance(value, (list, tuple)):
                items = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
                if len(items) == len(value) and all(map(_fits, value, items)):
                    return tuple(self.value(v, t, key) for v, t in zip(value, items, strict=True))
        elif origin is dict:  # free-form (checked where it is used, e.g. DetectorConfig)
            if isinstance(value, dict) and all(isinstance(k, str) for k in value):
                return dict(value)
        elif _fits(value, hint):
            if hint is float and not math.isfinite(value):  # YAML's .inf and .nan
                self.fail(key, f"{key} must be a finite number, got {value!r}")
            return float(value) if hint is float else value
        self.fail(key, f"{key} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a scalar matches a plain type (ints pass for floats; bools only for bools)."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is Literal:
        return True  # its own checks follow
    return isinstance(hint, type) and isinstance(value, hint)


def _describe(hint: Any) -> str:
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is Literal:
        return f"one of {', '.join(args)}"
    if origin is dict:
        return "a mapping of keys"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# ----------------------------------------------------------------------------- saving


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain YAML-safe data (tuples become lists)."""
    return _plain({key: value for key, value in dataclasses.asdict(recipe).items()
                   if value is not None})


def recipe_differences(before: dict, after: dict, sections: Iterable[str]) -> list[tuple]:
    """(dotted key, value in ``before``, value in ``after``) for every key of ``sections``
    (recipe dicts, :func:`recipe_to_dict`) whose value differs, in key order."""
    flat_before, flat_after, sections = _flat(before), _flat(after), set(sections)
    keys = sorted(k for k in flat_before.keys() | flat_after.keys()
                  if k.split(".")[0] in sections and flat_before.get(k) != flat_after.get(k))
    return [(k, flat_before.get(k), flat_after.get(k)) for k in keys]


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: value}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, _join(prefix, key)))
        else:
            flat[_join(prefix, key)] = value
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (no bases), atomically: a temporary name, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "# The resolved recipe: bases and overrides applied.\n"
                      + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
