"""``json-redact`` (ext_proc processor): mask or drop JSON fields in request or response bodies.

Paths are dotted (``user.password``); ``*`` matches every key of an object or item of a list,
a number indexes a list, and a name applied to a list applies to each item
(``items.card`` = ``items.*.card``). Bodies whose ``content-type`` is not JSON (``application/json``
or ``*/*+json``), or that do not parse, pass unchanged (counted in
``extsvc_plugin_json_redact_skipped_total``).

Works on BUFFERED bodies (extsvc then fixes ``content-length``, envoy-protocols.md §2.3) and on
STREAMED / FULL_DUPLEX_STREAMED ones, which it collects and sends on as one chunk at the end
(do not use it on bodies followed by trailers in those modes). Configure Envoy's body mode for
the direction(s) you redact.

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
from collections.abc import Iterator
from enum import StrEnum
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

    @field_validator("request", "response")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"invalid path {path!r}: use dotted names, e.g. user.password")
        return paths


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


class JsonRedact(Processor):
    def __init__(self, config: JsonRedactConfig, ctx: PluginContext) -> None:
        self._paths = {
            Phase.REQUEST_BODY: [p.split(".") for p in config.request],
            Phase.RESPONSE_BODY: [p.split(".") for p in config.response],
        }
        self._action = config.action
        self._mask = config.mask
        self._max = config.max_bytes
        self._redacted = ctx.metrics.counter("json_redact_bodies", "Bodies json-redact changed")
        self._skipped = ctx.metrics.counter(
            "json_redact_skipped", "Bodies json-redact left alone (not JSON, too large)"
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
            # Collect the chunks; send them on as one (redacted) chunk with the last one.
            key = (self, message.phase)
            parts: list[bytes] = message.exchange.state.setdefault(key, [])
            parts.append(message.body)
            if not message.end_of_stream:
                message.set_body(b"")
                return
            whole = b"".join(parts)
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
        try:
            document = json.loads(body)
        except ValueError:  # also UnicodeDecodeError
            self._skipped.inc()
            return None
        changed = False
        for parts in self._paths[phase]:
            changed |= _redact(document, parts, self._action, self._mask)
        if not changed:
            return None
        self._redacted.inc()
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


@hookimpl
def extsvc_register_processors() -> Iterator[ProcessorType[Any]]:
    yield ProcessorType(
        name="json-redact",
        config_model=JsonRedactConfig,
        factory=JsonRedact,
        description="mask or drop JSON fields in request or response bodies",
    )
