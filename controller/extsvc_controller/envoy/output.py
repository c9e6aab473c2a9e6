"""Output: proto-JSON dicts straight from the dataclasses, and their YAML."""

from __future__ import annotations

import base64
import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any as TAny

import betterproto2
import yaml
from envoy_data_plane.envoy.config.route.v3 import Route
from envoy_data_plane.google.protobuf import Any

from ..memo import Memo
from .packing import TypedAny

# Field kinds for the walker (betterproto2's proto types, grouped by how proto-JSON writes them).
_INT64 = {
    betterproto2.TYPE_INT64,
    betterproto2.TYPE_UINT64,
    betterproto2.TYPE_SINT64,
    betterproto2.TYPE_FIXED64,
    betterproto2.TYPE_SFIXED64,
}
_Convert = Callable[[TAny], tuple[TAny, bool]]  # value -> (plain value, is the default)


def _scalar(proto_type: str, field_type: TAny, unwrap: Callable[[], type] | None) -> _Convert:
    """How proto-JSON writes one value of this field (betterproto2's ``_value_to_dict``)."""
    if proto_type == betterproto2.TYPE_MESSAGE:
        if unwrap is not None:  # google.protobuf wrappers and Duration, held as Python values
            wrapper: TAny = unwrap()
            return lambda v: (wrapper.from_wrapped(v).to_dict(), False)
        return lambda v: (_plain(v), False)
    if proto_type in _INT64:
        return lambda v: (str(v), not v)
    if proto_type == betterproto2.TYPE_BYTES:
        return lambda v: (base64.b64encode(v).decode("utf8"), not v)
    if proto_type == betterproto2.TYPE_ENUM:

        def enum(v: TAny) -> tuple[TAny, bool]:
            member = field_type(v)
            return (member.proto_name or member.name or member.value), not v

        return enum
    if proto_type in (betterproto2.TYPE_FLOAT, betterproto2.TYPE_DOUBLE):
        return lambda v: (_float(v), not v)
    return lambda v: (v, not v)


def _float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


@functools.cache
def _plan(cls: type[betterproto2.Message]) -> tuple[tuple[str, str, str, _Convert, _Convert | None], ...]:
    """Per message class, once: (attribute, key, shape, value converter, map-key converter)."""
    hints: dict[str, TAny] = cls._type_hints()
    out: list[tuple[str, str, str, _Convert, _Convert | None]] = []
    for name, meta in cls._betterproto.meta_by_field_name.items():  # type: ignore[arg-type]
        key = name.rstrip("_")
        hint = hints[name]
        if meta.proto_type == betterproto2.TYPE_MAP:
            assert meta.map_meta is not None
            kmeta, vmeta = meta.map_meta
            out.append(
                (
                    name,
                    key,
                    "map",
                    _scalar(vmeta.proto_type, hint.__args__[1], vmeta.unwrap),
                    _scalar(kmeta.proto_type, hint.__args__[0], None),
                )
            )
        elif meta.repeated:
            out.append((name, key, "list", _scalar(meta.proto_type, hint.__args__[0], meta.unwrap), None))
        else:
            ftype = hint.__args__[0] if meta.optional else hint
            shape = "optional" if meta.optional else "single"
            out.append((name, key, shape, _scalar(meta.proto_type, ftype, meta.unwrap), None))
    return tuple(out)


#: while :func:`routes_memo` is active: Route objects already written (by id) -> (route, dict)
_ROUTES: Memo | None = None


@contextlib.contextmanager
def routes_memo(memo: Memo | None) -> Iterator[None]:
    """Write each Route object once across builds (the live controller reuses unchanged routes,
    see :mod:`..memo`); the dicts written are shared, so callers must not change them."""
    global _ROUTES
    previous, _ROUTES = _ROUTES, memo
    try:
        yield
    finally:
        _ROUTES = previous


def _plain(message: betterproto2.Message) -> TAny:
    """One message as proto-JSON with the proto field names, written straight from the dataclass.

    Gives what ``message.to_dict(casing=SNAKE)`` gives (same keys, same order, same defaults
    left out), but without serializing and re-parsing every ``Any`` (tests/controller compare it
    with betterproto2's own output).
    """
    cls = type(message)
    if cls is Route and _ROUTES is not None:
        hit = _ROUTES.get(id(message))
        if hit is not None and hit[0] is message:
            return hit[1]
        written = _fields(message, cls)
        _ROUTES.put(id(message), (message, written))
        return written
    if cls is TypedAny:
        assert isinstance(message, TypedAny)
        inner = message.message
        body = _plain(inner)
        if type(inner).to_dict is betterproto2.Message.to_dict:
            return {"@type": message.type_url, **body}
        return {"@type": message.type_url, "value": body}
    if cls.to_dict is not betterproto2.Message.to_dict:
        # Well-known types with their own JSON form (Struct, Value, Duration, wrappers, Any).
        if cls is Any and not message.type_url:  # type: ignore[attr-defined]
            return {}  # Envoy's YAML loader wants an empty Any written as {}
        return message.to_dict(casing=betterproto2.Casing.SNAKE)
    return _fields(message, cls)


def _fields(message: betterproto2.Message, cls: type[betterproto2.Message]) -> dict[str, TAny]:
    out: dict[str, TAny] = {}
    for name, key, shape, convert, convert_key in _plan(cls):
        value = getattr(message, name)
        if shape == "list":
            if value:
                out[key] = [convert(v)[0] for v in value]
        elif shape == "map":
            if value:
                assert convert_key is not None
                out[key] = {convert_key(k)[0]: convert(v)[0] for k, v in value.items()}
        elif value is not None:
            plain, default = convert(value)
            if shape == "optional" or not default:
                out[key] = plain
    return out


def to_dict(message: betterproto2.Message) -> dict[str, TAny]:
    """The message as proto-JSON with the proto field names (Envoy's YAML form)."""
    out: dict[str, TAny] = _plain(message)
    return out


# libyaml's emitter when PyYAML has it (~10x faster on a 3 MB bootstrap; the same text).
_Dumper: TAny = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_TAG = "tag:yaml.org,2002:"
_FLOATS = yaml.representer.SafeRepresenter()


def _node(data: TAny) -> yaml.Node:
    """The YAML node ``yaml.safe_dump(..., default_flow_style=False)`` would build for ``data``.

    Built directly: PyYAML's representer (alias tracking, a type lookup per value) was most of
    the render time. Block style everywhere; a long multi-line string as a ``|`` literal.
    """
    kind = type(data)
    if kind is str:
        style = "|" if "\n" in data and len(data) > 80 else None
        return yaml.ScalarNode(_TAG + "str", data, style=style)
    if kind is dict:
        return yaml.MappingNode(
            _TAG + "map", [(_node(k), _node(v)) for k, v in data.items()], flow_style=False
        )
    if kind is list:
        return yaml.SequenceNode(_TAG + "seq", [_node(v) for v in data], flow_style=False)
    if kind is bool:
        return yaml.ScalarNode(_TAG + "bool", "true" if data else "false")
    if kind is int:
        return yaml.ScalarNode(_TAG + "int", str(data))
    if data is None:
        return yaml.ScalarNode(_TAG + "null", "null")
    if kind is float:
        node: yaml.Node = _FLOATS.represent_float(data)
        return node
    raise TypeError(f"cannot write {kind.__name__} as YAML")


def to_yaml(data: TAny) -> str:
    text: str = yaml.serialize(_node(data), Dumper=_Dumper, width=110)
    return text
