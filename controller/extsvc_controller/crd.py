"""The CEL rules (``x-kubernetes-validations``) of kgateway's CRDs, with the CRDs' own messages.

Each rule set is a function of one object's raw manifest data (camelCase keys as written, or
the snake_case field names), so that it runs even when other fields of the object fail their
schema: like the API server, every failing rule of a manifest is reported at once, not only the
first. :func:`validate` runs a rule set around pydantic's own validation of the object (a
``mode="wrap"`` model validator in :mod:`.model`) and reports both together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "Problem",
    "Rules",
    "at_least",
    "duration",
    "exactly_one",
    "format_errors",
    "get",
    "parse_duration",
    "validate",
]

_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

# A failing rule: (the field it is about, camelCase, or "" for the object itself; the message).
Problem = tuple[str, str]
Rules = Callable[[Mapping[str, Any]], list[Problem]]
_T = TypeVar("_T")


def parse_duration(text: str) -> timedelta:
    """A CRD duration (``1h30m``, ``250ms``) as a timedelta; ValueError if it is not one."""
    if len(text) > 32 or not _DURATION.match(text):
        raise ValueError("invalid timeout value")
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)


# --- reading raw data leniently: a value of the wrong type is pydantic's to report -----------------


def get(data: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Field ``name`` (snake_case) of raw data written with camelCase keys or snake_case names."""
    camel = to_camel(name)
    if camel in data:
        return data[camel]
    return data.get(name, default)


def duration(data: Mapping[str, Any], name: str, problems: list[Problem]) -> timedelta | None:
    """The duration in field ``name``, None when absent or not a string; a bad one is a problem."""
    value = get(data, name)
    if not isinstance(value, str):
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        problems.append((to_camel(name), str(exc)))
        return None


def at_least(
    data: Mapping[str, Any], name: str, minimum: timedelta, message: str, problems: list[Problem]
) -> None:
    """Field ``name`` is a duration of at least ``minimum`` (rule on the field itself)."""
    value = duration(data, name, problems)
    if value is not None and value < minimum:
        problems.append((to_camel(name), message))


def exactly_one(data: Mapping[str, Any], names: Iterable[str]) -> list[Problem]:
    names = tuple(names)
    if sum(get(data, n) is not None for n in names) == 1:
        return []
    wire = " ".join(to_camel(n) for n in names)
    return [("", f"exactly one of the fields in [{wire}] must be set")]


# --- running the rules together with pydantic ----------------------------------------------------


def _as_details(exc: ValidationError) -> list[InitErrorDetails]:
    return [
        InitErrorDetails(
            type=PydanticCustomError(e["type"], "{message}", {"message": e["msg"]}),
            loc=e["loc"],
            input=e["input"],
        )
        for e in exc.errors()
    ]


def _rule_details(problems: Iterable[Problem], data: Any) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    for where, message in problems:
        value = data.get(where) if where and isinstance(data, Mapping) else data
        out.append(
            InitErrorDetails(
                type=PydanticCustomError("crd_rule", "{message}", {"message": message}),
                loc=(where,) if where else (),
                input=value,
            )
        )
    return out


def validate(rules: Rules, data: Any, handler: Callable[[Any], _T], title: str) -> _T:
    """``handler(data)`` (pydantic's validation of one object), failing also when a rule fails;
    the errors of both are reported together, fields first, then the object's own rules."""
    problems = rules(data) if isinstance(data, Mapping) else []
    try:
        obj = handler(data)
    except ValidationError as exc:
        if not problems:
            raise
        details = _as_details(exc) + _rule_details(problems, data)
        raise ValidationError.from_exception_data(title, details) from None
    if problems:
        raise ValidationError.from_exception_data(title, _rule_details(problems, data))
    return obj


# --- messages ------------------------------------------------------------------------------------


_VALIDATOR_STEPS = {"function-after", "function-before", "function-wrap", "model-after", "model-wrap"}


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _VALIDATOR_STEPS or "[" in part:
            continue
        else:
            out += ("." if out else "") + part
    return out


def format_errors(exc: ValidationError) -> list[str]:
    """Pydantic errors as ``<field path>: <message>`` lines, with the CRD's wording."""
    lines = []
    for err in exc.errors():
        message = str(err["msg"]).removeprefix("Value error, ")
        where = _path(tuple(err["loc"]))
        lines.append(f"{where}: {message}" if where else message)
    return lines
