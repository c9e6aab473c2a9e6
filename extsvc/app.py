"""Builds and runs one server process: plugin host, config, gRPC server, admin listener.

Start order: plugins' start-up hooks -> admin listener and gRPC port (health NOT_SERVING) -> first
config load -> SERVING. Stop order (SIGTERM/SIGINT): NOT_SERVING -> stop accepting, let in-flight
RPCs finish within the grace period -> close the runtime's plugins -> shutdown hooks -> exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from extsvc.authz.service import SERVICE_NAME as AUTHZ_SERVICE
from extsvc.authz.service import AuthorizationService
from extsvc.config.provider import (
    ConfigLoader,
    FileWatcher,
    embedded_default_config,
    embedded_default_dir,
)
from extsvc.config.runtime import Runtime, RuntimeHolder
from extsvc.eventloop import running_loop_name
from extsvc.extproc.service import SERVICE_NAME as EXTPROC_SERVICE
from extsvc.extproc.service import ExternalProcessorService
from extsvc.observability.admin import AdminServer
from extsvc.observability.health import HealthState
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.ratelimit.manager import RateLimitManager
from extsvc.ratelimit.service import SERVICE_NAME as RLS_SERVICE
from extsvc.ratelimit.service import RateLimitService
from extsvc.ratelimit.service import add_to_server as add_ratelimit_to_server
from extsvc.settings import Settings

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


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
        self.ratelimit = RateLimitManager(
            self.metrics, reload_interval_s=settings.reload_interval_s, host=self.host
        )
        self.loader = ConfigLoader(
            self.holder, self.host, self.metrics, on_first_load=self.health.mark_ready,
            on_load=self._config_loaded,
        )
        self.watcher: FileWatcher | None = None
        self.admin = AdminServer(self.health, self.metrics, self.status)
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
            "policies": sorted(runtime.policies) if runtime else [],
            "default_policy": runtime.config.default_policy if runtime else None,
            "plugins": [p.describe() for p in self.host.plugins],
            "ratelimit_domains": self.ratelimit.domains,
            "ratelimit_problems": self.ratelimit.problems,
        }

    async def start(self) -> None:
        s = self.settings
        self._flusher = asyncio.get_running_loop().create_task(self.metrics.run_flusher())
        await self.host.startup(s)
        await self.health.start()
        await self.admin.start(s.admin_address, reuse_port=self._reuse_port)

        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # Without --workers, refuse to share the port: a second server on it is a mistake.
            ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            # Envoy keeps long-lived HTTP/2 connections and may ping them.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]
        server = grpc.aio.server(options=options)
        services = _GenericHandlersOnly(server)
        authz = AuthorizationService(
            self.holder,
            self.metrics,
            deadline_margin_s=s.deadline_margin_ms / 1000,
            default_timeout_s=s.default_timeout_ms / 1000,
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authz, services)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorService(self.holder, self.metrics), services
        )
        add_ratelimit_to_server(
            RateLimitService(
                self.ratelimit, self.metrics,
                deadline_margin_s=s.deadline_margin_ms / 1000,
                default_timeout_s=s.default_timeout_ms / 1000,
            ),
            services,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, services)
        # What reflection.enable_server_reflection does for a grpc.aio server, minus the
        # method pre-registration (see _GenericHandlersOnly).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (AUTHZ_SERVICE, EXTPROC_SERVICE, RLS_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
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

        if s.config is None:
            if self._config_text is None:
                text, source, base = embedded_default_config(), "<embedded default>", embedded_default_dir()
            else:
                text, source, base = self._config_text, "<in-memory config>", Path()
            await self.loader.load_text(text, source=source, base_dir=base)
        else:
            self.watcher = FileWatcher(s.config, self.loader, s.reload_interval_s)
            await self.watcher.load_now()
            self.watcher.start()
        # Everything imported and built so far lives as long as the process: move it out of the
        # cyclic GC's reach, so that collections triggered by per-RPC garbage do not walk the
        # whole heap of modules, plugins and compiled config (see bench/authz_bench.py).
        gc.freeze()

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; a second call waits for the first instead of stopping twice."""
        if self._stopping:  # shutdown hooks run once (hookspecs: "Run once when the server stops")
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.grace_period_s if grace is None else grace
        try:
            await self.health.mark_draining()
            if self.watcher is not None:
                await self.watcher.stop()
            if self._server is not None:
                # Stops accepting new RPCs at once; in-flight ones get `grace` seconds to finish.
                await self._server.stop(grace)
            await self.holder.close()
            await self.ratelimit.aclose()
            await self.host.shutdown()
            self.health.alive = False
            await self.admin.stop()
        finally:
            if self._flusher is not None:  # its last flush leaves the final counts in place
                self._flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._flusher
            self._stopped.set()
        log.info("stopped")

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop gracefully. SIGHUP re-reads the config."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_now)
        try:
            await self.start()
            await stop.wait()
            log.info("signal received: draining (grace %.1fs)", self.settings.grace_period_s)
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(ValueError):
                    loop.remove_signal_handler(sig)

    async def _config_loaded(self, runtime: Runtime, base_dir: Path) -> None:
        await self.ratelimit.apply(runtime.config.ratelimit, base_dir)

    def _reload_now(self) -> None:
        if self.watcher is not None:
            log.info("SIGHUP: checking %s now", self.watcher.path)
            self.watcher.trigger()


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
