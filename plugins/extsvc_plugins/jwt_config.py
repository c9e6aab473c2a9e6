"""The ``jwt`` step's configuration: the pydantic models a policy's ``config:`` is validated
against at load time, and the URL checks they apply.

Kept apart from the step (:mod:`extsvc_plugins.jwt_auth`) and its keys
(:mod:`extsvc_plugins.jwt_keys`) so that what an operator may write, and why a config is
rejected, reads in one place; nothing here runs on the request path.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from extsvc.credentials import BEARER, CredentialSource, Forward

# fmt: off
Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
]
# fmt: on
_HMAC = frozenset({"HS256", "HS384", "HS512"})
#: Default cap of a JWKS or discovery document: real key sets are a few KiB (a dozen RSA keys
#: with certificate chains stay under 64 KiB), so 1 MiB is ample headroom and still cheap to hold.
DEFAULT_JWKS_MAX_BYTES = 1024 * 1024
#: OpenID Connect Discovery 1.0, section 4: the document's path under the issuer.
WELL_KNOWN = "/.well-known/openid-configuration"


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
        DEFAULT_JWKS_MAX_BYTES,
        ge=1024,
        le=16 * 1024 * 1024,
        description="longest JWKS or discovery document read; reading stops there",
    )
    leeway_s: float = Field(30.0, ge=0, le=600)
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    claims: dict[str, ClaimRule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys(self) -> Provider:
        sources = [
            self.jwks_url,
            self.jwks_file,
            self.keys or None,
            self.hs_secret_file,
            self.discovery or None,
        ]
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
            raise ValueError(f"provider {self.name!r}: list audiences (or set allow_any_audience: true)")
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
        1.0,
        ge=0,
        le=5,
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
