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

Bodies it cannot see whole are refused, never passed on half-redacted (``incomplete: reject``,
the default; counted in ``extsvc_plugin_json_redact_incomplete_total`` and logged): a body over
``max_bytes`` and a BUFFERED_PARTIAL body cut at Envoy's buffer limit get 413 (a response: 502).
``incomplete: pass`` lets those through unchanged (counted as skipped).

Body modes: BUFFERED bodies are redacted as they come (extsvc then fixes ``content-length``,
docs/internals/envoy-behaviour.md §3.3). STREAMED and FULL_DUPLEX_STREAMED bodies are collected in
extsvc and sent on as one chunk at the end (``collect: extsvc``, the default); in
FULL_DUPLEX_STREAMED a body followed by trailers goes on before them, while in STREAMED the chunks
were already answered, so such a body is refused (500; a response: 502). ``collect: envoy`` asks
Envoy instead (``mode_override``, which needs ``allow_mode_override``) to buffer a STREAMED or
BUFFERED_PARTIAL body whole before sending it: Envoy then forwards nothing of a body extsvc has not
answered, even on a ``failure_mode_allow`` route whose extsvc fails mid-upload, and refuses bodies
over its buffer limit with 413. The processor reads the ``content-type`` of the directions it
redacts, so Envoy is never told to skip those headers.

Example::

    - plugin: json-redact
      config:
        request: [password, card.number]
        response: [users.*.email, token]
        action: mask          # or drop
        mask: "***"
        incomplete: reject    # or pass
        collect: extsvc       # or envoy
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


class Incomplete(StrEnum):
    REJECT = "reject"
    PASS = "pass"  # noqa: S105 (the word, not a password)


class Collect(StrEnum):
    EXTSVC = "extsvc"
    ENVOY = "envoy"


class JsonRedactConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request: list[str] = Field(default_factory=list, description="paths redacted in request bodies")
    response: list[str] = Field(default_factory=list, description="paths redacted in responses")
    action: Action = Action.MASK
    mask: Any = "***"
    max_bytes: int = Field(8 * 1024 * 1024, ge=1, description="larger bodies are incomplete")
    incomplete: Incomplete = Field(
        Incomplete.REJECT,
        description="a body it cannot see whole (over max_bytes, cut by Envoy's buffer limit): "
        "reject (413, a response 502) or pass (unchanged, counted as skipped)",
    )
    collect: Collect = Field(
        Collect.EXTSVC,
        description="who collects a STREAMED body: extsvc, or envoy (mode_override to BUFFERED)",
    )
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


class _CutShort(Exception):
    """A body that may have been cut short (BUFFERED_PARTIAL) does not parse."""


#: ``exchange.state`` value of a streamed body over max_bytes: its chunks pass as they come
_PASSING = object()


