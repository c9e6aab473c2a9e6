"""``jwt``: verify JSON Web Tokens against one or more identity providers.

Keys come from a JWKS URL (fetched asynchronously, cached for ``jwks_ttl_s``, re-fetched at most
once per ``jwks_min_refetch_interval_s`` when an unknown ``kid`` shows up, last good key set kept
while the endpoint is down), a JWKS file, inline PEM/JWK keys, or an HMAC secret file (HS*
algorithms only with an explicit secret; ``none`` never). The provider is chosen by the token's
``iss``; its algorithm allow-list is checked before any key is looked at, and a key is only tried
with algorithms of its own type (an RSA key never verifies an HS256 or ES256 signature).
Verified tokens are cached by a hash of the token and never past their ``exp``.

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
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, model_validator

from extsvc import AuthorizerType, CheckContext, Decision, PluginContext, hookimpl
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

log = logging.getLogger(__name__)

Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
]
_HMAC = frozenset({"HS256", "HS384", "HS512"})
#: The key type each asymmetric algorithm needs (pyjwt raises TypeError on a mismatch, so a
#: token whose header names another family must never reach jwt.decode with that key).
_KEY_TYPES: dict[str, tuple[type[Any], ...]] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), (RSAPublicKey,)),
    **dict.fromkeys(("ES256", "ES384", "ES512"), (EllipticCurvePublicKey,)),
    "EdDSA": (Ed25519PublicKey, Ed448PublicKey),
}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
#: Longest JWKS document accepted from a URL.
_MAX_JWKS_BYTES = 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClaimRule(_Model):
    """One claim test: ``equals`` a value, ``contains`` all of some values (a space-separated
    string such as ``scope``, or a list), or ``any_of`` some values (e.g. ``groups``)."""

    equals: Any = None
    contains: list[str] | None = None
    any_of: list[str] | None = None

    @model_validator(mode="after")
    def _one(self) -> ClaimRule:
        if sum(v is not None for v in (self.equals, self.contains, self.any_of)) != 1:
            raise ValueError("set exactly one of equals, contains, any_of")
        return self

    def holds(self, value: Any) -> bool:
        if value is None:
            return False
        if self.equals is not None:
            return bool(value == self.equals)
        if isinstance(value, str):
            present = set(value.split())
        elif isinstance(value, list):
            present = {str(v) for v in value if isinstance(v, str | int)}
        else:
            return False  # a number or an object is neither a scope string nor a group list
        if self.contains is not None:
            return set(self.contains) <= present
        return bool(present & set(self.any_of or ()))


class Provider(_Model):
    """One identity provider: who issues tokens, for whom, signed how, and with which keys."""

    name: str
    issuers: list[str] = Field(min_length=1)
    audiences: list[str] = Field(default_factory=list)
    allow_any_audience: bool = False
    algorithms: list[Algorithm] = Field(min_length=1)
    jwks_url: str | None = None
    jwks_file: str | None = None
    keys: list[str | dict[str, Any]] = Field(default_factory=list, description="PEM or JWK")
    hs_secret_file: str | None = None
    jwks_ttl_s: float = Field(300.0, gt=0)
    jwks_min_refetch_interval_s: float = Field(30.0, ge=0)
    jwks_timeout_s: float = Field(5.0, gt=0, le=60)
    leeway_s: float = Field(30.0, ge=0, le=600)
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    claims: dict[str, ClaimRule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys(self) -> Provider:
        sources = [self.jwks_url, self.jwks_file, self.keys or None, self.hs_secret_file]
        if sum(s is not None for s in sources) != 1:
            raise ValueError(
                f"provider {self.name!r}: set exactly one of jwks_url, jwks_file, keys, hs_secret_file"
            )
        hmac = set(self.algorithms) & _HMAC
        if self.hs_secret_file is not None and hmac != set(self.algorithms):
            raise ValueError(f"provider {self.name!r}: hs_secret_file allows only HS256/384/512")
        if hmac and self.hs_secret_file is None:
            # An HS algorithm without an explicit secret is the classic key-confusion hole.
            raise ValueError(f"provider {self.name!r}: HS algorithms need hs_secret_file")
        if not self.audiences and not self.allow_any_audience:
            raise ValueError(
                f"provider {self.name!r}: list audiences (or set allow_any_audience: true)"
            )
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError(f"provider {self.name!r}: jwks_url must be http(s)")
        return self


class CacheConfig(_Model):
    """The cache of verified tokens (off: every request pays a signature check)."""

    enabled: bool = True
    max_entries: int = Field(10_000, ge=0)
    max_ttl_s: float = Field(300.0, gt=0)


class JwtConfig(_Model):
    providers: list[Provider] = Field(min_length=1)
    sources: list[CredentialSource] = Field(default_factory=lambda: [BEARER], min_length=1)
    forward: Forward = Field(default_factory=lambda: Forward(metadata={"sub": "sub"}))
    remove_credential: bool = False
    cache: CacheConfig = Field(default_factory=CacheConfig)
    realm: str = "extsvc"
    max_token_bytes: int = Field(8192, ge=256, le=65536)
    on_missing: Literal["deny", "abstain"] = "deny"

    @model_validator(mode="after")
    def _unique(self) -> JwtConfig:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        owners: dict[str, str] = {}
        for provider in self.providers:
            for issuer in provider.issuers:
                if issuer in owners:
                    # the issuer picks the provider: two owners would make one of them dead config
                    raise ValueError(
                        f"issuer {issuer!r} is listed by providers {owners[issuer]!r} and {provider.name!r}"
                    )
                owners[issuer] = provider.name
        return self


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A parsed public key and the one algorithm its JWK pins, if any."""

    key: Any
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        if not isinstance(self.key, _KEY_TYPES.get(alg, ())):
            return False
        curve = _EC_CURVES.get(alg)
        return curve is None or self.key.curve.name == curve


