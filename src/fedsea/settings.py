"""One generic loader for settings: frozen dataclasses from TOML, YAML and ``a.b=value`` overrides.

A settings tree is a frozen dataclass whose fields are scalars, ``X | None``, tuples, or other
such dataclasses (tables). ``build`` walks the fields (``dataclasses.fields`` and
``typing.get_type_hints``), coerces each value to its annotation, starts from the field
defaults of the tree it is given (so a partial table keeps the other defaults), and rejects
an unknown key with an error that names it and the known ones. ``to_tree`` and ``dump_toml``
go back; ``field_docs`` reads each field's documentation (the ``Args:`` section of the class
docstring, or ``metadata["doc"]``), which the command-line flags and ``fedsea config example``
show, so that a setting is documented and defaulted in one place.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Field metadata: a 0 read for this ``X | None`` field means None (run files before the config
# tree wrote 0 for "none"; resolved files of older runs still say so and must resume).
ZERO_IS_NONE = "zero_is_none"

__all__ = [
    "ZERO_IS_NONE",
    "apply_override",
    "build",
    "coerce",
    "dump_toml",
    "field_docs",
    "optional_type",
    "parse_value",
    "read_settings_file",
    "settings_fields",
    "to_tree",
    "toml_value",
]


def settings_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The init fields of a settings dataclass with their resolved annotations."""
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