#: the status of a refused body, by direction and reason (a response's is always 502)
_REQUEST_STATUS = {"too-large": 413, "partial": 413, "trailers": 500}
#: seconds between two warnings of the same reason (the metric counts every one)
_WARN_EVERY_S = 10.0
_STREAMED = (BodyMode.STREAMED, BodyMode.FULL_DUPLEX_STREAMED)


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
        self._reject = config.incomplete is Incomplete.REJECT
        self._in_envoy = config.collect is Collect.ENVOY
        self._log = ctx.logger
        self._clock = ctx.clock
        self._warned: dict[str, float] = {}
        self._redacted = ctx.metrics.counter("json_redact_bodies", "Bodies json-redact changed")
        self._skipped = ctx.metrics.counter(
            "json_redact_skipped", "Bodies json-redact left alone (not JSON, too large)"
        )
        self._too_deep = ctx.metrics.counter(
            "json_redact_too_deep", "Bodies nested deeper than max_depth (answered per on_error)"
        )
        self._incomplete = ctx.metrics.counter(
            "json_redact_incomplete",
            "Bodies json-redact refused because it could not see them whole (incomplete: reject)",
        )
        bodies = frozenset(phase for phase, paths in self._paths.items() if paths)
        requests = Phase.REQUEST_BODY in bodies
        responses = Phase.RESPONSE_BODY in bodies
        # trailers: where a collected body that ends with trailers goes on (or is refused)
        self.phases = bodies | {
            trailers for trailers, wanted in
            ((Phase.REQUEST_TRAILERS, requests), (Phase.RESPONSE_TRAILERS, responses)) if wanted
        }
        # the content-type of what it redacts: Envoy must keep sending those headers
        self.reads = frozenset(
            headers for headers, wanted in
            ((Phase.REQUEST_HEADERS, requests), (Phase.RESPONSE_HEADERS, responses)) if wanted
        )
        self.whole_bodies = bodies if self._in_envoy else frozenset()

    async def on_request_body(self, message: HttpMessage, /) -> None:
        self._process(message)

    async def on_response_body(self, message: HttpMessage, /) -> None:
        self._process(message)

    async def on_request_trailers(self, message: HttpMessage, /) -> None:
        self._trailers(message)

    async def on_response_trailers(self, message: HttpMessage, /) -> None:
        self._trailers(message)

    def _process(self, message: HttpMessage) -> None:
        if not _is_json(message.headers.get("content-type")):
            return
        mode = message.body_mode
        if mode in _STREAMED:
            self._collect(message, mode)
            return
        body = message.body
        if len(body) > self._max:
            self._incomplete_body(message, "too-large")
            return
        # BUFFERED_PARTIAL without end_of_stream: cut at Envoy's buffer limit -- or whole, with
        # trailers to follow. A cut JSON document never parses; a whole one does.
        cut = mode is BodyMode.BUFFERED_PARTIAL and not message.end_of_stream
        try:
            redacted = self._redacted_body(message.phase, body, cut)
        except _CutShort:
            self._incomplete_body(message, "partial")
            return
        if redacted is not None:
            message.set_body(redacted)

    def _collect(self, message: HttpMessage, mode: BodyMode) -> None:
        """STREAMED / FULL_DUPLEX_STREAMED: hold the chunks back (answered empty) and send them
        on as one (redacted) chunk with the last one. Held memory stays under max_bytes."""
        key = (self, message.phase)
        state = message.exchange.state
        held = state.get(key)
        if held is _PASSING:
            return
        if held is None:
            held = state[key] = _Held()
            if self._in_envoy and mode is BodyMode.STREAMED:
                self._warn("not-buffered", "asked Envoy to buffer bodies (collect: envoy), but "
                           "got a STREAMED one: is allow_mode_override on? Collecting it in extsvc")
        held.parts.append(message.body)
        held.size += len(message.body)
        if held.size > self._max:
            state[key] = _PASSING
            if self._reject:
                self._incomplete_body(message, "too-large")
                return
            self._skipped.inc()  # incomplete: pass -- what was held goes on with this chunk
            message.set_body(b"".join(held.parts))
            return
        if not message.end_of_stream:
            message.set_body(b"")
            return
        whole = b"".join(held.parts)
        state[key] = _PASSING  # done
        message.set_body(self._redacted_body(message.phase, whole) or whole)

    def _trailers(self, message: HttpMessage) -> None:
        """Trailers end a body whose last chunk had no ``end_of_stream``: what was collected
        goes on before them (FULL_DUPLEX_STREAMED) or, in STREAMED, where the chunks were all
        answered already and a trailers answer carries no body, the message is refused."""
        body_phase = message.phase.body_phase
        state = message.exchange.state
        held = state.get((self, body_phase))
        if not isinstance(held, _Held) or not held.size:
            return
        state[(self, body_phase)] = _PASSING
        if message.body_mode is BodyMode.FULL_DUPLEX_STREAMED:
            whole = b"".join(held.parts)
            redacted = self._redacted_body(body_phase, whole)
            message.set_body(redacted or whole)
        else:
            self._incomplete_body(message, "trailers", always=True)

    def _incomplete_body(self, message: HttpMessage, reason: str, *, always: bool = False) -> None:
        """A body it cannot see whole: refused (``incomplete: reject``, or ``always`` when what
        was held back is lost anyway), else passed on unchanged and counted as skipped."""
        if not (self._reject or always):
            self._skipped.inc()
            return
        self._incomplete.inc()
        request = message.phase.is_request
        status = _REQUEST_STATUS[reason] if request else 502
        direction = "request" if request else "response"
        self._warn(reason, f"refused a {direction} body it could not see whole ({reason}): "
                   f"answered {status}")
        message.respond(status, f"{direction} body could not be inspected\n",
                        {"content-type": "text/plain"}, details=f"extsvc_json_redact_{reason}")

    def _warn(self, reason: str, text: str) -> None:
        now = self._clock()
        if now - self._warned.get(reason, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[reason] = now
            self._log.warning("json-redact %s", text)

    def _redacted_body(self, phase: Phase, body: bytes, cut: bool = False) -> bytes | None:
        """The redacted body, or ``None`` to leave it as it is.

        :raises _CutShort: ``cut`` (the body may be cut short) and it does not parse.
        """
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
            if cut:
                raise _CutShort from None
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
