"""``oauth2-introspection``: validate opaque tokens with an RFC 7662 introspection endpoint.

The server authenticates to the endpoint with client credentials (HTTP Basic with the
form-encoded id and secret, RFC 6749 §2.3.1; the secret read from a mounted file). A token is
allowed when the answer says ``"active": true``, its ``exp`` (if any) has not passed, and it has
the ``required_scopes`` and one of the ``audiences`` (if configured). Active answers are cached by
a hash of the token for ``cache_ttl_s``, never past the token's ``exp``; inactive ones for
``inactive_cache_ttl_s``, so a client repeating a bad token does not turn into a stream of calls
to the IdP. The call is bounded by ``timeout_s`` (a hard deadline for the whole call, however
slowly the answer drips in), by ``max_response_bytes`` (reading stops there) and by the RPC's
remaining deadline (the policy cancels a step that overruns it); an unreachable endpoint, an error
status, an answer too large or too slow is a step error, answered per the policy's ``on_error``.

Example::

    - plugin: oauth2-introspection
      config:
        endpoint: https://idp.example.com/oauth2/introspect
        client_id: gateway
        client_secret_file: /etc/extsvc/idp/client-secret
        required_scopes: [orders.read]
        forward: {headers: {x-user: sub}, metadata: {user: sub}}
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import quote_plus

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from extsvc import (
    AuthorizerType,
    CheckContext,
    Decision,
    PluginContext,
    RemoteFetchError,
    RemoteFetchMetrics,
    RemoteTooLarge,
    fetch_json,
    hookimpl,
)
from extsvc.credentials import (
    BEARER,
    CredentialSource,
    Forward,
    TtlCache,
    credential_hash,
    find_credential,
    removal,
    tls_context,
)

#: Default cap of an introspection answer: RFC 7662 answers are a few hundred bytes (a few KiB
#: with long scope or group lists); 256 KiB is ample, and at most 100 calls are in flight at once
#: (httpx's connection pool), so answers never hold more than 25 MiB even under a flood.
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024


class IntrospectionConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str
    client_id: str
    client_secret_file: str
    sources: list[CredentialSource] = Field(default_factory=lambda: [BEARER], min_length=1)
    token_type_hint: str | None = "access_token"  # noqa: S105 (a hint name, not a secret)
    required_scopes: list[str] = Field(default_factory=list)
    audiences: list[str] = Field(default_factory=list, description="if set, aud must hold one")
    forward: Forward = Field(default_factory=lambda: Forward(metadata={"sub": "sub"}))
    remove_credential: bool = False
    timeout_s: float = Field(2.0, gt=0, le=30, description="hard deadline of a call, body included")
    max_response_bytes: int = Field(
        DEFAULT_MAX_RESPONSE_BYTES, ge=1024, le=16 * 1024 * 1024,
        description="longest answer read; reading stops there and the call is an error",
    )
    cache_ttl_s: float = Field(60.0, ge=0)
    inactive_cache_ttl_s: float = Field(5.0, ge=0)
    cache_max_entries: int = Field(10_000, ge=0)
    max_token_bytes: int = Field(8192, ge=16)
    on_missing: Literal["deny", "abstain"] = "deny"
    realm: str = "extsvc"

    @field_validator("endpoint")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("endpoint must be an http(s) URL")
        return value


class Introspection:
    """A compiled ``oauth2-introspection`` step (see the module docstring)."""

    def __init__(self, config: IntrospectionConfig, ctx: PluginContext) -> None:
        self._config = config
        self._log = ctx.logger
        self._clock = ctx.clock
        secret = ctx.read_secret_file(config.client_secret_file).decode("utf-8").strip()
        # RFC 6749 §2.3.1: id and secret are form-encoded before they are joined for Basic
        pair = f"{quote_plus(config.client_id)}:{quote_plus(secret)}".encode()
        self._authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        self._client: httpx.AsyncClient | None = None
        self._inflight: dict[bytes, asyncio.Task[dict[str, Any]]] = {}
        self._cache: TtlCache[Decision] = TtlCache(config.cache_max_entries, ctx.clock)
        self._calls = ctx.metrics.counter("introspection_calls", "Calls to the endpoint")
        self._fetches = RemoteFetchMetrics(ctx.metrics)
        self._form_headers = {"authorization": self._authorization}
        self.identity_headers = config.forward.header_names()
        realm = config.realm.replace('"', "").replace("\\", "")
        self._challenge = f'Bearer realm="{realm}"'
        self._missing = Decision.deny(
            401, headers={"www-authenticate": self._challenge}, reason="oauth2-introspection: no token"
        )

    async def start(self) -> None:
        # The client (and the CA bundle it loads, ~40 ms the first time) is built here, off the
        # event loop, so the first request does not stall every other one while it is made.
        if self._client is None:
            self._client = httpx.AsyncClient(verify=await asyncio.to_thread(tls_context))

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()

    async def check(self, request: CheckContext, /) -> Decision | None:
        found = find_credential(request, self._config.sources)
        if found is None:
            if self._config.on_missing == "abstain":
                return None
            self._log.debug("introspection denied: no token [request_id=%s]", request.request_id)
            return self._missing
        token, source = found
        if len(token) > self._config.max_token_bytes:
            self._log.info("introspection denied: token too long [request_id=%s]", request.request_id)
            return self._denial(f"token longer than {self._config.max_token_bytes} bytes",
                                "invalid_token")
        digest = credential_hash(token)
        decision = self._cache.get(digest)
        if decision is None:
            answer = await self._shared_introspection(digest, token)
            decision = self._judge(answer)
            self._cache.put(digest, decision, self._clock() + self._lifetime(decision, answer))
        if not decision.allowed:
            self._log.info("introspection denied: %s [request_id=%s]",
                           decision.reason.removeprefix("oauth2-introspection: "), request.request_id)
            return decision
        if self._config.remove_credential:
            set_headers, remove, query_remove = removal(request, source)
            decision = decision.merge(Decision.allow(
                upstream_set=set_headers, upstream_remove=remove, query_remove=query_remove))
        return decision

    def _judge(self, answer: dict[str, Any]) -> Decision:
        """The decision for one introspection answer (cached as it is)."""
        if answer.get("active") is not True:
            return self._denial("token not active", "invalid_token")
        expires = _expiry(answer)
        if expires is not None and expires <= time.time():
            return self._denial("token expired", "invalid_token")
        scopes = set(str(answer.get("scope", "")).split())
        missing = [s for s in self._config.required_scopes if s not in scopes]
        if missing:
            return self._denial(f"missing scope {missing[0]!r}", "insufficient_scope", 403)
        if self._config.audiences:
            aud = answer.get("aud")
            held = {str(a) for a in aud} if isinstance(aud, list) else {str(aud)}
            if not held & set(self._config.audiences):
                return self._denial("wrong audience", "invalid_token")
        headers, metadata = self._config.forward.apply(answer)
        return Decision.allow(
            upstream_set=headers, metadata=metadata,
            reason=f"oauth2-introspection: sub={str(answer.get('sub', ''))[:64]}",
        )

    def _denial(self, reason: str, error: str, status: int = 401) -> Decision:
        return Decision.deny(
            status, headers={"www-authenticate": f'{self._challenge}, error="{error}"'},
            reason=f"oauth2-introspection: {reason}",
        )

    def _lifetime(self, decision: Decision, answer: dict[str, Any]) -> float:
        """How long an answer is reused: its TTL, and an allow never past the token's ``exp``."""
        if not decision.allowed:
            return self._config.inactive_cache_ttl_s
        expires = _expiry(answer)
        ttl = self._config.cache_ttl_s
        return ttl if expires is None else min(ttl, expires - time.time())

    async def _shared_introspection(self, digest: bytes, token: str) -> dict[str, Any]:
        """One call per token at a time: concurrent requests with the same token share it.

        The call is a task of its own, so a request cancelled at its deadline does not cancel
        it for the others (it still ends by ``timeout_s``).
        """
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._introspect(token))
            self._inflight[digest] = task
            task.add_done_callback(functools.partial(self._settled, digest))
        return await asyncio.shield(task)

    def _settled(self, digest: bytes, task: asyncio.Task[dict[str, Any]]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, so a call nobody waits for any more is quiet

    async def _introspect(self, token: str) -> dict[str, Any]:
        if self._client is None:
            self._client = httpx.AsyncClient(verify=tls_context())
        form = {"token": token}
        if self._config.token_type_hint:
            form["token_type_hint"] = self._config.token_type_hint
        self._calls.inc()
        # A task of its own (see _shared_introspection), ended by timeout_s however slowly the
        # answer drips in; the request waiting for it is also cut off at its own deadline.
        try:
            return await fetch_json(
                self._client, "POST", self._config.endpoint, data=form, headers=self._form_headers,
                max_bytes=self._config.max_response_bytes, timeout_total_s=self._config.timeout_s,
                metrics=self._fetches,
            )
        except RemoteFetchError as exc:
            hint = " (raise max_response_bytes if answers really are this large)" if isinstance(
                exc, RemoteTooLarge) else ""
            self._log.log(
                logging.WARNING if exc.reason in ("too-large", "timeout") else logging.INFO,
                "introspection call failed: %s%s", exc, hint,
            )
            raise


def _expiry(answer: dict[str, Any]) -> float | None:
    exp = answer.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="oauth2-introspection",
        config_model=IntrospectionConfig,
        factory=Introspection,
        description="RFC 7662 token introspection with client credentials and a capped cache",
    )
