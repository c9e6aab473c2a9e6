"""Counter stores that plugins provide: ``store: {type: plugin, plugin: <name>, config: {...}}``.

A plugin registers a :class:`extsvc.plugin.records.LimitStoreType` (hook
``extsvc_register_limit_stores``). Its ``config`` block is validated when the extsvc config is
compiled (:func:`extsvc.reload.compile.check_plugins`), so a bad field rejects the config and the
last good one keeps serving. The factory runs here, once each time the store settings change; the
limiter then awaits the built object's ``apply`` directly for every request, never through pluggy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from extsvc.config.ratelimit import StoreSettings
from extsvc.errors import ConfigError, StoreError
from extsvc.plugin.context import PluginContext, PluginMetrics
from extsvc.plugin.protocols import Startable
from extsvc.ratelimit.algorithms import Op
from extsvc.ratelimit.store import LimitStore

if TYPE_CHECKING:
    from extsvc.plugin.host import PluginHost

#: The ``policy`` label of a store plugin's context (and so of the metrics it defines).
CONTEXT_POLICY = "ratelimit"


class PluginStore:
    """A plugin's store as the limiter sees it.

    ``kind`` is the name the store was registered under, not what the object calls itself: that
    is the name the config and ``extsvc_ratelimit_store_errors_total{store}`` use, and it can never
    be ``memory``, so the limiter always bounds the call by the RPC's deadline. Anything the store
    raises besides :class:`StoreError` is a bug in third-party code; it is turned into a
    StoreError so that the request is answered per ``failure_mode`` (and logged with the store
    named) instead of failing the RPC.
    """

    __slots__ = ("kind", "store")

    def __init__(self, name: str, store: LimitStore) -> None:
        self.kind = name
        self.store = store

    async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        try:
            return await self.store.apply(ops)
        except StoreError:
            raise
        except Exception as exc:  # isolate the plugin's failure: failure_mode answers it
            raise StoreError(f"store plugin {self.kind!r} raised {exc!r}") from exc

    async def aclose(self) -> None:
        await self.store.aclose()


async def build_plugin_store(
    settings: StoreSettings, host: PluginHost | None, metrics: Any, base_dir: Path
) -> PluginStore:
    """Validate ``settings.config``, call the plugin's factory, and ``start()`` the store.

    :param metrics: the :class:`extsvc.observability.metrics.Metrics` the store's context uses.
    :param base_dir: the config file's folder (``ctx.resolve`` and ``ctx.read_secret_file``).
    :raises ConfigError: unknown store, invalid config (both are normally caught earlier, when
        the config is compiled), or a factory or ``start()`` that fails.
    """
    name = settings.plugin or ""
    kind = host.limit_stores.get(name) if host is not None else None
    if kind is None:
        known = ", ".join(sorted(host.limit_stores)) if host is not None else ""
        raise ConfigError(f"ratelimit.store.plugin: unknown limit store {name!r} (known: {known or 'none'})")
    try:
        config = kind.config_model.model_validate(settings.config)
    except ValidationError as exc:
        raise ConfigError(f"ratelimit.store.config: {exc}") from exc
    ctx = PluginContext(
        plugin=name,
        policy=CONTEXT_POLICY,
        step="store",
        logger=logging.getLogger(f"extsvc.plugin.{name}"),
        metrics=PluginMetrics(metrics, name, CONTEXT_POLICY),
        base_dir=base_dir,
    )
    try:
        store = kind.factory(config, ctx)
    except Exception as exc:  # a plugin's constructor is third-party code
        raise ConfigError(f"ratelimit.store: store plugin {name!r} failed to build: {exc}") from exc
    if not isinstance(store, LimitStore):
        raise ConfigError(
            f"ratelimit.store: store plugin {name!r} built {type(store).__name__}, which is not a "
            "LimitStore (kind, async apply(ops), async aclose())"
        )
    if isinstance(store, Startable):
        try:
            await store.start()
        except Exception as exc:  # a plugin's start-up is third-party code
            await _close_quietly(store)
            raise ConfigError(f"ratelimit.store: store plugin {name!r} failed to start: {exc}") from exc
    return PluginStore(name, store)


async def _close_quietly(store: LimitStore) -> None:
    try:
        await store.aclose()
    except Exception:  # closing a store that failed to start must not hide why it failed
        logging.getLogger(__name__).exception("closing store %s failed", type(store).__name__)
