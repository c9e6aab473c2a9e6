"""``jwt``: verify JSON Web Tokens against one or more identity providers.

Keys come from a JWKS URL or the ``jwks_uri`` of the issuer's OpenID Connect discovery document
(fetched in the background, never holding up start-up or a reload; cached for ``jwks_ttl_s``,
re-fetched at most once per ``jwks_min_refetch_interval_s`` when an unknown ``kid`` shows up, last
good key set kept while the endpoint is down, also across reloads; every fetch capped in bytes and
time by :func:`extsvc.fetch_json`), a JWKS file, inline PEM/JWK keys, or an HMAC secret file (HS*
algorithms only with an explicit secret; ``none`` never). While a provider has no keys yet, its
tokens are a step error (answered per the policy's ``on_error``). The provider is chosen by the token's
``iss``; its algorithm allow-list is checked before any key is looked at, and a key is only tried
with algorithms of its own type (an RSA key never verifies an HS256 or ES256 signature).
Verified tokens are cached by a hash of the token and never past their ``exp``.

This module is the step itself (verifying a token, answering, caching) and its registration; the
config models are in :mod:`extsvc_plugins.jwt_config` and the keys (parsing, fetching, refreshing)
in :mod:`extsvc_plugins.jwt_keys`.

Example::

    - plugin: jwt
      config:
        providers:
          - name: corp
            issuers: [https://idp.example.com]
            audiences: [orders-api]
            algorithms: [RS256, ES256]
            jwks_url: https://idp.example.com/.well-known/jwks.json
            claims:
              scope: {contains: [orders.read]}
        forward:
          headers: {x-user: sub}
          metadata: {user: sub}
        remove_credential: true
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from extsvc import (
    AuthorizerType,
    CheckContext,
    Decision,
    PluginContext,
    RemoteFetchMetrics,
    hookimpl,
)
from extsvc.credentials import (
    CredentialSource,
    TtlCache,
    credential_hash,
    find_credential,
    removal,
    tls_context,
)
from extsvc_plugins.jwt_config import (
    DEFAULT_JWKS_MAX_BYTES,
    WELL_KNOWN,
    Algorithm,
    CacheConfig,
    ClaimRule,
    JwtConfig,
    Provider,
    https_or_loopback,
    loopback_http,
)
from extsvc_plugins.jwt_keys import (
    DiscoveryRefused,
    KeySet,
    KeysUnavailable,
    RemoteJwks,
    VerificationKey,
    inline_key,
    read_jwks_file,
    remember_jwks,
    remembered_jwks,
)

# The step's config models and its key handling live in jwt_config and jwt_keys; their public
# names are re-exported so that ``from extsvc_plugins.jwt_auth import ...`` keeps working.
__all__ = [
    "DEFAULT_JWKS_MAX_BYTES",
    "WELL_KNOWN",
    "Algorithm",
    "CacheConfig",
    "ClaimRule",
    "DiscoveryRefused",
    "JwtAuthorizer",
    "JwtConfig",
    "KeySet",
    "KeysUnavailable",
    "Provider",
    "RemoteJwks",
    "VerificationKey",
    "extsvc_register_authorizers",
    "https_or_loopback",
    "loopback_http",
    "read_jwks_file",
]

log = logging.getLogger(__name__)

#: stripped allows remembered (remove_credential; a simple bound: the memo starts over when full)
_STRIPPED_KEPT = 10_000


class _Reject(Exception):
    def __init__(self, reason: str, status: int = 401, error: str = "invalid_token") -> None:
        self.reason = reason
        self.status = status
        self.error = error
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class _ProviderState:
    config: Provider
    keys: KeySet
    secret: bytes | None
    remote: RemoteJwks | None


class JwtAuthorizer:
    """A compiled ``jwt`` step (see the module docstring)."""

    def __init__(self, config: JwtConfig, ctx: PluginContext) -> None:
        self._config = config
        self._log = ctx.logger
        self._clock = ctx.clock
        self._client: httpx.AsyncClient | None = None
        self._cache: TtlCache[Decision] = TtlCache(
            config.cache.max_entries if config.cache.enabled else 0, ctx.clock
        )
        #: (id(decision), id(source)) -> (decision, the decision without the credential)
        self._stripped: dict[tuple[int, int], tuple[Decision, Decision]] = {}
        self._cache_hits = ctx.metrics.counter("jwt_cache_hits", "Tokens answered from the cache")
        self._rejected = ctx.metrics.counter("jwt_rejected", "Tokens rejected")
        fetch_metrics = RemoteFetchMetrics(ctx.metrics)
        self.identity_headers = config.forward.header_names()
        self._providers: list[_ProviderState] = []
        for provider in config.providers:
            fetch: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
            on_loaded: Callable[[Mapping[str, Any]], None] | None = None
            remote = None
            if provider.jwks_url is not None or provider.discovery:
                fetch = remote = RemoteJwks(provider, self._http, fetch_metrics, ctx.logger)
                on_loaded = functools.partial(remember_jwks, remote.source)
            elif provider.jwks_file is not None:
                path = ctx.resolve(provider.jwks_file)
                fetch = functools.partial(asyncio.to_thread, read_jwks_file, path)
            keys = KeySet(
                provider.name,
                fetch,
                provider.jwks_ttl_s,
                provider.jwks_min_refetch_interval_s,
                ctx.clock,
                ctx.logger,
                on_loaded,
            )
            if provider.jwks_file is not None:
                # A local key file is ours to get right: loaded here, so that `extsvc validate`
                # (which builds steps but never starts them) rejects what a reload would.
                try:
                    keys.load_jwks(read_jwks_file(path))
                except (OSError, ValueError) as exc:
                    raise ValueError(
                        f"provider {provider.name!r}: cannot load jwks_file {provider.jwks_file}: "
                        f"{getattr(exc, 'strerror', None) or exc}"
                    ) from exc
                keys.fetched_at = ctx.clock()
            secret = None
            if provider.hs_secret_file is not None:
                secret = ctx.read_secret_file(provider.hs_secret_file).strip()
                if len(secret) < 32:
                    raise ValueError(f"provider {provider.name!r}: the HS secret is shorter than 32 bytes")
            elif provider.keys:
                keys.set_static([inline_key(k) for k in provider.keys])
            self._providers.append(_ProviderState(provider, keys, secret, remote))
        self._by_issuer = {iss: state for state in self._providers for iss in state.config.issuers}
        realm = config.realm.replace('"', "").replace("\\", "")
        self._challenge = f'Bearer realm="{realm}"'
        self._missing = Decision.deny(
            401, headers={"www-authenticate": self._challenge}, reason="jwt: no token"
        )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(verify=tls_context())
        return self._client

    async def start(self) -> None:
        """Start fetching the remote key sets; wait at most ``startup_wait_s`` for them.

        Never holds up start-up or a reload for longer: a key set the same URL (or discovery
        document) served before a reload is used at once while it is refetched; one that is not
        loaded keeps being fetched in the background (with backoff), and until it is, tokens of
        that provider are step errors (answered per the policy's ``on_error``). A JWKS file was
        loaded when the step was built (one that cannot be loaded rejects the config).
        """
        first: list[asyncio.Task[bool]] = []
        for state in self._providers:
            if state.remote is None:
                continue
            remembered = remembered_jwks(state.remote.source)
            if remembered is not None and not len(state.keys):
                with contextlib.suppress(ValueError):
                    count = state.keys.load_jwks(remembered)
                    self._log.debug(
                        "provider %s: %d key(s) kept from before the reload, refetching",
                        state.config.name,
                        count,
                    )
            attempt = state.keys.start_loading()
            if attempt is not None and not len(state.keys):
                first.append(attempt)
        if first and self._config.startup_wait_s > 0:
            await asyncio.wait(first, timeout=self._config.startup_wait_s)

    async def aclose(self) -> None:
        """Cancel every background fetch, then close the HTTP client."""
        for state in self._providers:
            await state.keys.aclose()
        if self._client is not None:
            await self._client.aclose()

    def key_set(self, provider: str) -> KeySet:
        """The key set of a provider, by name (for tests and diagnostics)."""
        return next(s.keys for s in self._providers if s.config.name == provider)

    async def check(self, request: CheckContext, /) -> Decision | None:
        found = find_credential(request, self._config.sources)
        if found is None:
            if self._config.on_missing == "abstain":
                return None
            self._log.debug("jwt denied: no token [request_id=%s]", request.request_id)
            return self._missing
        token, source = found
        digest = credential_hash(token)
        cached = self._cache.get(digest)
        if cached is not None:
            self._cache_hits.inc()
            return self._strip(cached, request, source)
        try:
            decision, exp = await self._verify(token)
        except _Reject as reject:
            self._rejected.inc()
            self._log.info("jwt denied: %s [request_id=%s]", reject.reason, request.request_id)
            challenge = f'{self._challenge}, error="{reject.error}"'
            return Decision.deny(
                reject.status,
                headers={"www-authenticate": challenge},
                reason=f"jwt: {reject.reason}",
            )
        if exp is not None:
            # exp is wall-clock time; the cache runs on the (monotonic) step clock
            lifetime = min(exp - time.time(), self._config.cache.max_ttl_s)
            self._cache.put(digest, decision, self._clock() + lifetime)
        return self._strip(decision, request, source)

    def _strip(self, decision: Decision, request: CheckContext, source: CredentialSource) -> Decision:
        if not self._config.remove_credential:
            return decision
        if source.cookie is None:
            # A header or query credential is removed alike from every request: a cached
            # token's stripped allow is built once (keyed by the decision, which it keeps alive)
            key = (id(decision), id(source))
            kept = self._stripped.get(key)
            if kept is not None and kept[0] is decision:
                return kept[1]
        set_headers, remove, query_remove = removal(request, source)
        stripped = decision.merge(
            Decision.allow(upstream_set=set_headers, upstream_remove=remove, query_remove=query_remove)
        )
        if source.cookie is None:
            if len(self._stripped) >= _STRIPPED_KEPT:
                self._stripped.clear()
            self._stripped[key] = (decision, stripped)
        return stripped

    async def _verify(self, token: str) -> tuple[Decision, float | None]:
        if len(token) > self._config.max_token_bytes:
            raise _Reject(f"token longer than {self._config.max_token_bytes} bytes")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _Reject(f"malformed token: {exc}") from exc
        alg = header.get("alg")
        issuer = unverified.get("iss")
        state = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if state is None:
            raise _Reject(f"unknown issuer {str(issuer)[:100]!r}")
        provider = state.config
        if not isinstance(alg, str) or alg not in provider.algorithms:
            raise _Reject(f"algorithm {str(alg)[:20]!r} not allowed for provider {provider.name}")
        kid = header.get("kid")
        candidates: list[Any]
        if state.secret is not None:
            candidates = [state.secret]
        else:
            keys = await state.keys.candidates(str(kid) if kid is not None else None)
            candidates = [k.key for k in keys if k.fits(alg)]
            if not candidates:
                raise _Reject(
                    f"no {alg} key for kid {str(kid)[:64]!r} (provider {provider.name}, "
                    f"{len(state.keys)} key(s) loaded)"
                )
        options: dict[str, Any] = {"require": list(provider.required_claims)}
        if provider.allow_any_audience and not provider.audiences:
            options["verify_aud"] = False
        claims: dict[str, Any] | None = None
        last_error: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=provider.audiences or None,
                    issuer=provider.issuers,
                    leeway=provider.leeway_s,
                    options=options,  # type: ignore[arg-type]
                )
                break
            except jwt.InvalidSignatureError as exc:
                last_error = exc  # try the next key without kid
            except jwt.PyJWTError as exc:
                raise _Reject(_describe(exc)) from exc
        if claims is None:
            raise _Reject(_describe(last_error) if last_error else "bad signature")
        for name, rule in provider.claims.items():
            if not rule.holds(claims.get(name)):
                raise _Reject(f"claim {name!r} does not satisfy the policy", 403, "insufficient_scope")
        headers, metadata = self._config.forward.apply(claims)
        exp = claims.get("exp")
        decision = Decision.allow(
            upstream_set=headers,
            metadata=metadata,
            reason=f"jwt: {provider.name} sub={str(claims.get('sub', ''))[:64]}",
        )
        return decision, float(exp) if isinstance(exp, int | float) else None


def _describe(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid (nbf/iat in the future)"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim!r}"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    return f"invalid token: {exc}"


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="jwt",
        config_model=JwtConfig,
        factory=JwtAuthorizer,
        description="verify JWTs (JWKS URL/file, inline keys, HS secret) with claim rules",
    )
