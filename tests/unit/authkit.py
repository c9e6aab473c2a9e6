"""Shared pieces of the authentication-plugin tests: keys, tokens, a fake clock, a real HTTP server.

The identity provider is a real HTTP server on 127.0.0.1 (a thread running ``http.server``), so
the plugins' httpx clients do real network I/O; only the clock is faked.
"""

from __future__ import annotations

import base64
import functools
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extsvc import PluginContext
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import compile_config, parse
from extsvc.reload.runtime import Runtime
from extsvc.testing import plugin_context

ISSUER = "https://idp.test"
AUDIENCE = "orders"


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def context(
    plugin: str, clock: FakeClock | None = None, metrics: Metrics | None = None, **kwargs: Any
) -> PluginContext:
    """A plugin context (policy ``test``) with a fake clock if given."""
    if clock is not None:
        kwargs["clock"] = clock
    return plugin_context(plugin, metrics=metrics or Metrics(), **kwargs)


def counter_value(metrics: Metrics, plugin: str, name: str, policy: str = "test") -> float:
    """The value of ``extsvc_plugin_<name>_total{plugin, policy}``."""
    value = metrics.registry.get_sample_value(
        f"extsvc_plugin_{name}_total", {"plugin": plugin, "policy": policy}
    )
    return value or 0.0


# -- keys and tokens ------------------------------------------------------------------------------


@functools.cache
def rsa_key(name: str = "a") -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(name: str = "a") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def ed_key(name: str = "a") -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: Any) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def public_jwk(key: Any, kid: str | None, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of a private key, as a JWKS lists it."""
    public = key.public_key()
    algorithm = {
        rsa.RSAPublicKey: jwt.algorithms.RSAAlgorithm,
        ec.EllipticCurvePublicKey: jwt.algorithms.ECAlgorithm,
    }
    for cls, impl in algorithm.items():
        if isinstance(public, cls):
            entry: dict[str, Any] = json.loads(impl.to_jwk(public))
            break
    else:
        entry = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    entry["use"] = "sig"
    if kid is not None:
        entry["kid"] = kid
    if alg is not None:
        entry["alg"] = alg
    return entry


def jwks(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(entries)}


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for ISSUER/AUDIENCE, expiring in an hour; ``None`` removes a claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 3600,
        "jti": uuid.uuid4().hex,  # every token distinct, so caches never mix tests
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(
    key: Any = None, *, kid: str | None = "k1", alg: str = "RS256", headers: Mapping[str, Any] | None = None,
    **claim_overrides: Any,
) -> str:
    """A signed JWT (RS256 with ``rsa_key()`` unless told otherwise)."""
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    return jwt.encode(claims(**claim_overrides), key if key is not None else rsa_key(), algorithm=alg,
                      headers=extra)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand (for alg none, key confusion and other forgeries)."""
    head = b64url(json.dumps(dict(header)).encode())
    body = b64url(json.dumps(dict(payload)).encode())
    return f"{head}.{body}.{b64url(signature)}"


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


# -- a real HTTP identity provider ----------------------------------------------------------------


@dataclass
class IdpState:
    """What the server answers and what it saw; tests change it between requests."""

    jwks: dict[str, Any] = field(default_factory=dict)
    jwks_status: int = 200
    #: the OpenID Connect discovery document (``None``: 404)
    discovery: dict[str, Any] | None = None
    discovery_requests: int = 0
    #: token -> introspection answer; unknown tokens get {"active": false}
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    introspection_status: int = 200
    delay_s: float = 0.0
    jwks_requests: int = 0
    introspections: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client cut off at its deadline (the slow-endpoint tests) is expected, not an error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class IdpServer:
    """``GET /jwks``, ``GET /.well-known/openid-configuration`` (when ``state.discovery`` is set)
    and ``POST /introspect`` (RFC 7662) on 127.0.0.1, in a thread."""

    def __init__(self) -> None:
        self.state = IdpState()
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, document: Any) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration" and state.discovery is not None:
                    with state.lock:
                        state.discovery_requests += 1
                    self._reply(200, state.discovery)
                    return
                if self.path != "/jwks":
                    self._reply(404, {})
                    return
                with state.lock:
                    state.jwks_requests += 1
                time.sleep(state.delay_s)
                self._reply(state.jwks_status, state.jwks)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                with state.lock:
                    state.introspections.append(
                        {"form": form, "authorization": self.headers.get("authorization", "")}
                    )
                time.sleep(state.delay_s)
                if state.introspection_status != 200:
                    self._reply(state.introspection_status, {"error": "server_error"})
                    return
                self._reply(200, state.tokens.get(form.get("token", ""), {"active": False}))

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self.running = True

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    @property
    def issuer(self) -> str:
        """The issuer whose discovery document this server holds: its own base URL."""
        return f"http://127.0.0.1:{self.port}"

    def serve_discovery(self) -> None:
        """Answer discovery for :attr:`issuer`, naming :attr:`jwks_url`."""
        self.state.discovery = {"issuer": self.issuer, "jwks_uri": self.jwks_url}

    @property
    def introspection_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/introspect"

    def stop(self) -> None:
        """Shut the server down: from now on its port refuses connections."""
        if self.running:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self.running = False


@contextmanager
def idp_server() -> Iterator[IdpServer]:
    server = IdpServer()
    try:
        yield server
    finally:
        server.stop()


# -- policies built from YAML ---------------------------------------------------------------------


async def runtime_of(text: str, host: PluginHost | None = None) -> Runtime:
    """A started runtime for a YAML config, with the built-in plugins only."""
    host = host or PluginHost.create(load_entry_points=False)
    return await compile_config(parse(text), host, Metrics())


def write(path: Any, text: str | bytes) -> Any:
    """Write a file and return its path (as a string for configs)."""
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path