#: The last JWKS document each URL served, so a config reloaded while the IdP is down still has
#: keys (a new step instance starts empty). Bounded; a JWKS holds only public keys.
_LAST_GOOD_JWKS: dict[str, Mapping[str, Any]] = {}
_LAST_GOOD_MAX = 64


def _remember(url: str, document: Mapping[str, Any]) -> None:
    _LAST_GOOD_JWKS.pop(url, None)
    _LAST_GOOD_JWKS[url] = document
    while len(_LAST_GOOD_JWKS) > _LAST_GOOD_MAX:
        del _LAST_GOOD_JWKS[next(iter(_LAST_GOOD_JWKS))]


class KeySet:
    """The verification keys of one provider, refreshed from their source.

    Keys are held as parsed key objects (no PEM parsing per request). ``fetch`` returns a JWKS
    document; it is called single-flight: concurrent requests with an unknown ``kid`` share one
    fetch, and no fetch starts within ``min_interval`` of the previous attempt.
    """

    def __init__(
        self,
        name: str,
        fetch: Callable[[], Awaitable[Mapping[str, Any]]] | None,
        ttl: float,
        min_interval: float,
        clock: Callable[[], float],
        logger: logging.Logger,
        on_loaded: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.name = name
        self._on_loaded = on_loaded
        self._fetch = fetch
        self._ttl = ttl
        self._min_interval = min_interval
        self._clock = clock
        self._log = logger
        self.by_kid: dict[str, VerificationKey] = {}
        self.without_kid: list[VerificationKey] = []
        self.fetched_at = -math.inf
        self.last_attempt = -math.inf
        self.fetches = 0
        self._inflight: asyncio.Task[bool] | None = None
        self._background: set[asyncio.Task[bool]] = set()

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.without_kid)

    def set_static(self, keys: Sequence[tuple[str | None, VerificationKey]]) -> None:
        for kid, key in keys:
            if kid:
                self.by_kid[kid] = key
            else:
                self.without_kid.append(key)
        self.fetched_at = math.inf

    def load_jwks(self, document: Mapping[str, Any]) -> int:
        by_kid: dict[str, VerificationKey] = {}
        without: list[VerificationKey] = []
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ValueError("the JWKS has no 'keys' list")
        for entry in entries:
            if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") == "oct":
                # A symmetric key in a public key set: never usable (HS needs hs_secret_file).
                self._log.warning("provider %s: ignoring symmetric JWK %r", self.name, entry.get("kid"))
                continue
            try:
                key = _jwk_key(entry)
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                self._log.warning("provider %s: skipping unusable JWK %r: %s",
                                  self.name, entry.get("kid", "?"), exc)
                continue
            if entry.get("kid"):
                by_kid[str(entry["kid"])] = key
            else:
                without.append(key)
        if not by_kid and not without:
            raise ValueError("the JWKS holds no usable signing key")
        self.by_kid, self.without_kid = by_kid, without
        return len(by_kid) + len(without)

    async def refresh(self) -> bool:
        """Fetch the key set now (joining a fetch already running); True if it was loaded."""
        if self._fetch is None:
            return True
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._do_refresh())
        return await asyncio.shield(self._inflight)

    async def _do_refresh(self) -> bool:
        assert self._fetch is not None
        self.last_attempt = self._clock()
        self.fetches += 1
        try:
            document = await self._fetch()
            count = self.load_jwks(document)
        except Exception as exc:  # noqa: BLE001 (network, HTTP, JSON, key errors: keep the last good set)
            self._log.warning("provider %s: JWKS refresh failed (%s); keeping %d cached key(s)",
                              self.name, exc, len(self))
            return False
        self.fetched_at = self._clock()
        if self._on_loaded is not None:
            self._on_loaded(document)
        self._log.info("provider %s: JWKS loaded, %d key(s)", self.name, count)
        return True

    def _refresh_in_background(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            return
        task = asyncio.get_running_loop().create_task(self.refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def candidates(self, kid: str | None) -> list[VerificationKey]:
        """The keys a token with this ``kid`` may be signed with (fetching if that may help)."""
        now = self._clock()
        can_fetch = self._fetch is not None and now - self.last_attempt >= self._min_interval
        if can_fetch and now - self.fetched_at > self._ttl:
            if len(self):
                self._refresh_in_background()  # serve from the stale set meanwhile
            else:
                await self.refresh()
                can_fetch = False
        if kid is not None:
            key = self.by_kid.get(kid)
            if key is None and can_fetch:
                await self.refresh()  # a rotated key: look once more, at most once per interval
                key = self.by_kid.get(kid)
            return [key] if key is not None else list(self.without_kid)
        return [*self.without_kid, *self.by_kid.values()]

    async def aclose(self) -> None:
        for task in [*self._background, self._inflight]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


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
    url: str | None


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
        self._cache_hits = ctx.metrics.counter("jwt_cache_hits", "Tokens answered from the cache")
        self._rejected = ctx.metrics.counter("jwt_rejected", "Tokens rejected")
        self.identity_headers = config.forward.header_names()
        self._providers: list[_ProviderState] = []
        for provider in config.providers:
            fetch: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
            on_loaded: Callable[[Mapping[str, Any]], None] | None = None
            if provider.jwks_url is not None:
                fetch = self._url_fetcher(provider)
                on_loaded = functools.partial(_remember, provider.jwks_url)
            elif provider.jwks_file is not None:
                fetch = self._file_fetcher(ctx.resolve(provider.jwks_file))
            keys = KeySet(
                provider.name, fetch, provider.jwks_ttl_s, provider.jwks_min_refetch_interval_s,
                ctx.clock, ctx.logger, on_loaded,
            )
            secret = None
            if provider.hs_secret_file is not None:
                secret = ctx.read_secret_file(provider.hs_secret_file).strip()
                if len(secret) < 32:
                    raise ValueError(f"provider {provider.name!r}: the HS secret is shorter than 32 bytes")
            elif provider.keys:
                keys.set_static([_inline_key(k) for k in provider.keys])
            self._providers.append(_ProviderState(provider, keys, secret, provider.jwks_url))
        self._by_issuer = {iss: state for state in self._providers for iss in state.config.issuers}
        realm = config.realm.replace('"', "").replace("\\", "")
        self._challenge = f'Bearer realm="{realm}"'
        self._missing = Decision.deny(
            401, headers={"www-authenticate": self._challenge}, reason="jwt: no token"
        )

    def _url_fetcher(self, provider: Provider) -> Callable[[], Awaitable[Mapping[str, Any]]]:
        url = provider.jwks_url or ""
        timeout = provider.jwks_timeout_s

        async def fetch() -> Mapping[str, Any]:
            if self._client is None:
                self._client = httpx.AsyncClient(verify=tls_context())
            response = await self._client.get(
                url, headers={"accept": "application/json"}, timeout=timeout
            )
            response.raise_for_status()
            if len(response.content) > _MAX_JWKS_BYTES:
                raise ValueError(f"the JWKS is larger than {_MAX_JWKS_BYTES} bytes")
            document = response.json()
            if not isinstance(document, Mapping):
                raise ValueError("the JWKS is not a JSON object")
            return document

        return fetch

    @staticmethod
    def _file_fetcher(path: Path) -> Callable[[], Awaitable[Mapping[str, Any]]]:
        async def fetch() -> Mapping[str, Any]:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            document = json.loads(text)
            if not isinstance(document, Mapping):
                raise ValueError("the JWKS file is not a JSON object")
            return document

        return fetch

    async def start(self) -> None:
        """Fetch every provider's keys before serving.

        A JWKS file that cannot be loaded rejects the config (it is ours to get right). An
        unreachable JWKS URL does not: the step then uses the key set the same URL served before
        a reload, if any, and otherwise denies until a fetch succeeds (each unknown ``kid`` may
        trigger one, at most once per ``jwks_min_refetch_interval_s``).
        """
        results = await asyncio.gather(*(state.keys.refresh() for state in self._providers))
        for state, loaded in zip(self._providers, results, strict=True):
            if state.url is not None:
                if not loaded and state.url in _LAST_GOOD_JWKS:
                    count = state.keys.load_jwks(_LAST_GOOD_JWKS[state.url])
                    self._log.warning(
                        "provider %s: JWKS unreachable; serving the %d key(s) it last returned",
                        state.config.name, count,
                    )
            elif state.config.jwks_file is not None and not loaded:
                raise ValueError(
                    f"provider {state.config.name!r}: cannot load jwks_file {state.config.jwks_file}"
                )

    async def aclose(self) -> None:
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
                reject.status, headers={"www-authenticate": challenge},
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
        set_headers, remove, query_remove = removal(request, source)
        return decision.merge(
            Decision.allow(upstream_set=set_headers, upstream_remove=remove, query_remove=query_remove)
        )

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
                    token, key, algorithms=[alg], audience=provider.audiences or None,
                    issuer=provider.issuers, leeway=provider.leeway_s,
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
            upstream_set=headers, metadata=metadata,
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


def _jwk_key(entry: Mapping[str, Any]) -> VerificationKey:
    alg = entry.get("alg")
    jwk = jwt.PyJWK.from_dict(dict(entry))
    return VerificationKey(jwk.key, str(alg) if alg else None)


def _inline_key(key: str | dict[str, Any]) -> tuple[str | None, VerificationKey]:
    if isinstance(key, dict):
        if key.get("kty") == "oct":
            raise ValueError("inline symmetric JWKs are not accepted; use hs_secret_file")
        return key.get("kid"), _jwk_key(key)
    public = serialization.load_pem_public_key(key.encode())
    if not isinstance(public, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey):
        raise ValueError(f"unsupported inline key type {type(public).__name__}")
    return None, VerificationKey(public)


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="jwt",
        config_model=JwtConfig,
        factory=JwtAuthorizer,
        description="verify JWTs (JWKS URL/file, inline keys, HS secret) with claim rules",
    )