_HINTS: dict[type, dict[str, Any]] = {}
_DOCS: dict[type, dict[str, str]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:  # resolving string annotations is slow: once per class
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def optional_type(hint: Any) -> tuple[Any, bool]:
    """(the inner type, whether None is allowed) of ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce(value: Any, hint: Any, where: str, base: Any = None) -> Any:
    """``value`` as the annotation ``hint`` says (``ValueError`` naming ``where`` otherwise)."""
    inner, nullable = optional_type(hint)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{where} must be set")
    if dataclasses.is_dataclass(inner) and isinstance(inner, type):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a table, got {value!r}")
        return build(inner, value, f"{where}.", base if isinstance(base, inner) else None)
    origin = typing.get_origin(inner)
    if origin is tuple:
        args = typing.get_args(inner)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)}, got {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if inner is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a string; older run files
            # quoted numbers too. A string that is a finite number is that number.
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if not _is_number(value):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: settings cannot hold {inner!r}")


def build(cls: type[T], data: Mapping[str, Any], where: str = "", base: T | None = None) -> T:
    """``cls`` from a mapping: ``base`` (or ``cls()``) with the given keys replaced, each coerced.

    A ``ValueError`` from the class's own validation is prefixed with ``where`` when it starts
    with a field name, so that it reads ``noise.clip_norm must be ...``.
    """
    fields = {f.name: (f, hint) for f, hint in settings_fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ValueError(f"unknown setting {where + str(unknown[0])!r}; known: {', '.join(fields)}")
    current = base if base is not None else _defaults(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        f, hint = fields[key]
        if f.metadata.get(ZERO_IS_NONE) and _is_number(value) and value == 0:
            value = None
        values[key] = coerce(value, hint, where + key, getattr(current, key, None))
    try:
        if current is None:
            return cls(**values)
        return dataclasses.replace(current, **values)  # type: ignore[type-var]
    except ValueError as exc:
        message = str(exc)
        if where and message.split(" ", 1)[0].split(".")[0] in fields:
            raise ValueError(where + message) from None
        raise


def _defaults(cls: type[T]) -> T | None:
    """``cls()`` when every field has a default (the base a partial table starts from)."""
    try:
        return cls()
    except TypeError:
        return None


def to_tree(obj: Any) -> dict[str, Any]:
    """A settings dataclass as plain TOML-able data: tables, lists, scalars; None left out, except that
    a ``ZERO_IS_NONE`` field set to None against a default that is not None is written 0 (which reads
    back as None: left out, it would read back as the default, e.g. ``max_grad_norm = 1.0``)."""
    out: dict[str, Any] = {}
    for f, _ in settings_fields(type(obj)):
        value = _plain(getattr(obj, f.name))
        if value is None and f.metadata.get(ZERO_IS_NONE) and f.default not in (None, dataclasses.MISSING):
            value = 0
        if value is not None:
            out[f.name] = value
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_tree(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def parse_value(raw: str) -> Any:
    """A command-line value as TOML (``3``, ``0.5``, ``"text"``, ``true``, ``[1, 2]``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return raw.strip()


def apply_override(tree: dict[str, Any], assignment: str) -> list[str]:
    """Set ``a.b=value`` in a nested dict (tables made as needed); returns the key path."""
    if "=" not in assignment:
        raise ValueError(f"an override is section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = [p.strip() for p in dotted.strip().split(".")]
    if not all(parts):
        raise ValueError(f"an override is section.key=value, got {assignment!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {part} is not a table")
        node = child
    node[parts[-1]] = parse_value(raw)
    return parts


def read_settings_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file, or YAML for ``.yaml``/``.yml`` (plain data only), as a dict of tables."""
    file = Path(path)
    text = file.read_text()
    if file.suffix.lower() not in (".yaml", ".yml"):
        return tomllib.loads(text)  # TOMLDecodeError is a ValueError
    import yaml  # PyYAML: already required by transformers

    try:
        data = yaml.safe_load(text)  # safe_load: plain data only, never Python objects
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def toml_value(value: Any) -> str:
    """One TOML value (bool, number, string or list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


_ARG = re.compile(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: ``metadata["doc"]``, else its entry under ``Args:`` in the
    docstring of ``cls``, of a base class or of a class in ``cls.__doc_sources__`` (Google style,
    continuation lines indented)."""
    if cls in _DOCS:
        return _DOCS[cls]
    docs: dict[str, str] = {}
    # ``__doc_sources__``: classes whose docstrings document fields this class shares with them.
    for klass in (*getattr(cls, "__doc_sources__", ()), *reversed(cls.__mro__)):
        docs.update(_docstring_args(inspect.getdoc(klass) or "") if klass.__doc__ else {})
    for f in dataclasses.fields(cls):
        if "doc" in f.metadata:
            docs[f.name] = str(f.metadata["doc"])
    _DOCS[cls] = {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}
    return _DOCS[cls]


def _docstring_args(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in ("Args:", "Attributes:"))
    except StopIteration:
        return out
    current: str | None = None
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            current = None
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        match = _ARG.match(line.strip())
        if depth == indent and match:
            current = match.group(1)
            out[current] = match.group(3).strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def _comment(text: str, width: int = 96) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, width - 2)] if text else []


def dump_toml(obj: Any, comments: bool = False) -> str:
    """A settings tree (a dataclass, or plain data) as a TOML file; with ``comments``, each key's
    documentation above it and each unset (None) key or table written commented out."""
    lines: list[str] = []
    if isinstance(obj, Mapping):
        _dump_data(obj, "", lines)
    elif comments:
        _dump_table(obj, "", lines, comments)
    else:
        _dump_data(to_tree(obj), "", lines)
    return "\n".join(lines).strip() + "\n"


def _dump_data(data: Mapping[str, Any], prefix: str, lines: list[str]) -> None:
    def is_array_of_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(e, Mapping) for e in v)

    for key, value in data.items():
        if value is not None and not isinstance(value, Mapping) and not is_array_of_tables(value):
            lines.append(f"{key} = {toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{prefix}{key}]"]
            _dump_data(value, f"{prefix}{key}.", lines)
        elif is_array_of_tables(value):
            for entry in value:
                lines += ["", f"[[{prefix}{key}]]"]
                _dump_data(entry, f"{prefix}{key}.", lines)


def _dump_table(obj: Any, prefix: str, lines: list[str], comments: bool) -> None:
    docs = field_docs(type(obj))
    tables: list[tuple[str, Any, Any]] = []
    hints = {f.name: hint for f, hint in settings_fields(type(obj))}
    for f, hint in settings_fields(type(obj)):
        value = getattr(obj, f.name)
        inner = optional_type(hint)[0]
        if dataclasses.is_dataclass(inner):
            tables.append((f.name, value, None))
            continue
        if typing.get_origin(inner) is tuple and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            tables.append((f.name, value, typing.get_args(inner)[0]))
            continue
        if comments:
            lines += _comment(docs[f.name])
        if value is None:
            if comments:
                lines.append(f"# {f.name} =  (unset)")
        else:
            lines.append(f"{f.name} = {toml_value(_plain(value))}")
    for name, value, item in tables:
        key = prefix + name
        if item is None and value is None:  # an unset ``X | None`` table: shown commented out
            if comments:
                table = optional_type(hints[name])[0]
                keys = ", ".join(f.name for f, _ in settings_fields(table))
                lines += ["", *_comment(docs[name]), f"# [{key}]  (unset; keys: {keys})"]
            continue
        if item is None:
            lines.append("")
            if comments:
                lines += _comment(docs[name])
            lines.append(f"[{key}]")
            _dump_table(value, key + ".", lines, comments)
            continue
        if comments:
            lines.append("")
            lines += _comment(docs[name])
            if not value:
                lines.append(f"# [[{key}]]  (none: write one table per entry)")
        for entry in value:
            lines.append("")
            lines.append(f"[[{key}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in to_tree(entry).items()]
