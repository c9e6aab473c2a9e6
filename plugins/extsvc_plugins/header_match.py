"""``header-match``: allow, deny or abstain by method, path and headers.

All conditions under ``match`` must hold for a match. Regexes must match the whole value (path
or header), are in RE2 syntax (what Envoy uses: matching time is linear in the input, whatever the
pattern) and are compiled at load time; a pattern RE2 refuses (backreferences, lookaround) fails
the config with the field named. ``path`` is matched without the query string.

Example::

    - plugin: header-match
      config:
        match:
          methods: [GET, HEAD]
          path: {prefix: /api/}
          headers:
            - {name: x-tenant, regex: "^[a-z]+$"}
        on_match: abstain
        on_no_match: deny
        reply: {status: 400, body: "bad tenant"}
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from extsvc import (
    AuthorizerType,
    CheckContext,
    Decision,
    HeaderName,
    HeaderValue,
    PluginContext,
    Re2Pattern,
    Re2Regex,
    hookimpl,
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PathMatch(_Model):
    """Exactly one of ``exact``, ``prefix``, ``regex`` (a full match, RE2 syntax)."""

    exact: str | None = None
    prefix: str | None = None
    regex: Re2Regex | None = None

    @model_validator(mode="after")
    def _one(self) -> PathMatch:
        if sum(v is not None for v in (self.exact, self.prefix, self.regex)) != 1:
            raise ValueError("set exactly one of exact, prefix, regex")
        return self


class HeaderCondition(_Model):
    """A header test: ``present`` (true/false), ``equals`` or ``regex`` (a full match, RE2)."""

    name: HeaderName
    present: bool | None = None
    equals: str | None = None
    regex: Re2Regex | None = None

    @model_validator(mode="after")
    def _one(self) -> HeaderCondition:
        if sum(v is not None for v in (self.present, self.equals, self.regex)) != 1:
            raise ValueError(f"header {self.name!r}: set exactly one of present, equals, regex")
        return self


class Match(_Model):
    methods: list[str] | None = None
    path: PathMatch | None = None
    headers: list[HeaderCondition] = Field(default_factory=list)


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ABSTAIN = "abstain"


class Reply(_Model):
    status: int = Field(403, ge=200, le=599)
    body: str = ""
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)


class HeaderMatchConfig(_Model):
    match: Match
    on_match: Action = Action.ALLOW
    on_no_match: Action = Action.ABSTAIN
    reply: Reply = Field(default_factory=Reply, description="the denial, when an action is deny")


class HeaderMatch:
    def __init__(self, config: HeaderMatchConfig, ctx: PluginContext) -> None:
        match = config.match
        self._methods = frozenset(m.upper() for m in match.methods) if match.methods else None
        self._path = match.path
        path_regex = match.path.regex if match.path else None
        self._path_regex = Re2Pattern(path_regex) if path_regex is not None else None
        self._headers = tuple(
            (h.name, h.present, h.equals, Re2Pattern(h.regex) if h.regex is not None else None)
            for h in match.headers
        )
        denial = Decision.deny(config.reply.status, config.reply.body, config.reply.headers)
        label = ctx.step
        self._results = {
            True: _result(config.on_match, denial, f"{label}: matched"),
            False: _result(config.on_no_match, denial, f"{label}: no match"),
        }

    def matches(self, request: CheckContext) -> bool:
        if self._methods is not None and request.method.upper() not in self._methods:
            return False
        path = self._path
        if path is not None:
            if path.exact is not None and request.path != path.exact:
                return False
            if path.prefix is not None and not request.path.startswith(path.prefix):
                return False
            if self._path_regex is not None and not self._path_regex.fullmatch(request.path):
                return False
        headers = request.headers
        for name, present, equals, regex in self._headers:
            value = headers.get(name)
            if present is not None:
                if (value is not None) != present:
                    return False
            elif (
                value is None
                or (equals is not None and value != equals)
                or (regex is not None and not regex.fullmatch(value))
            ):
                return False
        return True

    async def check(self, request: CheckContext, /) -> Decision | None:
        return self._results[self.matches(request)]


def _result(action: Action, denial: Decision, reason: str) -> Decision | None:
    if action is Action.ALLOW:
        return Decision.allow(reason=reason)
    if action is Action.DENY:
        return denial.with_reason(reason)
    return None


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="header-match",
        config_model=HeaderMatchConfig,
        factory=HeaderMatch,
        description="allow, deny or abstain by method, path (exact/prefix/regex) and headers",
    )
