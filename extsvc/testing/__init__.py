"""Helpers for testing extsvc and extsvc plugins: request builders and an in-process server.

Plugin authors use the same tools as extsvc's own tests::

    from extsvc.testing import check_context, running_server, check_request

    async def test_my_step():
        decision = await MyStep(MyConfig(...), plugin_context("my-step")).check(
            check_context(path="/x", headers={"x-tenant": "acme"}))
        assert decision is None

:class:`ScriptPlugin` (``extsvc.testing.scripted``) registers ``script`` steps and processors
that answer as their config says, to test a policy around a plugin.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extsvc.app import ExtsvcServer
from extsvc.authz.convert import to_check_context
from extsvc.observability.metrics import Metrics
from extsvc.plugin.check import CheckContext
from extsvc.plugin.context import PluginContext, PluginMetrics
from extsvc.plugin.host import PluginHost
from extsvc.settings import Settings
from extsvc.testing.scripted import ScriptPlugin

__all__ = [
    "ScriptPlugin",
    "authz_stub",
    "check_context",
    "check_request",
    "plugin_context",
    "running_server",
]


def check_request(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    host: str = "example.test",
    body: str | None = None,
    raw_body: bytes | None = None,
    context_extensions: Mapping[str, str] | None = None,
    source: str = "10.0.0.1:40000",
    request_id: str = "test-request-id",
) -> Any:
    """A CheckRequest shaped like the ones Envoy 1.40 sends (docs/internals/envoy-behaviour.md §2.1)."""
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    address, _, port = source.rpartition(":")
    attrs.source.address.socket_address.address = address
    attrs.source.address.socket_address.port_value = int(port)
    http = attrs.request.http
    http.id = "1234567890"
    http.method = method
    http.path = path
    http.host = host
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    all_headers = {
        ":authority": host,
        ":method": method,
        ":path": path,
        ":scheme": "http",
        "x-request-id": request_id,
    }
    all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
    http.headers.update(all_headers)
    if body is not None:
        http.body = body
    if raw_body is not None:
        http.raw_body = raw_body
    if context_extensions:
        attrs.context_extensions.update(context_extensions)
    return request


def check_context(path: str = "/", **kwargs: Any) -> CheckContext:
    """A :class:`CheckContext` built through the real converter from :func:`check_request`."""
    return to_check_context(check_request(path, **kwargs))


def plugin_context(plugin: str = "test", policy: str = "test", **kwargs: Any) -> PluginContext:
    """A :class:`PluginContext` for constructing a plugin step directly in a test."""
    return PluginContext(
        plugin=plugin,
        policy=policy,
        step=kwargs.pop("step", plugin),
        logger=logging.getLogger(f"extsvc.plugin.{plugin}"),
        metrics=PluginMetrics(kwargs.pop("metrics", Metrics()), plugin, policy),
        **kwargs,
    )


@asynccontextmanager
async def running_server(
    config: str | Path | None = None,
    *,
    host: PluginHost | None = None,
    **settings: Any,
) -> AsyncIterator[ExtsvcServer]:
    """An :class:`ExtsvcServer` on 127.0.0.1 with free ports, stopped on exit.

    :param config: YAML text, a path to a file, or None for the embedded demo config. YAML text
        is served from memory (no file watch); pass a path to exercise reloads.
    """
    text: str | None = None
    if isinstance(config, str):
        text, config = config, None
    settings.setdefault("grpc_address", "127.0.0.1:0")
    settings.setdefault("admin_address", "127.0.0.1:0")
    settings.setdefault("grace_period_s", 1.0)
    server = ExtsvcServer(
        Settings.load({"config": config, **settings}, env={}), host=host, config_text=text
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def authz_stub(channel: grpc.aio.Channel) -> Any:
    """An ``Authorization`` client stub on ``channel``."""
    return external_auth_pb2_grpc.AuthorizationStub(channel)
