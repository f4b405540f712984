"""What a setting may be, declared once on the constructor that takes it, checked before anything runs.

A constructor's type hints are its rules: ``int``, ``float | None``, ``Literal["center", "random"]``,
and ``Annotated[int, AtLeast(1)]`` where a range or a file matters. ``config_problems`` reads them
for every config node with a ``_target_`` (and for a command's own keyword arguments), so a wrong
type, an unknown choice or an out-of-range value fails at start-up, one line naming the key, before
a run dir, data or a model exists. Library constructors are read the same way (Lightning's Trainer
declares ``precision: Literal[...]``): their rules stay theirs, never copied here.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf


# ------------------------------------------------------------------ rules beyond the type (Annotated)
def _not_finite(value: Any) -> str | None:
    # YAML reads .inf and .nan as floats: a bound says nothing about them (nan compares false with
    # everything, inf passes every lower bound), and no bounded setting means either.
    return "must be a finite number" if isinstance(value, float) and not math.isfinite(value) else None


@dataclass(frozen=True)
class AtLeast:
    """A (finite) number no smaller than ``low``."""

    low: float

    def problem(self, value: Any) -> str | None:
        if found := _not_finite(value):
            return found
        return None if value >= self.low else f"must be at least {_shown(self.low)}"


@dataclass(frozen=True)
class Above:
    """A (finite) number larger than ``low``."""

    low: float

    def problem(self, value: Any) -> str | None:
        if found := _not_finite(value):
            return found
        return None if value > self.low else f"must be above {_shown(self.low)}"


@dataclass(frozen=True)
class Between:
    """A number in ``[low, high]``."""

    low: float
    high: float

    def problem(self, value: Any) -> str | None:
        if found := _not_finite(value):
            return found
        ok = self.low <= value <= self.high
        return None if ok else f"must be between {_shown(self.low)} and {_shown(self.high)}"


@dataclass(frozen=True)
class Exists:
    """A path that exists: ``kind`` "file", "dir" or "any"."""

    kind: str = "any"

    def problem(self, value: Any) -> str | None:
        p = Path(str(value)).expanduser()
        if self.kind == "file" and not p.is_file():
            return "is a directory, not a file" if p.is_dir() else "does not exist"
        if self.kind == "dir" and not p.is_dir():
            return "is a file, not a directory" if p.exists() else "does not exist"
        return None if p.exists() else "does not exist"


@dataclass(frozen=True)
class OutputDir:
    """Where a command writes its results (``out=``): a new or empty directory, or one that holds only
    what the command itself writes there (``owns``: file-name patterns), which a rerun replaces or
    overwrites. Never a file, and never a directory of someone else's files: one rule for sample, eval,
    export and prepare."""

    owns: tuple[str, ...]
    what: str  # what the command writes, for the message ("an exported pipeline")

    def foreign(self, out: Path) -> list[str]:
        """The entries of ``out`` the command did not write (sorted names)."""
        import fnmatch

        return sorted(p.name for p in out.iterdir() if not any(fnmatch.fnmatch(p.name, g) for g in self.owns))

    def problem(self, value: Any) -> str | None:
        out = Path(str(value)).expanduser()
        if out.exists() and not out.is_dir():
            return f"is an existing file; give a directory for {self.what}"
        if out.is_dir() and (foreign := self.foreign(out)):
            return (
                f"holds files that are not {self.what} ({', '.join(foreign[:3])}); give a new or empty "
                "directory (what this command wrote there before is replaced)"
            )
        return None


@dataclass(frozen=True)
class Device:
    """``auto``, ``cpu`` or ``cuda[:N]``, and a CUDA device only where one is visible."""

    def problem(self, value: Any) -> str | None:
        name = str(value)
        if name in ("auto", "cpu"):
            return None
        if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
            import torch

            return None if torch.cuda.is_available() else "but no CUDA device is visible; use device=cpu"
        return "is not valid; allowed: auto, cpu, cuda, cuda:N"


def resolve_device(name: str) -> str:
    """The torch device a ``Device``-checked setting names (``auto``: CUDA when visible)."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# ------------------------------------------------------------------ does a value fit a type hint
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _shown(value: Any) -> str:
    """A value as a user writes it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _typed(value: Any) -> str:
    """A user's value as typed: ``4.0`` stays a float (``seed=4.0 must be an integer``)."""
    return repr(value) if isinstance(value, float) and value.is_integer() else _shown(value)


