"""Config values parsed to the types their dataclass fields declare.

Every key of a build config is a field of a frozen dataclass in
``builder.config``; its annotation is the contract. A value from a TOML file,
a ``--set`` override or a stored atlas config is turned into that type or
refused with one :class:`~builder.errors.ConfigError` line naming the key, the
value and the type expected. New keys get this for free: nothing here names a
key.

- ``bool``: TOML booleans, the integers 0 and 1, and the strings true/false,
  yes/no, 1/0 (any case);
- ``int``: integers (not booleans) and strings of digits, within 64 bits;
- ``float``: finite numbers and strings that read as one;
- ``str``: strings without NUL characters;
- ``tuple[X, ...]``: a list of X, or one X (``layers = "conv4"`` is one layer);
- ``dict[str, Any]``: a table only, holding strings, finite numbers,
  booleans, lists and tables (what an atlas's JSON meta can store);
- a dataclass: a table, its keys checked and parsed the same way;
- ``X | None``, ``Literal[...]`` and ``Any`` as Python reads them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from builder.errors import ConfigError

_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}
_INT = re.compile(r"[+-]?[0-9][0-9_]*")
INT64 = 2**63
MAX_SHOWN = 60  # characters of a refused value an error message shows


class _Refused(Exception):
    """A value that does not parse to the type tried (caught and reported here)."""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_table(cls: type, data: Any, prefix: str = "") -> dict[str, Any]:
    """``data`` (a table of config keys) as keyword arguments of dataclass
    ``cls``, every value parsed to its field's type; unknown keys, missing
    required keys and values of the wrong type raise ConfigError."""
    where = prefix.removesuffix(".")
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {where!r} = {_show(data)}: expected a table")
    types_ = field_types(cls)
    for key in data:
        if key not in types_:
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r} (valid keys: {', '.join(sorted(types_))})"
            )
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"config key {prefix + f.name!r} is required")
    return {key: parse_value(value, types_[key], prefix + key) for key, value in data.items()}


def parse_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` parsed to the type ``tp`` declared for config key ``key``."""
    try:
        return _parse(value, tp, key)
    except _Refused as why:
        detail = f" ({why})" if str(why) else ""
        raise ConfigError(f"config key {key!r} = {_show(value)}: expected {describe(tp)}{detail}") from None


def declared_type(root: type, parts: list[str]) -> Any:
    """The type declared for the dotted key ``parts`` below dataclass ``root``
    (list indexes step into a tuple's items), or None when the path leaves
    the dataclasses (an unknown key, or a key inside a backend's options)."""
    tp: Any = root
    for part in parts:
        if dataclasses.is_dataclass(tp):
            tp = field_types(tp).get(part)
        elif typing.get_origin(tp) is tuple and part.isdigit():
            tp = typing.get_args(tp)[0]
        else:
            return None
        if tp is None:
            return None
    return tp


def wants_text(tp: Any) -> bool:
    """Whether a bare ``--set`` word for a key of type ``tp`` should stay the
    text it was typed as (strings, and lists of strings given one word)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(wants_text(a) for a in args)
    return tp is str or origin is tuple and args[:1] == (str,)


def describe(tp: Any) -> str:
    """What a value of type ``tp`` looks like, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "a boolean (true/false, yes/no, 1/0)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin is tuple:
        item = args[0] if args else Any
        if dataclasses.is_dataclass(item):
            return "an array of tables ([[...]])"
        return f"a list of {_PLURALS.get(item, 'values')} (or {describe(item)})"
    if origin is dict or tp is dict:
        return "a table ({key = value, ...}) of strings, numbers, booleans, lists and tables"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _parse(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Refused
        if isinstance(value, tp):
            return value
        kwargs = parse_table(tp, value, key + ".")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is not type(None):
                try:
                    return _parse(value, option, key)
                except _Refused:
                    continue
        raise _Refused
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Refused
    if origin is tuple:
        return _parse_tuple(value, args, key)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Refused
        return _plain(value, key)
    parse = _SCALARS.get(tp)
    if parse is not None:
        return parse(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Refused
    return value


def _parse_tuple(value: Any, args: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    item = args[0] if args else Any
    if len(args) == 2 and args[1] is Ellipsis or not args:
        if isinstance(value, (list, tuple)):
            return tuple(_item(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        if isinstance(value, Mapping) or dataclasses.is_dataclass(item):
            raise _Refused
        return (_parse(value, item, key),)
    if not isinstance(value, (list, tuple)) or len(value) != len(args):  # a fixed-length tuple
        raise _Refused
    return tuple(_item(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))


def _item(value: Any, tp: Any, key: str) -> Any:
    """One element of a list: nested tables report their own keys."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} = {_show(value)}: expected a table")
        return _parse(value, tp, key)
    return _parse(value, tp, key)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _Refused


def _int(value: Any) -> int:
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Refused
    if not -INT64 <= value < INT64:
        raise _Refused("within 64 bits")
    return value


def _float(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Refused from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Refused
    try:
        out = float(value)
    except OverflowError:  # an integer too large for a float
        raise _Refused from None
    if not math.isfinite(out):
        raise _Refused
    return out


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused
    if "\x00" in value:
        raise _Refused("without NUL characters")
    return value


_SCALARS = {bool: _bool, int: _int, float: _float, str: _str}
_PLURALS = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}


def _plain(value: Any, key: str) -> Any:
    """A backend's options: JSON-able plain data, since the atlas stores its
    config as JSON and compares it to resume (NaN never equals itself)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"config key {key!r}: option names must be strings, got {_show(k)}")
            out[k] = _plain(v, f"{key}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} = {_show(value)}: expected a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise ConfigError(f"config key {key!r} = {_show(value)}: expected an integer within 64 bits")
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"config key {key!r}: strings may not hold NUL characters")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(
        f"config key {key!r} = {_show(value)}: a {type(value).__name__} cannot be stored in an atlas; "
        "quote it as a string"
    )


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > MAX_SHOWN:
        text = text[: MAX_SHOWN - 3] + "..."
    return " ".join(text.split())
