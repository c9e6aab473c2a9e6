"""Remote fetches under attack or fault: oversized, dripping and lying JWKS, discovery and
introspection answers (docs/hardening.md, "Remote fetches").

Every server here is a real HTTP server on 127.0.0.1 (a thread running ``http.server``) whose
answers the test scripts per path, and which counts the body bytes it managed to send: a client
that stops reading at its cap and closes the connection makes the server's next write fail.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from extsvc import (
    RemoteInvalidContent,
    RemoteStatusError,
    RemoteTimeout,
    RemoteTooLarge,
    RemoteUnreachable,
    fetch_bytes,
    fetch_json,
)
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.testing import authz_stub, check_context, check_request, running_server
from extsvc_plugins import jwt_auth, jwt_keys
from extsvc_plugins.jwt_auth import JwtAuthorizer, JwtConfig
from unit.authkit import (
    AUDIENCE,
    ISSUER,
    bearer,
    context,
    counter_value,
    jwks,
    public_jwk,
    rsa_key,
    runtime_of,
    token,
)

MiB = 1024 * 1024
CHUNK = b" " * (64 * 1024)
#: What a capped fetch of a 20 MiB flood may cost: the cap, what the kernel buffers, some slack.
SENT_BOUND = 4 * MiB
RSS_BOUND = 10 * MiB


# -- a scriptable loopback server -----------------------------------------------------------------


@dataclass
class Answer:
    """What one path answers: a JSON document, a flood of ``size`` bytes, or a drip."""

    document: Any = None
    status: int = 200
    #: a body of this many bytes (``{"keys": [`` and spaces), instead of ``document``
    size: int = 0
    #: send ``Content-Length`` with the flood (else the body runs until the connection closes)
    declare_length: bool = False
    #: send the headers, then one byte every ``drip_s`` seconds until the client goes away
    drip_s: float = 0.0
    #: gzip the document, and say so
    gzip: bool = False
    #: a gzip-compressed body sent as it is (built before a test measures memory)
    gzipped: bytes = b""


@dataclass
class Remote:
    """The server's script and what it saw, per path (``/jwks``, ``/introspect``, ...)."""

    answers: dict[str, Answer] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    closed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str, sent: int) -> None:
        with self.lock:
            self.sent[path] = self.sent.get(path, 0) + sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up at their cap or deadline are the point of these tests


@contextmanager
def remote_server() -> Iterator[Remote]:
    remote = Remote()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self._answer()

        def _answer(self) -> None:
            path = self.path.split("?")[0]
            with remote.lock:
                remote.requests[path] = remote.requests.get(path, 0) + 1
                answer = remote.answers.get(path, Answer({"error": "not found"}, 404))
            self.send_response(answer.status)
            self.send_header("content-type", "application/json")
            if answer.drip_s:
                self.send_header("content-length", "4096")  # under any cap: only time stops it
                self.end_headers()
                self._drip(path, answer.drip_s)
            elif answer.size:
                if answer.declare_length:
                    self.send_header("content-length", str(answer.size))
                self.end_headers()
                self._flood(path, answer.size)
            else:
                body = answer.gzipped or json.dumps(answer.document).encode()
                if answer.gzip and not answer.gzipped:
                    body = gzip.compress(body)
                if answer.gzip or answer.gzipped:
                    self.send_header("content-encoding", "gzip")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                remote.count(path, len(body))

        def _flood(self, path: str, size: int) -> None:
            # a small send buffer, so that what the kernel holds for a client that stopped
            # reading stays small next to what the client read
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sent = 0
            try:
                self.wfile.write(b'{"keys": [')
                while sent < size and not remote.closed.is_set():
                    self.wfile.write(CHUNK)
                    sent += len(CHUNK)
            except OSError:
                pass
            finally:
                remote.count(path, sent)

        def _drip(self, path: str, interval: float) -> None:
            deadline = time.monotonic() + 30  # a test that forgets to hang up still ends
            try:
                self.wfile.write(b'{"keys": [')
                self.wfile.flush()
                while time.monotonic() < deadline and not remote.closed.wait(interval):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    remote.count(path, 1)
            except OSError:
                pass

    server = _Server(("127.0.0.1", 0), Handler)
    remote.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield remote
    finally:
        remote.closed.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def remote() -> Iterator[Remote]:
    with remote_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _forget_jwks() -> Iterator[None]:
    jwt_keys._LAST_GOOD_JWKS.clear()
    yield
    jwt_keys._LAST_GOOD_JWKS.clear()


