"""Builds and runs one server process: plugin host, config, gRPC server, admin listener.

Start order: plugins' start-up hooks -> admin listener and gRPC port (health NOT_SERVING) -> first
config load -> SERVING. Stop order (SIGTERM/SIGINT): NOT_SERVING -> stop accepting, let in-flight
RPCs finish within the grace period -> close the runtime's plugins -> shutdown hooks -> exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from extsvc.authz.service import SERVICE_NAME as AUTHZ_SERVICE
from extsvc.authz.service import AuthorizationService
from extsvc.deadline import forget, stop_step
from extsvc.eventloop import running_loop_name
from extsvc.extproc.service import SERVICE_NAME as EXTPROC_SERVICE
from extsvc.extproc.service import ExternalProcessorService
from extsvc.limits import RequestLimits
from extsvc.observability.admin import AdminServer
from extsvc.observability.admin_api import RUN_DIR_ENV, AdminApi, read_token
from extsvc.observability.decisions import DecisionLog
from extsvc.observability.health import HealthState
from extsvc.observability.metrics import Metrics
from extsvc.observability.tracing import Tracing
from extsvc.plugin.host import PluginHost
from extsvc.ratelimit.service import SERVICE_NAME as RLS_SERVICE
from extsvc.ratelimit.service import RateLimitService
from extsvc.ratelimit.service import add_to_server as add_ratelimit_to_server
from extsvc.reload.provider import (
    ConfigLoader,
    FileWatcher,
    Poller,
    embedded_default_config,
    embedded_default_dir,
)
from extsvc.reload.ratelimit import RateLimitReloader
from extsvc.reload.runtime import Runtime, RuntimeHolder
from extsvc.settings import Settings
from extsvc.supervisor import WORKER_ENV

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: seconds closing plugins and hooks get after the grace period, when it left them less
CLEANUP_S = 1.0


class ExtsvcServer:
    """One extsvc process. ``await start()``, then ``await stop()`` (or ``run()`` for both)."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: PluginHost | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        config_text: str | None = None,
    ) -> None:
        """:param config_text: serve this YAML (from memory, not watched) instead of the embedded
            demo config when ``settings.config`` is None."""
        self.settings = settings
        self._config_text = config_text
        self.host = host or PluginHost.create(
            allow=settings.plugins_allow, block=settings.plugins_block
        )
        self.metrics = metrics or Metrics()
        self.holder = RuntimeHolder()
        self.health = HealthState((AUTHZ_SERVICE, EXTPROC_SERVICE, RLS_SERVICE))
        self.ratelimit = RateLimitReloader(self.metrics, host=self.host)
        #: the one clock of reloads: the config file (when there is one), then the domain files
        self.poller = Poller(settings.reload_interval_s)
        self.loader = ConfigLoader(
            self.holder, self.host, self.metrics, on_first_load=self.health.mark_ready,
            on_load=self._config_loaded, start_timeout_s=settings.plugin_start_timeout_s,
            max_config_bytes=settings.max_config_bytes,
        )
        self.watcher: FileWatcher | None = None
        self.decisions = DecisionLog(
            self.metrics, level=settings.decision_log,
            stdout=settings.decision_log_output == "stdout", sample=settings.decision_log_sample,
            max_per_second=settings.decision_log_max_per_second,
            recent=settings.decision_log_recent, max_readers=settings.decision_stream_max_readers,
            headers=settings.decision_log_headers,
        )
        run_dir = os.environ.get(RUN_DIR_ENV)
        self.admin_api = AdminApi(
            self.decisions, token=read_token(settings.admin_token_file),
            run_dir=Path(run_dir) if run_dir else None,
            worker=int(os.environ.get(WORKER_ENV, "0")),
        )
        #: the tracer, when tracing_endpoint is set (built in start(): it starts a thread)
        self.tracing: Tracing | None = None
        self.admin = AdminServer(
            self.health, self.metrics, self.status,
            max_connections=settings.admin_max_connections,
            request_timeout_s=settings.admin_request_timeout_s,
            grpc_socket=lambda: self.admin_api.socket_path,
        )
        self._reuse_port = reuse_port
        self._server: Any = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.grpc_port = 0

    @property
    def admin_port(self) -> int:
        return self.admin.port

    def status(self) -> dict[str, object]:
        runtime = self.holder.current
        return {
            "pid": os.getpid(),
            "event_loop": running_loop_name(),
            "ready": self.health.ready,
            "config": str(self.settings.config or "<embedded default>"),
            "generation": runtime.generation if runtime else 0,
            # the serving config (source, loaded_at, load_seconds, notes) and, when the file on
            # disk was rejected since, why: what is serving is not what the file says
            "serving": self.loader.serving,
            "last_rejected": self.loader.last_rejected,
            "policies": sorted(runtime.policies) if runtime else [],
            "default_policy": runtime.config.default_policy if runtime else None,
            "extproc_policies": sorted(runtime.extproc.policies) if runtime and runtime.extproc else [],
            "extproc_default_policy": (
                runtime.extproc.config.default_policy if runtime and runtime.extproc else None
            ),
            "plugins": [p.describe() for p in self.host.plugins],
            "ratelimit_domains": self.ratelimit.domains,
            "ratelimit_problems": self.ratelimit.problems,
        }

    async def start(self) -> None:
        s = self.settings
        self._flusher = asyncio.get_running_loop().create_task(self.metrics.run_flusher())
        await self.host.startup(s)
        await self.health.start()
        if s.tracing_endpoint:
            self.tracing = Tracing(
                s.tracing_endpoint, sample_ratio=s.tracing_sample_ratio,
                service_name=s.tracing_service_name, descriptor_values=s.tracing_descriptor_values,
                metrics=self.metrics,
            )
        self.decisions.start()
        await self.admin_api.start()
        await self.admin.start(s.admin_address, reuse_port=self._reuse_port)

        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # Without --workers, refuse to share the port: a second server on it is a mistake.
            ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            # Envoy keeps long-lived HTTP/2 connections and may ping them.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            # Per-connection stream cap (SETTINGS_MAX_CONCURRENT_STREAMS); Envoy opens more
            # connections when it needs more. The global caps are in the services.
            ("grpc.max_concurrent_streams", s.max_streams_per_connection),
            # Connections that never speak HTTP/2, or stop making calls, hold a descriptor each:
            # bounded in time so idle ones cannot use up the process's file descriptors.
            ("grpc.server_handshake_timeout_ms", int(s.grpc_handshake_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(s.grpc_max_connection_idle_s * 1000)),
        ]
        server = grpc.aio.server(options=options)
        services = _GenericHandlersOnly(server)
        limits = RequestLimits.from_settings(s)  # what one request may carry (docs/hardening.md)
        authz = AuthorizationService(
            self.holder,
            self.metrics,
            deadline_margin_s=s.deadline_margin_ms / 1000,
            deadline_margin_ratio=s.deadline_margin_ratio,
            default_timeout_s=s.default_timeout_ms / 1000,
            max_inflight=s.max_authz_inflight,
            limits=limits,
            decisions=self.decisions,
            tracing=self.tracing,
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authz, services)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorService(
                self.holder, self.metrics, max_streams=s.max_extproc_streams, limits=limits,
                decisions=self.decisions, tracing=self.tracing,
            ),
            services,
        )
        add_ratelimit_to_server(
            RateLimitService(
                self.ratelimit, self.metrics,
                deadline_margin_s=s.deadline_margin_ms / 1000,
                deadline_margin_ratio=s.deadline_margin_ratio,
                default_timeout_s=s.default_timeout_ms / 1000,
                decisions=self.decisions,
                tracing=self.tracing,
                decision_values=s.decision_log_descriptor_values,
            ),
            services,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, services)
        if s.reflection:
            # What reflection.enable_server_reflection does for a grpc.aio server, minus the
            # method pre-registration (see _GenericHandlersOnly).
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer(
                    (AUTHZ_SERVICE, EXTPROC_SERVICE, RLS_SERVICE, HEALTH_SERVICE,
                     reflection.SERVICE_NAME)
                ),
                services,
            )
        try:
            if s.tls_cert_file is not None and s.tls_key_file is not None:
                credentials = _server_credentials(
                    s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file
                )
                self.grpc_port = server.add_secure_port(s.grpc_address, credentials)
            else:
                self.grpc_port = server.add_insecure_port(s.grpc_address)
        except RuntimeError:  # grpcio raises (older releases returned 0) when it cannot bind
            self.grpc_port = 0
        if not self.grpc_port:
            # An OSError makes `extsvc serve` exit 2, which --workers does not retry.
            raise OSError(f"cannot listen on {s.grpc_address} (address in use?)")
        await server.start()
        self._server = server
        log.info(
            "serving gRPC on %s (port %d, %s), admin on %s, event loop %s",
            s.grpc_address, self.grpc_port,
            "mTLS" if s.tls_client_ca_file else "TLS" if s.tls_cert_file else "plaintext",
            s.admin_address.rsplit(":", 1)[0] + f":{self.admin_port}", running_loop_name(),
        )
        exposure = exposure_warning(s)
        if exposure and os.environ.get(WORKER_ENV, "0") == "0":  # said once, not by each worker
            log.warning("%s", exposure)

        if s.config is None:
            if self._config_text is None:
                text, source, base = embedded_default_config(), "<embedded default>", embedded_default_dir()
            else:
                text, source, base = self._config_text, "<in-memory config>", Path()
            await self.loader.load_text(text, source=source, base_dir=base)
        else:
            self.watcher = FileWatcher(s.config, self.loader)
            await self.watcher.load_now()
            self.poller.add("config file", self.watcher.poll)
        self.poller.add("rate-limit domain files", self.ratelimit.reload_now)
        self.poller.start()
        # Everything imported and built so far lives as long as the process: move it out of the
        # cyclic GC's reach, so that collections triggered by per-RPC garbage do not walk the
        # whole heap of modules, plugins and compiled config (see bench/authz_bench.py).
        gc.freeze()

    async def stop(self, grace: float | None = None, *, drain_delay: float = 0.0) -> None:
        """Drain and stop; a second call waits for the first instead of stopping twice.

        Health goes NOT_SERVING at once; the gRPC port keeps accepting for ``drain_delay``
        seconds (when the server was ready), so that health checks move traffic away before
        RPCs are refused; then in-flight RPCs get ``grace`` seconds; then plugins are closed,
        within what is left of ``grace`` (at least CLEANUP_S). Whatever overruns is cancelled
        and abandoned, and logged: ``drain_delay + grace (+ CLEANUP_S)`` bounds the whole stop.
        """
        if self._stopping:  # shutdown hooks run once (hookspecs: "Run once when the server stops")
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.grace_period_s if grace is None else grace
        loop = asyncio.get_running_loop()
        try:
            was_ready = self.health.ready
            await self.health.mark_draining()
            if drain_delay > 0 and was_ready and self._server is not None:
                log.info(
                    "health NOT_SERVING; accepting RPCs for %.1fs more (drain_delay_s) while "
                    "health checks move traffic away", drain_delay,
                )
                await asyncio.sleep(drain_delay)
            deadline = loop.time() + grace
            await _bounded("the reload poller", self.poller.stop(), deadline)
            if self._server is not None:
                # Stops accepting new RPCs at once; in-flight ones get `grace` seconds to finish,
                # then grpc cancels them. A handler that ignores its cancellation is abandoned.
                await _bounded("in-flight RPCs", self._server.stop(grace), deadline + CLEANUP_S)
            deadline = max(deadline, loop.time() + CLEANUP_S)
            await _bounded("closing the config's plugins", self.holder.close(), deadline)
            await _bounded("closing the rate-limit service", self.ratelimit.aclose(), deadline)
            await _bounded("the shutdown hooks", self.host.shutdown(), deadline)
            self.health.alive = False
            await _bounded("the admin listener", self.admin.stop(), deadline)
            await _bounded("the admin gRPC API", self.admin_api.stop(), deadline)
            await _bounded("the decision log", self.decisions.stop(), deadline)
            if self.tracing is not None:
                await _bounded("exporting the last spans", self.tracing.stop(), deadline)
        finally:
            if self._flusher is not None:  # its last flush leaves the final counts in place
                self._flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._flusher
            self._stopped.set()
        log.info("stopped")

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop gracefully. SIGHUP re-reads the config.

        The signal handlers are in place before anything starts: a signal during start-up (a
        plugin's start() that hangs, a big first config) cancels the start and stops at once.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_now)
        s = self.settings
        try:
            starting = loop.create_task(self.start(), name="extsvc-start")
            signalled = loop.create_task(stop.wait(), name="extsvc-signal")
            interrupted = False
            try:
                await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                signalled.cancel()
                if not starting.done():
                    interrupted = True
                    log.info("signal received during start-up: stopping")
                    starting.cancel()
                    starting.add_done_callback(forget)
                    await _bounded("start-up", asyncio.wait({starting}), loop.time() + CLEANUP_S)
            if not interrupted:
                starting.result()  # a start-up failure (port in use, plugin error) raises here
                await stop.wait()
                log.info(
                    "signal received: draining (drain delay %.1fs, grace %.1fs)",
                    s.drain_delay_s, s.grace_period_s,
                )
        finally:
            await self.stop(drain_delay=s.drain_delay_s)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(ValueError):
                    loop.remove_signal_handler(sig)

    async def _config_loaded(self, runtime: Runtime, base_dir: Path) -> None:
        await self.ratelimit.apply(runtime.config.ratelimit, base_dir)

    def _reload_now(self) -> None:
        if self.watcher is not None:
            log.info("SIGHUP: checking %s now", self.watcher.path)
            self.watcher.trigger()
        self.poller.wake()


async def _bounded(what: str, step: Awaitable[object], deadline: float) -> None:
    """Await ``step`` until ``deadline`` (loop time); then cancel it, log it, and go on."""
    await stop_step(what, step, deadline, log)


def exposure_warning(settings: Settings) -> str | None:
    """The start-up warning for a gRPC port that any client able to reach it may call.

    None on a loopback address or with mTLS; otherwise one line naming the address and fixes.
    """
    host = settings.grpc_address.rsplit(":", 1)[0].strip("[]")
    if settings.tls_client_ca_file is not None or _is_loopback(host):
        return None
    how = "TLS without client certificates" if settings.tls_cert_file else "plaintext"
    return (
        f"gRPC on {settings.grpc_address} is {how} on a non-loopback address: any client that "
        "reaches it can call ext_authz, ext_proc and the rate-limit service"
        f"{' and reflection' if settings.reflection else ''}. Restrict who reaches it (a "
        "Kubernetes NetworkPolicy), or require mTLS (tls_cert_file, tls_key_file, "
        "tls_client_ca_file), or listen on 127.0.0.1 when Envoy runs beside extsvc"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to, assume it can be reached
        return False


def _server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS (or mTLS with ``client_ca``) credentials that pick up rotated files.

    grpc asks the fetcher on each new connection; the files are re-read only when their
    modification time changes, so cert-manager rotations apply without a restart.
    """

    def read() -> tuple[bytes, bytes, bytes | None]:
        return key.read_bytes(), cert.read_bytes(), client_ca.read_bytes() if client_ca else None

    def stamp() -> tuple[float, ...]:
        return tuple(p.stat().st_mtime for p in (cert, key, client_ca) if p is not None)

    key_pem, cert_pem, ca_pem = read()
    seen = [stamp()]

    def configuration(k: bytes, c: bytes, ca: bytes | None) -> Any:
        return grpc.ssl_server_certificate_configuration([(k, c)], root_certificates=ca)

    def fetch() -> Any:
        try:
            current = stamp()
            if current == seen[0]:
                return None
            seen[0] = current
            log.info("TLS files changed: loading the new certificate")
            return configuration(*read())
        except OSError as exc:  # a half-written rotation: keep the old certificate
            log.error("TLS files unreadable, keeping the current certificate: %s", exc)
            return None

    return grpc.dynamic_ssl_server_credentials(
        configuration(key_pem, cert_pem, ca_pem),
        fetch,
        require_client_authentication=client_ca is not None,
    )


class _GenericHandlersOnly:
    """Adds services to a ``grpc.aio`` server through generic handlers only.

    The generated ``add_*Servicer_to_server`` functions also *pre-register* each method. grpcio's
    asyncio server then keeps one pending "request call" task per registered method (plus one
    for generic calls) and, for every incoming RPC, waits on all of them with
    ``asyncio.wait(FIRST_COMPLETED)`` -- a cost per RPC that grows with the number of methods.
    With our 7 methods (ext_authz, ext_proc, RLS, health x2, reflection) that was ~60-80 µs of
    CPU per RPC on a ~400 µs floor (measured: docs/performance.md). Generic handlers resolve the
    method with one dict lookup per service instead; the service called most comes first.
    """

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Deliberately ignored: the same handlers were added as generic ones just before."""