def _is_quoted_scalar(value: str) -> bool:
    """A string that reads as a number, boolean or null unquoted (``"4"``: the quotes made it a string)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # how Hydra reads it

    try:
        parsed = OverridesParser.create().parse_override(f"k={value}").value()
    except Exception:  # not a valid unquoted value at all
        return False
    return bool(value.strip()) and (parsed is None or isinstance(parsed, (bool, int, float)))


def _describe(hint: Any) -> str:
    if get_origin(hint) is Annotated:
        return _describe(get_args(hint)[0])
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(_shown(v) for v in get_args(hint))
    if hint is type(None):
        return "null"
    if get_origin(hint) in (list, tuple, Sequence) or hint in (list, tuple):
        return "a list"
    if get_origin(hint) in (dict, Mapping) or hint is dict:
        return "a mapping"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


# How a plain type mismatch reads (rules and allowed-value lists read differently).
_MISMATCH = ("must be a ", "must be an ", "must be null", "must be true or false")


def _is_list_hint(hint: Any) -> bool:
    if get_origin(hint) is Annotated:
        return _is_list_hint(get_args(hint)[0])
    return get_origin(hint) in (list, tuple, Sequence) or hint in (list, tuple)


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _literals(hint: Any) -> list:
    """Every literal value reachable through unions (Lightning spreads precision over three Literals)."""
    if get_origin(hint) is Literal:
        return list(get_args(hint))
    if _is_union(hint):
        return [v for arm in get_args(hint) for v in _literals(arm)]
    return []


def problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` (plain Python, from a config) cannot go where ``hint`` is declared; None if it can.

    Lenient where a hint cannot be judged from a config value (callables, protocols, type variables):
    only what is certainly wrong is refused."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or isinstance(hint, (str, typing.TypeVar, typing.ForwardRef)):
        return None
    if origin is Annotated:
        found = problem(value, args[0])
        for rule in args[1:]:
            if found is None and hasattr(rule, "problem"):
                found = rule.problem(value)
        return found
    if _is_union(hint):
        found = [(arm, problem(value, arm)) for arm in args]
        if any(p is None for _, p in found):
            return None
        is_list = isinstance(value, (list, tuple))
        lists = [p for arm, p in found if _is_list_hint(arm)]
        if is_list and len(lists) == 1:
            return lists[0]  # what is wrong inside the list
        literals = list({_shown(v): v for v in _literals(hint)}.values())  # 32 and "32" read alike
        if literals:
            others = [_describe(a) for a in args if not _literals(a) and a is not type(None)]
            allowed = ", ".join(_shown(v) for v in literals) + "".join(f" or {o}" for o in others)
            return f"is not valid; allowed: {allowed}" + _suggestion(value, literals)
        # The arm the value's kind fits (a scalar for a scalar arm, a list for a list arm) says what is
        # wrong inside it ("must be at least 1"); a plain type mismatch says less.
        inside = [p for arm, p in found if _is_list_hint(arm) == is_list and not p.startswith(_MISMATCH)]
        if len(inside) == 1:
            return inside[0]
        return "must be " + " or ".join(_describe(a) for a in args)
    if origin is Literal:
        if any(value == v and type(value) is type(v) for v in args):
            return None
        return "is not valid; allowed: " + ", ".join(_shown(v) for v in args) + _suggestion(value, args)
    if hint is type(None) or hint is None:
        return None if value is None else "must be null"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"must be a list of {len(args)}"
            items = list(zip(value, args, strict=True))
        else:
            items = [(v, args[0]) for v in value] if args else []
        for v, arm in items:
            if not _is_object_config(v) and (found := problem(v, arm)):
                return f"has an item {_shown(v)} that {found}"
        return None
    if origin in (dict, Mapping) or hint is dict:
        return None if isinstance(value, dict) else "must be a mapping"
    if hint in (Path, os.PathLike) or (isinstance(hint, type) and issubclass(hint, Path)):
        return None if isinstance(value, (str, os.PathLike)) else "must be a path"
    if isinstance(hint, type) and isinstance(value, (bool, int, float, str, type(None))):
        # A plain value where a class is declared: only an instance of it can go there.
        return None if isinstance(value, hint) else f"must be a {hint.__name__}"
    return None


def _suggestion(value: Any, options: Sequence[Any]) -> str:
    near = closest(str(value), [str(o) for o in options])
    return f" (did you mean {near}?)" if near else ""


def closest(word: str, options: Sequence[str]) -> str | None:
    """The option a typo most likely meant, or None."""
    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


# ------------------------------------------------------------------ a whole config against its constructors
def _is_object_config(value: Any) -> bool:
    return isinstance(value, (dict, DictConfig)) and "_target_" in value


def _hints(target: Callable) -> tuple[dict[str, Any], dict[str, inspect.Parameter]]:
    """(type hints, parameters) of a callable or a class's __init__; empty where they cannot be read."""
    try:
        params = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return {}, {}
    try:
        hints = typing.get_type_hints(
            target.__init__ if isinstance(target, type) else target, include_extras=True
        )
    except Exception:  # unresolvable annotations (forward references, optional imports): no types
        hints = {}
    return hints, params