GOOD_JWKS = jwks(public_jwk(rsa_key(), "k1"))


# -- memory ------------------------------------------------------------------------------------------


def rss() -> int:
    """Resident set size of this process, in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss_growth() -> Iterator[Callable[[], int]]:
    """Samples RSS every 2 ms in a thread; yields a function returning the peak growth so far."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm")
    start = rss()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: max(peak[0], rss()) - start
    finally:
        done.set()
        sampler.join(2)


# -- the fetch helper itself -------------------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


async def test_fetch_stops_reading_a_flood_at_the_cap(remote: Remote, client: httpx.AsyncClient) -> None:
    remote.answers["/big"] = Answer(size=20 * MiB)
    started = time.monotonic()
    too_large = pytest.raises(RemoteTooLarge, match=r"larger than the 1048576-byte cap")
    with peak_rss_growth() as growth, too_large:
        await fetch_bytes(client, "GET", remote.url("/big"), max_bytes=MiB, timeout_total_s=5)
    assert time.monotonic() - started < 2
    assert growth() < RSS_BOUND
    await asyncio.sleep(0.2)  # the server notices the closed connection at its next write
    assert remote.sent["/big"] < SENT_BOUND  # not the 20 MiB it had to send


async def test_fetch_refuses_a_declared_length_above_the_cap_before_the_body(
    remote: Remote, client: httpx.AsyncClient
) -> None:
    remote.answers["/big"] = Answer(size=20 * MiB, declare_length=True)
    with pytest.raises(RemoteTooLarge, match="declared Content-Length 20971520") as raised:
        await fetch_bytes(client, "GET", remote.url("/big"), max_bytes=MiB, timeout_total_s=5)
    assert raised.value.received == 0


async def test_fetch_caps_a_compressed_answer_after_decompression(
    remote: Remote, client: httpx.AsyncClient
) -> None:
    bomb = gzip.compress(b'{"pad": "' + b" " * (16 * MiB) + b'"}')  # 16 KiB on the wire
    remote.answers["/bomb"] = Answer(gzipped=bomb)
    with peak_rss_growth() as growth, pytest.raises(RemoteTooLarge):
        await fetch_bytes(client, "GET", remote.url("/bomb"), max_bytes=MiB, timeout_total_s=5)
    assert growth() < RSS_BOUND
    remote.answers["/small"] = Answer({"a": 1}, gzip=True)
    assert await fetch_json(client, "GET", remote.url("/small"), max_bytes=MiB, timeout_total_s=5) == {"a": 1}


async def test_fetch_has_a_total_deadline_that_a_drip_cannot_extend(
    remote: Remote, client: httpx.AsyncClient
) -> None:
    remote.answers["/drip"] = Answer(drip_s=0.05)  # never 5 s without a byte: no read timeout
    started = time.monotonic()
    with pytest.raises(RemoteTimeout, match=r"within 0.5 s \(total deadline\)"):
        await fetch_bytes(client, "GET", remote.url("/drip"), max_bytes=MiB, timeout_total_s=0.5)
    assert 0.4 < time.monotonic() - started < 1.5


async def test_fetch_failures_are_remote_fetch_errors(remote: Remote, client: httpx.AsyncClient) -> None:
    remote.answers["/500"] = Answer({"error": "down"}, 500)
    with pytest.raises(RemoteStatusError, match="HTTP status 500") as raised:
        await fetch_json(client, "GET", remote.url("/500"), max_bytes=MiB, timeout_total_s=5)
    assert raised.value.status == 500
    remote.answers["/list"] = Answer([1, 2])
    with pytest.raises(RemoteInvalidContent, match="not a JSON object"):
        await fetch_json(client, "GET", remote.url("/list"), max_bytes=MiB, timeout_total_s=5)
    with pytest.raises(RemoteUnreachable, match="connect error"):
        await fetch_json(client, "GET", "http://127.0.0.1:1/x", max_bytes=MiB, timeout_total_s=5)


async def test_a_fetch_is_cancellable_and_hangs_up(remote: Remote, client: httpx.AsyncClient) -> None:
    remote.answers["/drip"] = Answer(drip_s=0.05)
    task = asyncio.create_task(
        fetch_bytes(client, "GET", remote.url("/drip"), max_bytes=MiB, timeout_total_s=30)
    )
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    dripped = remote.sent["/drip"]
    await asyncio.sleep(0.3)
    assert remote.sent["/drip"] <= dripped + 2  # the server's writes fail: the client hung up


