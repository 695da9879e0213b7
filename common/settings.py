"""Settings trees: nested dataclasses that check themselves, built from flat names, with
command-line flags generated from their fields.

A section is a dataclass field whose type is itself a dataclass; every other field is a leaf.
Leaf names are unique across a tree, so one flat name (`max_batch`, `--max-batch`) finds its
section. transformers' HfArgumentParser does the flags part for flat dataclasses only (one
argument group per dataclass, no nesting); this does the same for a tree, with each field's
help, flag and group kept once, in its `metadata`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def require(condition: bool, name: str, value: object, allowed: str) -> None:
    """Raise the one message shape every setting uses: the field, what it must be, what it got."""
    if not condition:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float, and not a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def require_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(_is_int(value) and value > 0, name, value, "an integer >= 1")


def require_non_negative(obj: object, *names: str, zero_means: str = "no limit") -> None:
    for name in names:
        value = getattr(obj, name)
        require(_is_int(value) and value >= 0, name, value, f"an integer >= 0 (0 = {zero_means})")


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING,
            flag: str | None = None, cli: bool = True, group: str | None = None,
            choices: tuple[Any, ...] | None = None, metavar: str | None = None,
            repr: bool = True) -> Any:
    """A leaf field: its help, and optionally its flag (default --field-name), argument group
    (default its section's), choices, or cli=False for settings that never come from flags."""
    metadata = {"help": help, "flag": flag, "cli": cli, "group": group, "choices": choices,
                "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, repr=repr,
                             metadata=metadata)


def section(cls: type, title: str) -> Any:
    """A nested section, built from its own defaults unless given; `title` heads its flags."""
    return dataclasses.field(default_factory=cls, metadata={"title": title})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a tree: where it sits, its field, its resolved type and its flag group."""

    path: tuple[str, ...]
    field: Field
    type: Any
    group: str

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def on_cli(self) -> bool:
        return self.field.metadata.get("cli", True)

    @property
    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return MISSING


def _sections(cls: type) -> list[tuple[Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def leaves(cls: type, title: str = "", path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every leaf of the tree rooted at `cls`, depth first; a repeated leaf name is an error."""
    found: list[Leaf] = []
    for f, hint in _sections(cls):
        if dataclasses.is_dataclass(hint):
            found += leaves(hint, f.metadata.get("title", f.name), (*path, f.name))
        else:
            found.append(Leaf((*path, f.name), f, hint, f.metadata.get("group") or title))
    names = [leaf.name for leaf in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TypeError(f"{cls.__name__}: setting names must be unique in the tree: {repeated}")
    return found


def build(cls: type[T], **flat: Any) -> T:
    """Build the tree rooted at `cls` from flat leaf names; absent ones keep their defaults."""
    known = {leaf.name for leaf in leaves(cls)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(map(repr, unknown))}")
    return _build(cls, flat)


def _build(cls: type[T], flat: Mapping[str, Any]) -> T:
    kwargs: dict[str, Any] = {}
    for f, hint in _sections(cls):
        if f.name in flat:
            kwargs[f.name] = flat[f.name]
        elif dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, flat)
    return cls(**kwargs)


def flatten(config: object) -> dict[str, Any]:
    """The tree's leaf values by flat name (the inverse of `build`)."""
    values: dict[str, Any] = {}
    for leaf in leaves(type(config)):
        value: Any = config
        for part in leaf.path:
            value = getattr(value, part)
        values[leaf.name] = value
    return values


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


_METAVARS = {int: "N", float: "NUM", Path: "PATH"}


def _argument(leaf: Leaf) -> dict[str, Any]:
    """argparse keywords for one leaf, from its type, default and metadata."""
    meta = leaf.field.metadata
    kind, _ = _unwrap_optional(leaf.type)
    kwargs: dict[str, Any] = {"dest": leaf.name, "help": meta.get("help", "").replace("%", "%%")}
    default = leaf.default
    if default is MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if kind is bool:
        # A plain switch when off by default; otherwise both --x and --no-x.
        kwargs["action"] = ("store_true" if default is False
                            else argparse.BooleanOptionalAction)
        return kwargs
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        kwargs["choices"] = list(kind)
        kwargs["metavar"] = "{" + ",".join(str(m.value) for m in kind) + "}"
    elif kind in (int, float, str, Path):
        pass
    else:
        raise TypeError(f"{leaf.name}: no flag for type {leaf.type!r}; mark it cli=False")
    kwargs["type"] = kind
    if meta.get("choices") is not None:
        kwargs["choices"] = meta["choices"]
    elif meta.get("metavar") or kind in _METAVARS:
        kwargs["metavar"] = meta.get("metavar") or _METAVARS[kind]
    if default not in (MISSING, None, ""):
        kwargs["help"] += " (default: %(default)s)"
    return kwargs


def add_flags(parser: argparse.ArgumentParser, cls: type,
              descriptions: Mapping[str, str] | None = None) -> None:
    """One flag per leaf that is on the command line, in one argument group per section (or
    per `group` named in metadata); `descriptions` adds a line under a group's title."""
    descriptions = descriptions or {}
    groups: dict[str, Any] = {}
    for leaf in leaves(cls):
        if not leaf.on_cli:
            continue
        if leaf.group not in groups:
            groups[leaf.group] = (parser.add_argument_group(leaf.group,
                                                            descriptions.get(leaf.group))
                                  if leaf.group else parser)
        groups[leaf.group].add_argument(leaf.flag, **_argument(leaf))


def values_from(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flat values the flags of `cls` parsed into (pass them to `build`)."""
    return {leaf.name: getattr(args, leaf.name) for leaf in leaves(cls) if leaf.on_cli}
