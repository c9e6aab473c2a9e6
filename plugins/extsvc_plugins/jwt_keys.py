"""The ``jwt`` step's verification keys: parsing JWKs and PEM keys, and keeping each provider's
key set loaded and fresh from its source (JWKS URL, OpenID Connect discovery, JWKS file).

Kept apart from the step (:mod:`extsvc_plugins.jwt_auth`) because this is where the network,
the retries and the key-type checks live; the step only asks a :class:`KeySet` for the
candidates of a token's ``kid``. The last good key set of each URL is remembered here, in one
place, so that a reloaded config (a new step) still has keys while the IdP is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from extsvc import RemoteFetchError, RemoteFetchMetrics, RemoteTooLarge, fetch_json
from extsvc_plugins.jwt_config import Provider, loopback_http

#: The key type each asymmetric algorithm needs (pyjwt raises TypeError on a mismatch, so a
#: token whose header names another family must never reach jwt.decode with that key).
_KEY_TYPES: dict[str, tuple[type[Any], ...]] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), (RSAPublicKey,)),
    **dict.fromkeys(("ES256", "ES384", "ES512"), (EllipticCurvePublicKey,)),
    "EdDSA": (Ed25519PublicKey, Ed448PublicKey),
}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
#: Retries of a key set that is not loaded: after 1 s, then doubling up to 60 s (or the TTL).
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0


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


def remember_jwks(url: str, document: Mapping[str, Any]) -> None:
    """Keep ``document`` as the last good key set of ``url`` (a :attr:`RemoteJwks.source`)."""
    _LAST_GOOD_JWKS.pop(url, None)
    _LAST_GOOD_JWKS[url] = document
    while len(_LAST_GOOD_JWKS) > _LAST_GOOD_MAX:
        del _LAST_GOOD_JWKS[next(iter(_LAST_GOOD_JWKS))]


def remembered_jwks(source: str) -> Mapping[str, Any] | None:
    """The JWKS document ``source`` (a :attr:`RemoteJwks.source`) last served, if any."""
    return _LAST_GOOD_JWKS.get(source)


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
                self._log.warning(
                    "provider %s: skipping unusable JWK %r: %s", self.name, entry.get("kid", "?"), exc
                )
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
            hint = (
                " (raise jwks_max_bytes if the key set really is this large)"
                if isinstance(exc, RemoteTooLarge)
                else ""
            )
            if len(self) and self.fetched_at == -math.inf:
                kept = f"serving the {len(self)} key(s) it last returned before the reload"
            else:
                kept = f"keeping {len(self)} cached key(s)"
            self._log.log(
                logging.ERROR if isinstance(exc, DiscoveryRefused) else logging.WARNING,
                "provider %s: JWKS refresh failed (%s)%s; %s",
                self.name,
                exc,
                hint,
                kept,
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
            self._client(),
            "GET",
            url,
            max_bytes=self._provider.jwks_max_bytes,
            timeout_total_s=self._provider.jwks_timeout_s,
            metrics=self._metrics,
        )

    async def _discover(self, url: str) -> str:
        document = await self._get(url)
        issuer = self._provider.issuers[0]
        named = document.get("issuer")
        if named != issuer:  # OpenID Connect Discovery 1.0, section 4.3: exactly equal, or not used
            raise DiscoveryRefused(
                f"the discovery document at {url} names issuer {str(named)[:200]!r}, not {issuer!r}; refused"
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


def _jwk_key(entry: Mapping[str, Any]) -> VerificationKey:
    alg = entry.get("alg")
    jwk = jwt.PyJWK.from_dict(dict(entry))
    return VerificationKey(jwk.key, str(alg) if alg else None)


def inline_key(key: str | dict[str, Any]) -> tuple[str | None, VerificationKey]:
    """A provider's inline ``keys`` entry (PEM or JWK) as ``(kid, key)``; symmetric keys refused."""
    if isinstance(key, dict):
        if key.get("kty") == "oct":
            raise ValueError("inline symmetric JWKs are not accepted; use hs_secret_file")
        return key.get("kid"), _jwk_key(key)
    public = serialization.load_pem_public_key(key.encode())
    if not isinstance(public, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey):
        raise ValueError(f"unsupported inline key type {type(public).__name__}")
    return None, VerificationKey(public)