# -- JWKS -----------------------------------------------------------------------------------------


def jwt_step(metrics: Metrics, **provider: Any) -> JwtAuthorizer:
    config = JwtConfig.model_validate({
        "providers": [{
            "name": "idp", "issuers": [provider.pop("issuer", ISSUER)], "audiences": [AUDIENCE],
            "algorithms": ["RS256"], "jwks_min_refetch_interval_s": 0, **provider,
        }],
    })
    return JwtAuthorizer(config, context("jwt", metrics=metrics))


@asynccontextmanager
async def started(step: JwtAuthorizer, within: float = 2.0) -> AsyncIterator[JwtAuthorizer]:
    began = time.monotonic()
    try:
        await asyncio.wait_for(step.start(), within + 5)
        assert time.monotonic() - began < within, "start() took too long"
        yield step
    finally:
        await step.aclose()


async def test_an_oversized_jwks_is_cut_off_at_the_cap(
    remote: Remote, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    remote.answers["/jwks"] = Answer(size=20 * MiB)
    step = jwt_step(metrics, jwks_url=remote.url("/jwks"))  # the default cap: 1 MiB
    with peak_rss_growth() as growth:
        async with started(step):
            pass
    assert growth() < RSS_BOUND
    await asyncio.sleep(0.2)
    assert remote.sent["/jwks"] < SENT_BOUND
    assert counter_value(metrics, "jwt", "remote_too_large") == 1
    assert "larger than the 1048576-byte cap" in caplog.text and "jwks_max_bytes" in caplog.text


async def test_a_dripping_jwks_does_not_hold_up_start_and_its_tokens_are_errors(
    remote: Remote, metrics: Metrics
) -> None:
    remote.answers["/jwks"] = Answer(drip_s=0.1)
    step = jwt_step(metrics, jwks_url=remote.url("/jwks"), jwks_timeout_s=30)
    async with started(step, within=1.5):
        # no keys yet: an error of the step (answered per on_error), never a 401 or an allow
        with pytest.raises(jwt_auth.KeysUnavailable, match="provider idp: no keys loaded yet"):
            await step.check(check_context("/", headers=bearer(token())))
        remote.answers["/jwks"] = Answer(GOOD_JWKS)
    # aclose() cancelled the 30-second fetch: the server saw the client hang up
    dripped = remote.sent["/jwks"]
    await asyncio.sleep(0.3)
    assert remote.sent["/jwks"] <= dripped + 2


async def test_keys_arrive_once_the_idp_recovers(remote: Remote, metrics: Metrics) -> None:
    remote.answers["/jwks"] = Answer(drip_s=0.1)
    step = jwt_step(metrics, jwks_url=remote.url("/jwks"), jwks_timeout_s=0.5)
    async with started(step):
        remote.answers["/jwks"] = Answer(GOOD_JWKS)
        deadline = time.monotonic() + 5
        while True:  # retried in the background with backoff (and on requests)
            try:
                decision = await step.check(check_context("/", headers=bearer(token())))
            except jwt_auth.KeysUnavailable:
                assert time.monotonic() < deadline, "keys never loaded"
                await asyncio.sleep(0.1)
                continue
            assert decision is not None and decision.allowed
            break
    assert counter_value(metrics, "jwt", "remote_timeouts") >= 1


# -- a whole server: start-up, other policies, reload -----------------------------------------------


def server_config(jwks_url: str, tag: str = "v1") -> str:
    return f"""
policies:
  open:
    steps:
      - plugin: set-headers
        config: {{upstream: {{x-tag: {tag}}}}}
  tokens:
    on_error: deny
    error_reply: {{status: 503, body: "try again\\n"}}
    steps:
      - plugin: jwt
        config:
          providers:
            - name: idp
              issuers: ["{ISSUER}"]
              audiences: [{AUDIENCE}]
              algorithms: [RS256]
              jwks_url: "{jwks_url}"
              jwks_timeout_s: 1
              jwks_min_refetch_interval_s: 0
"""


async def check_status(channel: grpc.aio.Channel, policy: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status extsvc tells Envoy to answer with (200 for an allow)."""
    request = check_request("/", headers=headers, context_extensions={"extsvc-policy": policy})
    response = await authz_stub(channel).Check(request, timeout=3)
    if response.WhichOneof("http_response") == "ok_response":
        return 200
    return int(response.denied_response.status.code)


async def test_a_dripping_jwks_at_start_up_blocks_neither_start_nor_reload_nor_other_policies(
    remote: Remote, tmp_path: Path
) -> None:
    remote.answers["/jwks"] = Answer(drip_s=0.2)
    config = tmp_path / "extsvc.yaml"
    config.write_text(server_config(remote.url("/jwks")))
    began = time.monotonic()
    host = PluginHost.create(load_entry_points=False)
    async with running_server(config, host=host, reload_interval_s=0.05) as server:
        assert time.monotonic() - began < 3, "start-up waited for the JWKS"
        async with (
            httpx.AsyncClient() as admin,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        ):
            ready = await admin.get(f"http://127.0.0.1:{server.admin_port}/readyz")
            assert ready.status_code == 200
            asked = time.monotonic()
            assert await check_status(channel, "open") == 200
            assert await check_status(channel, "tokens", bearer(token())) == 503  # its on_error reply
            assert time.monotonic() - asked < 1

            # a reload while the IdP still drips completes at once
            reloaded = time.monotonic()
            config.write_text(server_config(remote.url("/jwks"), tag="v2"))
            while server.holder.current is None or server.holder.current.generation < 2:
                assert time.monotonic() - reloaded < 3, "the reload hung on the JWKS"
                await asyncio.sleep(0.02)
            assert await check_status(channel, "open") == 200

            # the IdP recovers: the jwt policy allows a good token without a restart
            remote.answers["/jwks"] = Answer(GOOD_JWKS)
            deadline = time.monotonic() + 6
            while (status := await check_status(channel, "tokens", bearer(token()))) != 200:
                assert status == 503
                assert time.monotonic() < deadline, "the keys never loaded"
                await asyncio.sleep(0.1)
            assert await check_status(channel, "tokens") == 401  # and a missing token is a 401 again


async def test_a_reload_during_an_outage_keeps_the_last_good_keys(remote: Remote, metrics: Metrics) -> None:
    remote.answers["/jwks"] = Answer(GOOD_JWKS)
    async with started(jwt_step(metrics, jwks_url=remote.url("/jwks"))) as first:
        assert (await first.check(check_context("/", headers=bearer(token())))).allowed  # type: ignore[union-attr]
    remote.answers["/jwks"] = Answer(drip_s=0.1)
    # the new step starts at once with what the same URL served before, while it refetches
    async with started(jwt_step(metrics, jwks_url=remote.url("/jwks")), within=0.5) as second:
        assert (await second.check(check_context("/", headers=bearer(token())))).allowed  # type: ignore[union-attr]


# -- OIDC discovery ---------------------------------------------------------------------------------


def discovery(remote: Remote, issuer: str | None = None, jwks_uri: str | None = None) -> dict[str, Any]:
    return {
        "issuer": issuer or remote.url(""),
        "jwks_uri": jwks_uri or remote.url("/jwks"),
        "authorization_endpoint": remote.url("/authorize"),
    }


async def test_discovery_finds_the_jwks(remote: Remote, metrics: Metrics) -> None:
    issuer = remote.url("")
    remote.answers["/.well-known/openid-configuration"] = Answer(discovery(remote))
    remote.answers["/jwks"] = Answer(GOOD_JWKS)
    async with started(jwt_step(metrics, issuer=issuer, discovery=True)) as step:
        decision = await step.check(check_context("/", headers=bearer(token(iss=issuer))))
        assert decision is not None and decision.allowed
    assert remote.requests == {"/.well-known/openid-configuration": 1, "/jwks": 1}


async def test_discovery_with_an_explicit_url(remote: Remote, metrics: Metrics) -> None:
    issuer = "http://127.0.0.1/realms/corp"
    remote.answers["/meta"] = Answer(discovery(remote, issuer=issuer))
    remote.answers["/jwks"] = Answer(GOOD_JWKS)
    step = jwt_step(metrics, issuer=issuer, discovery=True, discovery_url=remote.url("/meta"))
    async with started(step):
        decision = await step.check(check_context("/", headers=bearer(token(iss=issuer))))
        assert decision is not None and decision.allowed


@pytest.mark.parametrize(
    ("document", "refusal"),
    [
        (lambda r: discovery(r, issuer=r.url("/other")), "names issuer"),
        (lambda r: discovery(r, issuer=r.url("") + "/"), "names issuer"),  # exactly equal, OIDC says
        (lambda r: discovery(r, jwks_uri="http://idp.example/jwks"), "must be https"),
        (lambda r: {"issuer": r.url("")}, "no jwks_uri"),
    ],
    ids=["other-issuer", "trailing-slash", "plain-http-jwks-uri", "no-jwks-uri"],
)
async def test_a_discovery_document_that_does_not_fit_is_refused(
    remote: Remote, metrics: Metrics, caplog: pytest.LogCaptureFixture,
    document: Callable[[Remote], dict[str, Any]], refusal: str,
) -> None:
    issuer = remote.url("")
    remote.answers["/.well-known/openid-configuration"] = Answer(document(remote))
    remote.answers["/jwks"] = Answer(GOOD_JWKS)
    async with started(jwt_step(metrics, issuer=issuer, discovery=True)) as step:
        with pytest.raises(jwt_auth.KeysUnavailable, match=refusal):
            await step.check(check_context("/", headers=bearer(token(iss=issuer))))
    assert "/jwks" not in remote.requests  # nothing fetched from a document that was refused
    assert refusal in caplog.text


async def test_an_oversized_discovery_document_is_cut_off(remote: Remote, metrics: Metrics) -> None:
    issuer = remote.url("")
    remote.answers["/.well-known/openid-configuration"] = Answer(size=20 * MiB)
    async with started(jwt_step(metrics, issuer=issuer, discovery=True, jwks_max_bytes=64 * 1024)):
        pass
    await asyncio.sleep(0.2)
    assert remote.sent["/.well-known/openid-configuration"] < SENT_BOUND
    assert counter_value(metrics, "jwt", "remote_too_large") == 1


# -- token introspection -----------------------------------------------------------------------------


def introspection_policy(endpoint: str, folder: Path, **config: Any) -> str:
    (folder / "client-secret").write_text("s3cret\n")
    extra = "".join(f"\n          {k}: {v}" for k, v in config.items())
    return f"""
policies:
  p:
    on_error: deny
    error_reply: {{status: 503}}
    steps:
      - plugin: oauth2-introspection
        config:
          endpoint: {endpoint}
          client_id: gateway
          client_secret_file: {folder / "client-secret"}{extra}
"""


async def evaluate_good_token(runtime: Any, within: float) -> Any:
    deadline = asyncio.get_running_loop().time() + 10  # a long RPC deadline: the step must end first
    began = time.monotonic()
    outcome = await runtime.policies["p"].evaluate(check_context("/", headers=bearer("good")), deadline)
    assert time.monotonic() - began < within
    return outcome


async def test_an_oversized_introspection_answer_is_an_error_cut_off_at_the_cap(
    remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote.answers["/introspect"] = Answer(size=20 * MiB)
    runtime = await runtime_of(introspection_policy(remote.url("/introspect"), tmp_path))
    try:
        with peak_rss_growth() as growth:
            outcome = await evaluate_good_token(runtime, within=2)
        assert (outcome.label, outcome.decision.allowed, outcome.decision.status) == ("error", False, 503)
        assert growth() < RSS_BOUND
        await asyncio.sleep(0.2)
        assert remote.sent["/introspect"] < SENT_BOUND
        assert "larger than the 262144-byte cap" in caplog.text and "max_response_bytes" in caplog.text
    finally:
        await runtime.close()


async def test_a_dripping_introspection_answer_is_cut_off_at_timeout_s(
    remote: Remote, tmp_path: Path
) -> None:
    remote.answers["/introspect"] = Answer(drip_s=0.1)  # a byte every 100 ms: no read timeout
    runtime = await runtime_of(introspection_policy(remote.url("/introspect"), tmp_path, timeout_s=1))
    try:
        outcome = await evaluate_good_token(runtime, within=2)
        assert (outcome.label, outcome.decision.status) == ("error", 503)
        [step] = runtime.authorizers
        assert not step._inflight  # type: ignore[attr-defined]  # the shared call ended too
    finally:
        await runtime.close()


async def test_a_small_introspection_answer_still_works(remote: Remote, tmp_path: Path) -> None:
    remote.answers["/introspect"] = Answer({"active": True, "sub": "alice", "exp": int(time.time()) + 60})
    runtime = await runtime_of(
        introspection_policy(remote.url("/introspect"), tmp_path, max_response_bytes=1024)
    )
    try:
        outcome = await evaluate_good_token(runtime, within=2)
        assert (outcome.label, outcome.decision.allowed) == ("allow", True)
    finally:
        await runtime.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(autouse=True)
def _plugin_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extsvc.plugin")
