"""Annotated field types for configuration models (the server's and plugins').

Use them in a plugin's pydantic config so that bad header names fail at load time, with the field
named, instead of turning into a 500 from Envoy's ``validate_mutations`` at request time.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import re2
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
#: Backtracking: use :data:`Re2Regex` for patterns matched against request data.
Regex = Annotated[str, AfterValidator(_regex)]


class Re2Pattern:
    """A pattern compiled by RE2 (google-re2, the engine Envoy uses): matching takes time linear
    in the input whatever the pattern, so a pattern such as ``(a+)+$`` cannot be made to
    backtrack for seconds by a crafted header.

    RE2 refuses what needs backtracking (backreferences, lookahead and lookbehind) and spells a
    few things differently from Python's ``re``: ``\\z`` (not ``\\Z``) for the end of the text;
    ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only. Only whether the pattern matches is
    answered (no groups), through RE2's binding directly: the ``re2`` module's ``re``-like
    wrapper costs about 4 us more per call.
    """

    __slots__ = ("_regexp", "pattern")

    _BOTH = re2._re2.RE2.Anchor.ANCHOR_BOTH
    _NONE = re2._re2.RE2.Anchor.UNANCHORED

    def __init__(self, pattern: str) -> None:
        options = re2.Options()
        options.log_errors = False  # the error is raised (and named by the config loader)
        options.never_capture = True
        regexp = re2._re2.RE2(pattern.encode("utf-8", "surrogatepass"), options)
        if not regexp.ok():
            raise re2.error(regexp.error())
        self.pattern = pattern
        self._regexp: Any = regexp

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches."""
        data = text.encode("utf-8", "surrogatepass")
        return bool(self._regexp.Match(self._BOTH, data, 0, len(data))[0][0] >= 0)

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text``."""
        data = text.encode("utf-8", "surrogatepass")
        return bool(self._regexp.Match(self._NONE, data, 0, len(data))[0][0] >= 0)

    def __repr__(self) -> str:
        return f"Re2Pattern({self.pattern!r})"


def _re2_regex(pattern: str) -> str:
    try:
        Re2Pattern(pattern)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise ValueError(
            f"invalid regular expression {pattern!r} (RE2 syntax): {detail}; RE2 matches in "
            "linear time, so it has no backreferences and no lookahead/lookbehind (and \\z, "
            "not \\Z, for the end of the text)"
        ) from None
    return pattern


#: A regular expression in RE2 syntax (linear-time matching, what Envoy uses), checked at load
#: time; compile it with :class:`Re2Pattern`.
Re2Regex = Annotated[str, AfterValidator(_re2_regex)]
