"""Command-line flags generated from the typed configs' fields, so a setting is declared once (its type,
default, choices and help live on the pydantic field) and the command builds the same typed config."""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def fraction(text: str) -> float:
    """A fraction REMOVED, in [0, 1), checked as argparse reads it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def positive(text: str) -> int:
    """A count of at least 1, checked as argparse reads it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside every flag; epilogs printed as written."""


def _scalar(annotation: Any) -> Any:
    """`X | None` → X."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else str
    return annotation


def add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], names: Iterable[str], *,
               defaults: dict[str, Any] | None = None, parsers: dict[str, Callable[[str], Any]] | None = None,
               notes: dict[str, str] | None = None) -> None:
    """One `--flag` per field of `model`; `defaults` replace a field's default for this command,
    `parsers` give a field its own argparse type (e.g. a fraction in [0, 1)), `notes` add to its help.
    `parser` may also be an argument group (e.g. mutually exclusive flags)."""
    defaults, parsers, notes = defaults or {}, parsers or {}, notes or {}
    for name in names:
        info = model.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kind = _scalar(info.annotation)
        default = defaults.get(name, None if info.is_required() else info.default)
        kwargs: dict[str, Any] = {"help": "; ".join(filter(None, (info.description, notes.get(name)))) or " ", "dest": name}
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        if get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
        else:
            kwargs["type"] = parsers.get(name, kind if kind in (int, float, str) else str)
        if info.is_required() and name not in defaults:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(flag, **kwargs)


def fields_of(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The parsed values that belong to `model`, ready for `model.model_validate`."""
    return {name: value for name, value in vars(args).items() if name in model.model_fields}
