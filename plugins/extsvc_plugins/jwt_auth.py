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
import ipaddress
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
#: Default cap of a JWKS or discovery document: real key sets are a few KiB (a dozen RSA keys
#: with certificate chains stay under 64 KiB), so 1 MiB is ample headroom and still cheap to hold.
DEFAULT_JWKS_MAX_BYTES = 1024 * 1024
#: OpenID Connect Discovery 1.0, section 4: the document's path under the issuer.
WELL_KNOWN = "/.well-known/openid-configuration"
#: Retries of a key set that is not loaded: after 1 s, then doubling up to 60 s (or the TTL).
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0
#: stripped allows remembered (remove_credential; a simple bound: the memo starts over when full)
_STRIPPED_KEPT = 10_000


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
    discovery: bool = Field(
        False, description="find the JWKS through the issuer's OpenID Connect discovery document"
    )
    discovery_url: str | None = Field(
        None, description="where that document is (default {issuer}/.well-known/openid-configuration)"
    )
    jwks_file: str | None = None
    keys: list[str | dict[str, Any]] = Field(default_factory=list, description="PEM or JWK")
    hs_secret_file: str | None = None
    jwks_ttl_s: float = Field(300.0, gt=0)
    jwks_min_refetch_interval_s: float = Field(30.0, ge=0)
    jwks_timeout_s: float = Field(
        5.0, gt=0, le=60, description="hard deadline of each fetch (discovery, JWKS), body included"
    )
    jwks_max_bytes: int = Field(
        DEFAULT_JWKS_MAX_BYTES, ge=1024, le=16 * 1024 * 1024,
        description="longest JWKS or discovery document read; reading stops there",
    )
    leeway_s: float = Field(30.0, ge=0, le=600)
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    claims: dict[str, ClaimRule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys(self) -> Provider:
        sources = [self.jwks_url, self.jwks_file, self.keys or None, self.hs_secret_file,
                   self.discovery or None]
        if sum(s is not None for s in sources) != 1:
            raise ValueError(
                f"provider {self.name!r}: set exactly one of jwks_url, jwks_file, keys, hs_secret_file, "
                "discovery"
            )
        if self.discovery_url is not None and not self.discovery:
            raise ValueError(f"provider {self.name!r}: discovery_url needs discovery: true")
        if self.discovery:
            if len(self.issuers) != 1:
                raise ValueError(
                    f"provider {self.name!r}: discovery needs exactly one issuer (the discovery "
                    "document must name it)"
                )
            for field, url in (("issuer", self.issuers[0]), ("discovery_url", self.discovery_url)):
                if url is not None and not https_or_loopback(url):
                    raise ValueError(
                        f"provider {self.name!r}: with discovery, the {field} must be an https URL "
                        "(http only on a loopback address)"
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

    @property
    def discovery_document_url(self) -> str:
        """Where the discovery document is: ``discovery_url``, or the issuer's well-known path."""
        return self.discovery_url or self.issuers[0].rstrip("/") + WELL_KNOWN


def loopback_http(url: str) -> bool:
    """Whether ``url`` is plain http to a loopback address (127.0.0.0/8, ::1, localhost)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def https_or_loopback(url: str) -> bool:
    """An https URL with a host, or :func:`loopback_http`: what discovery accepts."""
    parts = urlsplit(url)
    return (parts.scheme == "https" and bool(parts.hostname)) or loopback_http(url)


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
    startup_wait_s: float = Field(
        1.0, ge=0, le=5,
        # at most half the server's default plugin_start_timeout_s (10 s): a slow IdP must not
        # be what makes a config load time out
        description="how long start() waits for the first fetch of key sets not yet loaded",
    )

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



def read_jwks_file(path: Path) -> Mapping[str, Any]:
    """A JWKS file's JSON object (``OSError`` or ``ValueError`` when it is missing or not one)."""
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, Mapping):
        raise ValueError("the JWKS file is not a JSON object")
    return document


class KeysUnavailable(Exception):
    """A provider has no keys yet (its first fetch failed or is still running): a step error, so
    the policy answers per its ``on_error`` -- neither an allow nor a 401 blaming the token."""


class DiscoveryRefused(ValueError):
    """An OpenID Connect discovery document that cannot be used (wrong issuer, no/insecure jwks_uri)."""


class KeySet:
    """The verification keys of one provider, refreshed from their source.

    Keys are held as parsed key objects (no PEM parsing per request). ``fetch`` returns a JWKS
    document; it is called single-flight: concurrent requests with an unknown ``kid`` share one
    fetch, and no request starts one within ``min_interval`` of the previous attempt. A key set
    that is not loaded yet is fetched in the background (:meth:`start_loading`) until a fetch
    succeeds, with backoff; meanwhile :meth:`candidates` raises :class:`KeysUnavailable`.
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
        self.last_error: str | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._loader: asyncio.Task[None] | None = None

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

    def _refresh_task(self) -> asyncio.Task[bool]:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._do_refresh())
        return self._inflight

    async def refresh(self) -> bool:
        """Fetch the key set now (joining a fetch already running); True if it was loaded."""
        if self._fetch is None:
            return True
        return await asyncio.shield(self._refresh_task())

    async def _do_refresh(self) -> bool:
        assert self._fetch is not None
        self.last_attempt = self._clock()
        self.fetches += 1
        try:
            document = await self._fetch()
            count = self.load_jwks(document)
        except Exception as exc:  # noqa: BLE001 (network, HTTP, JSON, key errors: keep the last good set)
            self.last_error = str(exc)
            hint = " (raise jwks_max_bytes if the key set really is this large)" if isinstance(
                exc, RemoteTooLarge) else ""
            if len(self) and self.fetched_at == -math.inf:
                kept = f"serving the {len(self)} key(s) it last returned before the reload"
            else:
                kept = f"keeping {len(self)} cached key(s)"
            self._log.log(
                logging.ERROR if isinstance(exc, DiscoveryRefused) else logging.WARNING,
                "provider %s: JWKS refresh failed (%s)%s; %s", self.name, exc, hint, kept,
            )
            return False
        self.fetched_at = self._clock()
        self.last_error = None
        if self._on_loaded is not None:
            self._on_loaded(document)
        self._log.info("provider %s: JWKS loaded, %d key(s)", self.name, count)
        return True

    def start_loading(self) -> asyncio.Task[bool] | None:
        """Fetch in the background until one fetch succeeds (then the TTL takes over).

        Failed attempts are retried after 1 s, doubling up to 60 s (at most ``ttl``), with
        jitter. Returns the first attempt, for a caller that wants to wait a little for it.
        """
        if self._fetch is None:
            return None
        first = self._refresh_task()
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._keep_loading(first))
        return first

    async def _keep_loading(self, attempt: asyncio.Task[bool]) -> None:
        delay = _RETRY_FIRST_S
        ceiling = max(_RETRY_FIRST_S, min(_RETRY_MAX_S, self._ttl))
        while not await asyncio.shield(attempt):
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 (jitter, not crypto)
            delay = min(delay * 2, ceiling)
            attempt = self._refresh_task()

    async def candidates(self, kid: str | None) -> list[VerificationKey]:
        """The keys a token with this ``kid`` may be signed with (fetching if that may help).

        :raises KeysUnavailable: when no key set has been loaded yet.
        """
        now = self._clock()
        can_fetch = self._fetch is not None and now - self.last_attempt >= self._min_interval
        if not len(self):
            # never wait here for an IdP that is slow or down: the background loader (and this
            # request, at most once per interval) keeps trying; this token is a step error
            if can_fetch:
                self._refresh_task()
            raise KeysUnavailable(
                f"provider {self.name}: no keys loaded yet "
                f"({self.last_error or 'the first fetch has not finished'})"
            )
        if can_fetch and now - self.fetched_at > self._ttl:
            self._refresh_task()  # serve from the stale set meanwhile
        if kid is not None:
            key = self.by_kid.get(kid)
            if key is None and can_fetch:
                await self.refresh()  # a rotated key: look once more, at most once per interval
                key = self.by_kid.get(kid)
            return [key] if key is not None else list(self.without_kid)
        return [*self.without_kid, *self.by_kid.values()]

    async def aclose(self) -> None:
        """Cancel the background loader and any fetch in flight."""
        for task in (self._loader, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class RemoteJwks:
    """Fetches one provider's JWKS from ``jwks_url``, or from the ``jwks_uri`` its OpenID Connect
    discovery document names (discovered again after a failed JWKS fetch: it may have moved).

    Every request is bounded by the provider's ``jwks_max_bytes`` and ``jwks_timeout_s``.
    """

    def __init__(
        self,
        provider: Provider,
        client: Callable[[], httpx.AsyncClient],
        metrics: RemoteFetchMetrics,
        logger: logging.Logger,
    ) -> None:
        self._provider = provider
        self._client = client
        self._metrics = metrics
        self._log = logger
        self.discovery_url = provider.discovery_document_url if provider.discovery else None
        self.jwks_uri: str | None = provider.jwks_url
        #: the key of the last good key set kept across reloads
        self.source = provider.jwks_url or f"discovery {self.discovery_url}"

    async def __call__(self) -> Mapping[str, Any]:
        if self.discovery_url is not None and self.jwks_uri is None:
            self.jwks_uri = await self._discover(self.discovery_url)
        assert self.jwks_uri is not None
        try:
            return await self._get(self.jwks_uri)
        except RemoteFetchError:
            if self.discovery_url is not None:
                self.jwks_uri = None
            raise

    async def _get(self, url: str) -> dict[str, Any]:
        return await fetch_json(
            self._client(), "GET", url, max_bytes=self._provider.jwks_max_bytes,
            timeout_total_s=self._provider.jwks_timeout_s, metrics=self._metrics,
        )

    async def _discover(self, url: str) -> str:
        document = await self._get(url)
        issuer = self._provider.issuers[0]
        named = document.get("issuer")
        if named != issuer:  # OpenID Connect Discovery 1.0, section 4.3: exactly equal, or not used
            raise DiscoveryRefused(
                f"the discovery document at {url} names issuer {str(named)[:200]!r}, "
                f"not {issuer!r}; refused"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise DiscoveryRefused(f"the discovery document at {url} has no jwks_uri")
        parts = urlsplit(jwks_uri)
        secure = parts.scheme == "https" and bool(parts.hostname)
        if not secure and not (loopback_http(jwks_uri) and loopback_http(url)):
            raise DiscoveryRefused(
                f"jwks_uri {jwks_uri[:200]!r} must be https (plain http only on loopback, "
                "named by a loopback discovery URL)"
            )
        self._log.info("provider %s: discovery names jwks_uri %s", self._provider.name, jwks_uri)
        return jwks_uri


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
                on_loaded = functools.partial(_remember, remote.source)
            elif provider.jwks_file is not None:
                path = ctx.resolve(provider.jwks_file)
                fetch = functools.partial(asyncio.to_thread, read_jwks_file, path)
            keys = KeySet(
                provider.name, fetch, provider.jwks_ttl_s, provider.jwks_min_refetch_interval_s,
                ctx.clock, ctx.logger, on_loaded,
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
                keys.set_static([_inline_key(k) for k in provider.keys])
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
            remembered = _LAST_GOOD_JWKS.get(state.remote.source)
            if remembered is not None and not len(state.keys):
                with contextlib.suppress(ValueError):
                    count = state.keys.load_jwks(remembered)
                    self._log.debug("provider %s: %d key(s) kept from before the reload, refetching",
                                    state.config.name, count)
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