def _value_and_source(node: DictConfig, key: str) -> tuple[Any, str | None] | None:
    """The resolved plain value at ``node[key]`` and, for an interpolation of another key, that key
    (``seed``, not ``model.seed``: the user typed the one it comes from). None if it cannot resolve."""
    source = None
    child = node._get_node(key)
    if child is not None and child._is_interpolation():
        target = child._maybe_dereference_node(throw_on_resolution_failure=False)
        full = target._get_full_key(None) if target is not None else ""
        source = full or None
    try:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception:  # a runtime-only interpolation (${hydra:...}): checked where it is used
        return None
    return value, source


def check_arguments(
    target: Callable, node: DictConfig, path: str, skip: Sequence[str] = (), complete: bool = False
) -> Iterator[str]:
    """Problems of ``node``'s keys as keyword arguments of ``target`` (one line each, naming the key);
    ``complete``: every parameter without a default must be there (a partial gets the rest later)."""
    hints, params = _hints(target)
    if not params:
        return
    if complete:
        named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name, p in params.items():
            if p.default is p.empty and p.kind in named and name not in node:
                yield f"{path + '.' if path else ''}{name} is required (give {name}=...)"
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in node:
        key = str(key)
        if key.startswith("_") or key in skip:
            continue
        full = f"{path}.{key}" if path else key
        if key not in params:
            if not open_ended:
                near = closest(key, [p for p in params if p != "self"])
                hint = f"; did you mean {path + '.' if path else ''}{near}?" if near else ""
                yield f"unknown key {full}{hint}"
            continue
        found = _value_and_source(node, key)
        if found is None or key not in hints:
            continue
        value, source = found
        if _is_object_config(value):
            continue
        if why := problem(value, hints[key]):
            if isinstance(value, str) and _is_quoted_scalar(value) and why.startswith(_MISMATCH):
                # `key="4"`: the quotes made a number a string; show them, and the line without.
                name = source or full
                yield f'{name}="{value}" {why} (the quotes make it a string: write {name}={value})'
                continue
            yield f"{source or full}={_typed(value)} {why}"


def config_problems(cfg: DictConfig, path: str = "") -> Iterator[str]:
    """Every node with a ``_target_`` under ``cfg`` checked against its constructor (``hydra`` skipped):
    each value against its parameter's type hint, then, when those pass, the rules that tie settings
    together, which a class states once as ``settings_problems(settings: dict) -> list[str]`` (lines
    with keys relative to the node; its constructor may call it too)."""
    import hydra.utils

    if "_target_" in cfg:
        try:
            target = hydra.utils.get_object(str(cfg._target_))
        except Exception:
            yield f"{path}._target_={cfg._target_} cannot be imported"
            return
        found = list(check_arguments(target, cfg, path))
        yield from found
        if not found and callable(rule := getattr(target, "settings_problems", None)):
            try:
                settings = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # a runtime-only interpolation (${hydra:...}): checked where it is built
                settings = None
            if isinstance(settings, dict):
                yield from (f"{path}.{line}" if path else line for line in rule(settings))
    for key in cfg:
        if path == "" and key == "hydra":
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_missing():
            if child._is_none():
                continue
            yield from config_problems(child, f"{path}.{key}" if path else str(key))
        elif isinstance(child, ListConfig) and not child._is_interpolation() and not child._is_none():
            for i, item in enumerate(child):
                if isinstance(item, DictConfig) and "_target_" in item:
                    yield from config_problems(item, f"{path}.{key}[{i}]" if path else f"{key}[{i}]")


def check_values(cfg: DictConfig, rules: Mapping[str, Any]) -> Iterator[str]:
    """Problems of the values at dotted keys against type hints (``{"trainer.max_steps": int}``): for
    settings whose constructor declares no range of its own (a library's). Absent keys are skipped."""
    for key, hint in rules.items():
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not isinstance(node, DictConfig) or name not in node:
            continue
        found = _value_and_source(node, name)
        if found is not None and (why := problem(found[0], hint)):
            yield f"{found[1] or key}={_typed(found[0])} {why}"


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys left at ``???`` (mandatory values the user must give); ``hydra`` skipped, nothing resolved."""
    found = []
    for key in cfg:
        full = f"{prefix}.{key}" if prefix else str(key)
        child = cfg._get_node(key)
        if full == "hydra" or child is None or child._is_interpolation():
            continue
        if child._is_missing():
            found.append(full)
        elif isinstance(child, DictConfig) and not child._is_none():
            found += missing_keys(child, full)
    return found


def dotted_keys(cfg: DictConfig, prefix: str = "") -> Iterator[str]:
    """Every key of ``cfg`` as ``a.b.c`` (for suggestions)."""
    for key in cfg:
        full = f"{prefix}.{key}" if prefix else str(key)
        yield full
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_none():
            yield from dotted_keys(child, full)
