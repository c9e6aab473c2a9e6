"""Annotated field types for configuration models (the server's and plugins').

Use them in a plugin's pydantic config so that bad header names fail at load time, with the field
named, instead of turning into a 500 from Envoy's ``validate_mutations`` at request time.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_TOKEN = re.compile(r"^:?[!#$%&'*+\-.^_`|~0-9a-z]+$")


def _header_name(name: str) -> str:
    lowered = name.strip().lower()
    if not _TOKEN.match(lowered):
        raise ValueError(f"invalid header name {name!r}")
    return lowered


def _header_value(value: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("header values must not contain CR, LF or NUL")
    return value


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
    return pattern


#: A header name: lower-cased, an HTTP token (pseudo-headers such as ``:path`` allowed).
HeaderName = Annotated[str, AfterValidator(_header_name)]
#: A header value without CR, LF or NUL.
HeaderValue = Annotated[str, AfterValidator(_header_value)]
#: A Python regular expression, compiled once at load time to prove it is valid.
Regex = Annotated[str, AfterValidator(_regex)]
