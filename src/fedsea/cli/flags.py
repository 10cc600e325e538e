"""Command-line flags made from settings dataclasses: one field, one flag, one default, one help text.

``add_settings_flags`` adds ``--kebab-name`` for chosen fields of a settings object; the type
comes from the field's annotation, the help from its documentation (``fedsea.settings.field_docs``)
and the default from the object. With ``keep=True`` the flag's default is ``None``: the command
takes the value from a file (a run file) unless the flag is given. ``settings_from_flags`` builds
the object back, validated, from the parsed arguments.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fedsea.settings import build, field_docs, optional_type, settings_fields, toml_value

T = TypeVar("T")

__all__ = ["add_settings_flags", "flag_name", "settings_from_flags"]


def flag_name(field: str, flags: Mapping[str, str] | None = None) -> str:
    """The flag of a field: ``flags[field]``, else ``--`` and the name in kebab case."""
    return (flags or {}).get(field) or "--" + field.replace("_", "-")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _chosen(defaults: object, fields: Sequence[str] | None) -> list[tuple[str, Any]]:
    hints = {f.name: hint for f, hint in settings_fields(type(defaults))}
    names = list(fields) if fields is not None else list(hints)
    unknown = [n for n in names if n not in hints]
    if unknown:
        raise TypeError(f"{type(defaults).__name__} has no field(s) {unknown}")
    return [(n, hints[n]) for n in names]


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return toml_value(value) if isinstance(value, bool) else str(value)


def add_settings_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    defaults: object,
    fields: Sequence[str] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    keep: str | None = None,
) -> None:
    """Add a flag per field of the settings object ``defaults`` (all fields, or ``fields``).

    Args:
        parser: the parser (or argument group) to add to.
        defaults: the settings object whose values are the defaults shown (and used, unless ``keep``).
        fields: the fields to expose, in order; ``None``: every field.
        flags: flag names that differ from ``--kebab-name`` (``{"dtype": "--wire-dtype"}``).
        choices: the allowed values of a field, for argparse's check and help.
        keep: where the value comes from when the flag is not given (``"the run file's"``; may
            name ``{default}``, the value of ``defaults``): the flag then defaults to ``None``.
    """
    docs = field_docs(type(defaults))
    for name, hint in _chosen(defaults, fields):
        flag = flag_name(name, flags)
        inner, _ = optional_type(hint)
        value = getattr(defaults, name)
        shown = keep.format(default=_show(value)) if keep else _show(value)
        doc = docs.get(name, "").replace("``", "").replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": _dest(flag),
            "default": None if keep else value,
            "help": f"{doc} (default: {shown})".strip(),
        }
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is tuple:
            kwargs["type"] = lambda text: tuple(part.strip() for part in text.split(","))
            kwargs["metavar"] = "A,B,..."
        elif inner in (int, float, str):
            kwargs["type"] = inner
        else:
            raise TypeError(f"no flag for {type(defaults).__name__}.{name}: {hint!r}")
        if choices and name in choices:
            kwargs["choices"] = list(choices[name])
        parser.add_argument(flag, **kwargs)


def settings_from_flags(
    args: argparse.Namespace,
    base: T,
    fields: Sequence[str] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
) -> T:
    """``base`` with the values of the flags given (not ``None``), validated like a file's."""
    given = {}
    for name, _ in _chosen(base, fields):
        value = getattr(args, _dest(flag_name(name, flags)), None)
        if value is not None:
            given[name] = value
    return build(type(base), given, base=base) if given else base


def require_positive(args: argparse.Namespace, *dests: str) -> None:
    """Raise ``ValueError`` (the CLI's one-line error) unless each integer flag in ``dests`` is >= 1
    (``--batch-size 0`` would divide by zero far from the flag)."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= 1, got {value}")
