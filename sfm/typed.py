"""Frozen dataclass trees from and to plain data (YAML's dicts, lists and scalars).

`from_dict` checks every key and value against the dataclasses' annotations and names the
full dotted key when one is wrong (`lm.temporal.dim: expected int, got str 'x'`); `to_dict`
writes plain data that `from_dict` turns back into an equal tree. A field typed
`tuple[tuple[str, X], ...]` (such as `mesh.rules`) is read from a mapping or a list of pairs
and written as a mapping when its names are unique. YAML itself is `sfm.config`'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from sfm.errors import ConfigError

T = TypeVar("T")

_NONE = type(None)
_MISSING = dataclasses.MISSING


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Builds dataclass `cls` from plain data, checking every key and value.

    `prefix` is the dotted name of this section, used in error messages. `None` means an
    empty section (all defaults).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        where = prefix or "<top level>"
        got = describe(data)
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {got}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in fields:
            raise ConfigError(f"{key}: unknown key{_did_you_mean(str(name), list(fields))}")
        kwargs[name] = _convert(hints[name], value, key)
    _check_required(fields, kwargs, prefix)
    return _construct(cls, kwargs)


def _construct(cls: type[T], kwargs: dict[str, Any]) -> T:
    """Calls `cls`; its own `__post_init__` checks (ValueError) become ConfigErrors."""
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _check_required(
    fields: dict[str, dataclasses.Field], kwargs: dict[str, Any], prefix: str
) -> None:
    for name, field in fields.items():
        has_default = field.default is not _MISSING or field.default_factory is not _MISSING
        if name not in kwargs and not has_default:
            raise ConfigError(f"{_join(prefix, name)}: missing required key")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """`value` checked against (and, where lossless, converted to) the annotation `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        return _convert_union(tp, value, key)
    if origin is typing.Literal:
        return _convert_literal(tp, value, key)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if origin in (tuple, list) or tp in (tuple, list):
        return _convert_sequence(tp, value, key)
    if origin is dict or tp is dict:
        return _convert_mapping(tp, value, key)
    return _convert_scalar(tp, value, key)


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    options = typing.get_args(tp)
    if value is None:
        if _NONE in options:
            return None
        raise _type_error(tp, value, key)
    concrete = [option for option in options if option is not _NONE]
    if len(concrete) == 1:
        return _convert(concrete[0], value, key)
    for option in concrete:
        try:
            return _convert(option, value, key)
        except ConfigError:
            continue
    raise _type_error(tp, value, key)


def _convert_literal(tp: Any, value: Any, key: str) -> Any:
    choices = typing.get_args(tp)
    if any(type(value) is type(choice) and value == choice for choice in choices):
        return value
    raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _convert_sequence(tp: Any, value: Any, key: str) -> tuple | list:
    """Lists or tuples; a mapping is accepted for a tuple of (name, value) pairs."""
    kind = typing.get_origin(tp) or tp
    if isinstance(value, Mapping) and _is_pair_tuple(tp):
        return _convert_pairs(tp, value, key)
    if not isinstance(value, (list, tuple)):
        raise _type_error(tp, value, key)
    item_types = _item_types(tp, len(value), key)
    items = [_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
    return tuple(items) if kind is tuple else items


def _item_types(tp: Any, length: int, key: str) -> list[Any]:
    args = typing.get_args(tp)
    if not args:
        return [Any] * length
    if typing.get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        return [args[0]] * length
    if args == ((),):  # tuple[()]
        args = ()
    if len(args) != length:
        raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {length}")
    return list(args)


def _convert_pairs(tp: Any, value: Mapping[Any, Any], key: str) -> tuple:
    name_type, item_type = typing.get_args(typing.get_args(tp)[0])
    return tuple(
        (_convert(name_type, name, key), _convert(item_type, item, f"{key}.{name}"))
        for name, item in value.items()
    )


def _convert_mapping(tp: Any, value: Any, key: str) -> dict:
    if not isinstance(value, Mapping):
        raise _type_error(tp, value, key)
    key_type, item_type = typing.get_args(tp) or (Any, Any)
    return {
        _convert(key_type, name, key): _convert(item_type, item, f"{key}.{name}")
        for name, item in value.items()
    }


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    """Exact types, except that an int is accepted for a float; bools are never numbers."""
    if typing.get_origin(tp) is not None or not isinstance(tp, type):
        raise TypeError(f"{key}: unsupported config annotation {tp!r}")
    if isinstance(value, bool) and tp is not bool:
        raise _type_error(tp, value, key)
    if tp is float and isinstance(value, int):
        return float(value)
    if isinstance(value, tp):
        return value
    raise _type_error(tp, value, key)


def _is_pair_tuple(tp: Any) -> bool:
    """Whether `tp` (or `tp | None`) is `tuple[tuple[str, X], ...]`."""
    concrete = [a for a in typing.get_args(tp) if a is not _NONE]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(concrete) == 1:
        tp = concrete[0]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is not tuple or len(args) != 2 or args[1] is not Ellipsis:
        return False
    pair = typing.get_args(args[0])
    return typing.get_origin(args[0]) is tuple and len(pair) == 2 and pair[0] is str


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars) that `from_dict` turns back into an equal config."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"{cfg!r} is not a dataclass instance")
    hints = typing.get_type_hints(type(cfg))
    return {
        f.name: _to_plain(getattr(cfg, f.name), hints[f.name])
        for f in dataclasses.fields(cfg)
        if f.init
    }


def _to_plain(value: Any, tp: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        if _is_pair_tuple(tp) and _unique_names(value):
            return {name: _to_plain(item, Any) for name, item in value}
        return [_to_plain(item, Any) for item in value]
    if isinstance(value, Mapping):
        return {name: _to_plain(item, Any) for name, item in value.items()}
    return value


def _unique_names(pairs: Sequence[tuple[str, Any]]) -> bool:
    names = [name for name, _ in pairs]
    return len(set(names)) == len(names)


def plain_defaults(cls: type) -> dict[str, Any]:
    """Plain-data defaults of `cls`'s fields; dataclass fields without a default recurse."""
    hints = typing.get_type_hints(cls)
    tree: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if field.default is not _MISSING:
            tree[field.name] = _to_plain(field.default, tp)
        elif field.default_factory is not _MISSING:
            tree[field.name] = _to_plain(field.default_factory(), tp)
        elif dataclasses.is_dataclass(tp):
            tree[field.name] = plain_defaults(tp)
    return tree


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" (expected one of: {', '.join(choices)})"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def describe(value: Any) -> str:
    """A value for an error message: its type and a repr cut to 60 characters."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_error(tp: Any, value: Any, key: str) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {describe(value)}")
