"""``oauth2-introspection``: validate opaque tokens with an RFC 7662 introspection endpoint.

The server authenticates to the endpoint with client credentials (HTTP Basic, the secret read
from a mounted file). Active answers are cached by a hash of the token for ``cache_ttl_s``, never
past the token's ``exp``. The call is bounded by ``timeout_s`` and by the RPC's remaining deadline;
an unreachable endpoint is an error, answered per the policy's ``on_error``.

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

import time
from collections.abc import Iterator
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from extsvc import AuthorizerType, CheckContext, Decision, PluginContext, hookimpl
from extsvc.credentials import (
    BEARER,
    CredentialSource,
    Forward,
    TtlCache,
    credential_hash,
    find_credential,
    removal,
)


class IntrospectionConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str
    client_id: str
    client_secret_file: str
    sources: list[CredentialSource] = Field(default_factory=lambda: [BEARER], min_length=1)
    token_type_hint: str | None = "access_token"  # noqa: S105 (a hint name, not a secret)
    required_scopes: list[str] = Field(default_factory=list)
    forward: Forward = Field(default_factory=lambda: Forward(metadata={"sub": "sub"}))
    remove_credential: bool = False
    timeout_s: float = Field(2.0, gt=0, le=30)
    cache_ttl_s: float = Field(60.0, ge=0)
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
    def __init__(self, config: IntrospectionConfig, ctx: PluginContext) -> None:
        self._config = config
        self._log = ctx.logger
        self._clock = ctx.clock
        secret = ctx.read_secret_file(config.client_secret_file).decode("utf-8").strip()
        self._auth = httpx.BasicAuth(config.client_id, secret)
        self._client: httpx.AsyncClient | None = None
        self._cache: TtlCache[Decision] = TtlCache(config.cache_max_entries, ctx.clock)
        self._calls = ctx.metrics.counter("introspection_calls", "Calls to the endpoint")
        realm = config.realm.replace('"', "")
        self._challenge = f'Bearer realm="{realm}"'

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _deny(self, request: CheckContext, reason: str, error: str | None, status: int = 401) -> Decision:
        challenge = self._challenge + (f', error="{error}"' if error else "")
        if error:
            self._log.info("introspection denied: %s [request_id=%s]", reason, request.request_id)
        return Decision.deny(status, headers={"www-authenticate": challenge},
                             reason=f"oauth2-introspection: {reason}")

    async def check(self, request: CheckContext, /) -> Decision | None:
        found = find_credential(request, self._config.sources)
        if found is None:
            return None if self._config.on_missing == "abstain" else self._deny(request, "no token", None)
        token, source = found
        if len(token) > self._config.max_token_bytes:
            return self._deny(request, "token too long", "invalid_token")
        digest = credential_hash(token)
        decision = self._cache.get(digest)
        if decision is None:
            answer = await self._introspect(token)
            if answer.get("active") is not True:
                return self._deny(request, "token not active", "invalid_token")
            scopes = set(str(answer.get("scope", "")).split())
            missing = [s for s in self._config.required_scopes if s not in scopes]
            if missing:
                return self._deny(request, f"missing scope {missing[0]!r}", "insufficient_scope", 403)
            headers, metadata = self._config.forward.apply(answer)
            decision = Decision.allow(
                upstream_set=headers, metadata=metadata,
                reason=f"oauth2-introspection: sub={str(answer.get('sub', ''))[:64]}",
            )
            lifetime = self._config.cache_ttl_s
            exp = answer.get("exp")
            if isinstance(exp, int | float):
                lifetime = min(lifetime, exp - time.time())
            self._cache.put(digest, decision, self._clock() + lifetime)
        if self._config.remove_credential:
            set_headers, remove, query_remove = removal(request, source)
            decision = decision.merge(Decision.allow(
                upstream_set=set_headers, upstream_remove=remove, query_remove=query_remove))
        return decision

    async def _introspect(self, token: str) -> dict[str, Any]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._config.timeout_s)
        form = {"token": token}
        if self._config.token_type_hint:
            form["token_type_hint"] = self._config.token_type_hint
        self._calls.inc()
        # The step runs under the RPC's deadline: if that is shorter than timeout_s, the
        # pipeline cancels this call and answers per on_error.
        response = await self._client.post(
            self._config.endpoint, data=form, auth=self._auth,
            headers={"accept": "application/json"},
        )
        response.raise_for_status()
        answer = response.json()
        if not isinstance(answer, dict):
            raise ValueError("introspection answer is not a JSON object")
        return answer


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="oauth2-introspection",
        config_model=IntrospectionConfig,
        factory=Introspection,
        description="RFC 7662 token introspection with client credentials and a capped cache",
    )
