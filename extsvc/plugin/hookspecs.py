"""The hooks a plugin may implement.

Registration hooks are synchronous and collected at start-up; lifecycle hooks may be
``async def`` and are awaited in registration order. None of them is called per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from extsvc.plugin.markers import hookspec

if TYPE_CHECKING:
    from extsvc.plugin.records import AuthorizerType, LimitStoreType, ProcessorType
    from extsvc.settings import Settings


class ExtsvcSpecs:
    """Hook specifications of the ``extsvc`` project."""

    @hookspec
    def extsvc_register_authorizers(self) -> Iterable[AuthorizerType[Any]]:
        """Return the ext_authz step kinds this plugin provides.

        Called once at start-up; the results of all plugins are collected. Kind names must be
        unique across plugins: a duplicate stops the server with both plugins named.

        Example::

            @hookimpl
            def extsvc_register_authorizers():
                yield AuthorizerType(name="tenant-header", config_model=TenantHeaderConfig,
                                     factory=TenantHeader, description="allow known tenants")
        """
        raise NotImplementedError

    @hookspec
    def extsvc_register_processors(self) -> Iterable[ProcessorType[Any]]:
        """Return the ext_proc processor kinds this plugin provides.

        Called once at start-up; the results of all plugins are collected. Processor kind names
        must be unique among processor kinds (they may repeat an authorizer kind's name).

        Example::

            class StampConfig(BaseModel, frozen=True, extra="forbid"):
                header: str = "x-stamped"

            class Stamp(Processor):
                def __init__(self, config: StampConfig, ctx: PluginContext) -> None:
                    self._header = config.header

                async def on_request_headers(self, message: HttpMessage, /) -> None:
                    message.set_header(self._header, "1")

            @hookimpl
            def extsvc_register_processors():
                yield ProcessorType(name="stamp", config_model=StampConfig, factory=Stamp,
                                    description="mark requests that passed extsvc")
        """
        raise NotImplementedError

    @hookspec
    def extsvc_register_limit_stores(self) -> Iterable[LimitStoreType[Any]]:
        """Return the rate-limit counter stores this plugin provides.

        Called once at start-up; the results of all plugins are collected. Store names must be
        unique among limit stores and must not be a built-in store type (``memory``, ``redis``,
        ``redis-cluster``, ``plugin``). A config selects one with
        ``ratelimit.store: {type: plugin, plugin: <name>, config: {...}}``; the factory is
        called when that config loads, and the rate-limit service then awaits the store's
        ``apply(ops)`` directly for every request (never through pluggy).

        Example::

            class MemcachedConfig(BaseModel, frozen=True, extra="forbid"):
                servers: list[str]

            class MemcachedStore:
                kind = "memcached"

                def __init__(self, config: MemcachedConfig, ctx: PluginContext) -> None:
                    self._client = Client(config.servers)   # connects lazily

                async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
                    ...   # one (x, y) per op; raise StoreError when the servers fail

                async def aclose(self) -> None:
                    await self._client.close()

            @hookimpl
            def extsvc_register_limit_stores():
                yield LimitStoreType(name="memcached", config_model=MemcachedConfig,
                                     factory=MemcachedStore, description="counters in memcached")
        """
        raise NotImplementedError

    @hookspec
    def extsvc_startup(self, settings: Settings) -> Any:
        """Run once when the server starts, before the first config is loaded.

        May be ``async def``; it is awaited. Raising stops the server (fail loudly).

        Example::

            @hookimpl
            async def extsvc_startup(settings):
                await shared_pool.connect()
        """
        raise NotImplementedError

    @hookspec
    def extsvc_shutdown(self) -> Any:
        """Run once when the server stops, after in-flight requests have finished.

        May be ``async def``; it is awaited. Errors are logged and do not stop other plugins'
        shutdown.

        Example::

            @hookimpl
            async def extsvc_shutdown():
                await shared_pool.close()
        """
        raise NotImplementedError
