"""``json-redact`` (ext_proc processor): mask or drop JSON fields in request or response bodies.

Paths are dotted (``user.password``); ``*`` matches every key of an object or item of a list,
a number indexes a list, and a name applied to a list applies to each item
(``items.card`` = ``items.*.card``). Bodies whose ``content-type`` is not JSON (``application/json``
or ``*/*+json``), or that do not parse, pass unchanged (counted in
``extsvc_plugin_json_redact_skipped_total``).

What is not redacted keeps its value: numbers keep the text they were written as (``1e400``
stays ``1e400``, not ``Infinity``; ``0.10000000000000000001`` keeps its digits; integers are
exact), strings their content (escapes may be written differently); whitespace between tokens goes.
A document nested deeper than ``max_depth`` (default 128) fails the processor, answered per the
policy's ``on_error`` (counted in ``extsvc_plugin_json_redact_too_deep_total``); it is found by a
scan of the raw bytes before parsing, so no depth reaches Python's recursion limit.

Works on BUFFERED bodies (extsvc then fixes ``content-length``, docs/internals/envoy-behaviour.md §3.3) and on
STREAMED / FULL_DUPLEX_STREAMED ones, which it collects and sends on as one chunk at the end
(do not use it on bodies followed by trailers in those modes); past ``max_bytes`` it stops
collecting: what it held goes on with that chunk, the rest as it comes (unredacted, counted as
skipped). With ``on_error: continue``, a failure on the last chunk of a collected body sends only
that chunk (the earlier ones were answered empty): use ``on_error: fail`` there. Configure
Envoy's body mode for the direction(s) you redact.

Example::

    - plugin: json-redact
      config:
        request: [password, card.number]
        response: [users.*.email, token]
        action: mask          # or drop
        mask: "***"
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from enum import StrEnum
from itertools import accumulate
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extsvc import BodyMode, HttpMessage, Phase, PluginContext, Processor, ProcessorType, hookimpl


class Action(StrEnum):
    MASK = "mask"
    DROP = "drop"


class JsonRedactConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request: list[str] = Field(default_factory=list, description="paths redacted in request bodies")
    response: list[str] = Field(default_factory=list, description="paths redacted in responses")
    action: Action = Action.MASK
    mask: Any = "***"
    max_bytes: int = Field(8 * 1024 * 1024, ge=1, description="larger bodies pass unchanged")
    max_depth: int = Field(
        128, ge=1, le=512, description="deeper documents fail the processor (the policy's on_error)"
    )

    @field_validator("mask")
    @classmethod
    def _mask(cls, mask: Any) -> Any:
        try:
            json.dumps(mask, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"mask must be a JSON value (no NaN or infinity): {exc}") from None
        return mask

    @field_validator("request", "response")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"invalid path {path!r}: use dotted names, e.g. user.password")
        return paths


class JsonTooDeep(Exception):
    """A body nested deeper than ``max_depth``: the processor fails (the policy's on_error)."""


class _Number:
    """A JSON number that is not an integer (or NaN/Infinity, which Python's parser accepts),
    kept as the text it was written as: as a float, ``1e400`` would go back out as ``Infinity``
    (not JSON) and ``0.10000000000000000001`` as ``0.1``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _loads(body: bytes) -> Any:
    return json.loads(body, parse_float=_Number, parse_constant=_Number)


def _dumps(document: Any) -> bytes:
    """``document`` as compact JSON, each :class:`_Number` written as its original text."""
    nonce = secrets.token_hex(8)  # the marker of a number, unguessable (2^-64) in the content
    numbers = False

    def number(value: object) -> str:
        nonlocal numbers
        if type(value) is not _Number:
            raise TypeError(f"{type(value).__name__} is not JSON")
        numbers = True
        return f"{nonce}{value.text}{nonce}"  # written "<nonce>1e400<nonce>" with the quotes

    text = json.dumps(
        document, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=number
    )
    if numbers:
        text = text.replace(f'"{nonce}', "").replace(f'{nonce}"', "")
    return text.encode()


# The depth scan: the body reduced to its brackets (strings, where brackets do not count, taken
# out first), then a running sum of +1 per opening and -1 per closing one, all in C (bytes
# methods, itertools): a few milliseconds for a MiB, and no recursion whatever the depth.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_STRING = re.compile(rb'"[^"]*"')
_SIGNED = bytes.maketrans(b'[{]}"', b"\x01\x01\xff\xff\x00")  # as signed bytes: +1, -1, 0


def _too_deep(body: bytes, limit: int) -> bool:
    """Whether the JSON text ``body`` nests arrays and objects deeper than ``limit``."""
    if body.count(b"[") + body.count(b"{") <= limit:  # cannot be deeper: no scan
        return False
    if b"\\" in body:  # escapes: of a backslash first, then of a quote (never a string's end)
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in skeleton:  # strings that held brackets: drop them with their brackets
        skeleton = _STRING.sub(b"", skeleton)  # (a stray quote left is not JSON: counts 0)
    depths = accumulate(memoryview(skeleton.translate(_SIGNED)).cast("b"))
    return next(filter(limit.__lt__, depths), None) is not None


def _redact(node: Any, parts: list[str], action: Action, mask: Any) -> bool:
    """Apply one path (split on dots) to ``node`` in place; whether anything changed."""
    head, rest = parts[0], parts[1:]
    targets: list[Any]
    if isinstance(node, list):
        if head == "*":
            targets = list(range(len(node)))
        elif head.isdigit():
            targets = [int(head)] if int(head) < len(node) else []
        else:  # a name applied to a list applies to each item
            results = [_redact(item, parts, action, mask) for item in node]
            return any(results)
    elif isinstance(node, dict):
        targets = list(node) if head == "*" else [head] if head in node else []
    else:
        return False
    if not targets:
        return False
    if rest:
        results = [_redact(node[target], rest, action, mask) for target in targets]
        return any(results)
    if action is Action.DROP:
        for target in sorted(targets, reverse=True) if isinstance(node, list) else targets:
            del node[target]
    else:
        for target in targets:
            node[target] = mask
    return True


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True  # headers not sent to extsvc: try to parse
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class _Held:
    """A streamed body's chunks held back so far (``exchange.state``, per processor and phase)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0


#: ``exchange.state`` value of a streamed body over max_bytes: its chunks pass as they come
_PASSING = object()


class JsonRedact(Processor):
    def __init__(self, config: JsonRedactConfig, ctx: PluginContext) -> None:
        self._paths = {
            Phase.REQUEST_BODY: [p.split(".") for p in config.request],
            Phase.RESPONSE_BODY: [p.split(".") for p in config.response],
        }
        self._action = config.action
        self._mask = config.mask
        self._max = config.max_bytes
        self._max_depth = config.max_depth
        self._redacted = ctx.metrics.counter("json_redact_bodies", "Bodies json-redact changed")
        self._skipped = ctx.metrics.counter(
            "json_redact_skipped", "Bodies json-redact left alone (not JSON, too large)"
        )
        self._too_deep = ctx.metrics.counter(
            "json_redact_too_deep", "Bodies nested deeper than max_depth (answered per on_error)"
        )
        self.phases = frozenset(phase for phase, paths in self._paths.items() if paths)

    async def on_request_body(self, message: HttpMessage, /) -> None:
        self._process(message)

    async def on_response_body(self, message: HttpMessage, /) -> None:
        self._process(message)

    def _process(self, message: HttpMessage) -> None:
        if not _is_json(message.headers.get("content-type")):
            return
        mode = message.body_mode
        if mode in (BodyMode.STREAMED, BodyMode.FULL_DUPLEX_STREAMED):
            # Collect the chunks; send them on as one (redacted) chunk with the last one. Past
            # max_bytes the body passes unchanged: what was held back goes on with this chunk,
            # and later chunks as they come (held memory stays under max_bytes per stream).
            key = (self, message.phase)
            state = message.exchange.state
            held = state.get(key)
            if held is _PASSING:
                return
            if held is None:
                held = state[key] = _Held()
            held.parts.append(message.body)
            held.size += len(message.body)
            if held.size > self._max:
                state[key] = _PASSING
                self._skipped.inc()
                message.set_body(b"".join(held.parts))
                return
            if not message.end_of_stream:
                message.set_body(b"")
                return
            whole = b"".join(held.parts)
            message.set_body(self._redacted_body(message.phase, whole) or whole)
            return
        redacted = self._redacted_body(message.phase, message.body)
        if redacted is not None:
            message.set_body(redacted)

    def _redacted_body(self, phase: Phase, body: bytes) -> bytes | None:
        """The redacted body, or ``None`` to leave it as it is."""
        if not body or len(body) > self._max:
            if body:
                self._skipped.inc()
            return None
        if _too_deep(body, self._max_depth):
            self._too_deep.inc()
            raise JsonTooDeep(f"JSON body nested deeper than max_depth={self._max_depth}")
        try:
            document = _loads(body)
        except ValueError:  # also UnicodeDecodeError
            self._skipped.inc()
            return None
        changed = False
        for parts in self._paths[phase]:
            changed |= _redact(document, parts, self._action, self._mask)
        if not changed:
            return None
        self._redacted.inc()
        return _dumps(document)


@hookimpl
def extsvc_register_processors() -> Iterator[ProcessorType[Any]]:
    yield ProcessorType(
        name="json-redact",
        config_model=JsonRedactConfig,
        factory=JsonRedact,
        description="mask or drop JSON fields in request or response bodies",
    )
