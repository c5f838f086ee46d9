"""One typed parser for option values, whatever their source: flags, YAML files or Python.

A value is read by the *declared type* of the dataclass field it goes to, so the same text means
the same thing everywhere: ``'no'`` is ``False`` (PyYAML keeps a quoted ``'no'`` as a string,
which Python treats as true), ``'1e-4'`` is a float (PyYAML 1.1 reads it as a string),
``'none'`` is ``None`` where the field allows ``None``, and ``inf`` / ``nan`` are refused (a
learning rate of ``inf`` "finishes" with NaN weights).

Example:
    >>> coerce("1e-4", float, "learning_rate")
    0.0001
    >>> coerce("no", bool, "overwrite_output_dir")
    False
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

from .errors import CGCValueError

_TRUE = ("true", "yes", "y", "on", "1")
_FALSE = ("false", "no", "n", "off", "0")
_NONE = ("none", "null", "~")


def coerce_fields(instance: Any) -> None:
    """Replace every field of a dataclass instance by its value coerced to the declared type."""
    hints = field_types(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        setattr(instance, f.name, coerce(value, hints[f.name], f.name))


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field (annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def coerce(value: Any, kind: Any, name: str) -> Any:
    """Return ``value`` as an instance of ``kind``, or raise a one-line error naming ``name``.

    Args:
        value: what the user gave (a flag's text, a YAML scalar or list, a Python value).
        kind: the field's type: ``bool``, ``int``, ``float``, ``str``, ``tuple[float, float]``,
            ``tuple[int, ...]``, ``dict[...]``, ``list[...]``, or a union of them with ``None``.
        name: the option's name, for the error message.
    """
    options = union_members(kind)
    if options is not None:
        allows_none = type(None) in options
        if value is None or (allows_none and _is_none_text(value)):
            if allows_none:
                return None
            raise CGCValueError(f"{name} must be {describe(kind)}; got None.")
        # Text is tried last: '7' for ``str | int`` is the number 7.
        members = sorted((o for o in options if o is not type(None)), key=lambda o: o is str)
        for option in members:
            try:
                return coerce(value, option, name)
            except CGCValueError:
                continue
        raise CGCValueError(f"{name} must be {describe(kind)}; got {value!r}.")
    if kind is Any:
        return value
    origin = typing.get_origin(kind)
    if kind is bool:
        return _to_bool(value, name)
    if kind is int:
        return _to_int(value, name)
    if kind is float:
        return _to_float(value, name)
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise CGCValueError(f"{name} must be a string; got {value!r}.")
    if origin is tuple or origin is list:
        return _to_sequence(value, kind, name)
    if origin is dict or kind is dict:
        return _to_dict(value, name)
    return value


def describe(kind: Any) -> str:
    """A reader's name of a type, for error messages ("a number", "two numbers or None")."""
    options = union_members(kind)
    if options is not None:
        parts = [describe(o) for o in options if o is not type(None)]
        text = " or ".join(parts)
        return f"{text}, or None" if type(None) in options else text
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a finite number"
    if kind is str:
        return "a string"
    origin = typing.get_origin(kind)
    if origin is tuple or origin is list:
        args = typing.get_args(kind)
        element = "numbers" if args and args[0] is float else "integers"
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{len(args)} {element}"
        return f"a list of {element}"
    if origin is dict or kind is dict:
        return "a mapping (JSON object)"
    return str(kind)


def union_members(kind: Any) -> tuple[Any, ...] | None:
    """The members of a union type (``int | None`` -> ``(int, NoneType)``), else None."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return None


def _is_none_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in _NONE


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise CGCValueError(f"{name} must be true or false (yes / no, 1 / 0); got {value!r}.")


def _to_float(value: Any, name: str) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise CGCValueError(f"{name} must be a finite number; got {value!r}.")
    if not math.isfinite(number):
        raise CGCValueError(
            f"{name} must be a finite number; got {value!r} (inf and nan would make the "
            "weights non-finite)."
        )
    return number


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number: float | None = None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)  # '1e3' from a YAML file
        except ValueError:
            number = None
    elif isinstance(value, float):
        number = value
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    raise CGCValueError(f"{name} must be an integer; got {value!r}.")


def _to_sequence(value: Any, kind: Any, name: str) -> tuple | list:
    args = typing.get_args(kind)
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)):
        raise CGCValueError(f"{name} must be {describe(kind)}; got {value!r}.")
    variadic = not args or args[-1] is Ellipsis or typing.get_origin(kind) is list
    if not variadic and len(value) != len(args):
        raise CGCValueError(f"{name} must be {describe(kind)}; got {value!r}.")
    element_types = [args[0] if args else Any] * len(value) if variadic else list(args)
    items = [coerce(v, t, name) for v, t in zip(value, element_types)]
    return list(items) if typing.get_origin(kind) is list else tuple(items)


def _to_dict(value: Any, name: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise CGCValueError(
                f"{name} must be a JSON object such as '{{\"key\": 1}}'; got {value!r} ({err.msg})."
            ) from None
    if not isinstance(value, dict):
        raise CGCValueError(f"{name} must be a mapping (JSON object); got {value!r}.")
    return value
