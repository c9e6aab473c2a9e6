"""The built-in stores by their settings: counters in this process, or in Redis (a plugin's store
is built by :mod:`extsvc.ratelimit.store.plugin`, which needs the plugin host)."""

from __future__ import annotations

import time
from collections.abc import Callable

from extsvc.config.ratelimit import StoreSettings, StoreType
from extsvc.errors import ConfigError
from extsvc.ratelimit.store import LimitStore
from extsvc.ratelimit.store.memory import MemoryStore


def build_store(settings: StoreSettings, clock: Callable[[], float] = time.time) -> LimitStore:
    """A built-in store (``type: plugin`` needs the plugin host: ``build_plugin_store``)."""
    if settings.type is StoreType.PLUGIN:
        raise ConfigError("ratelimit.store: a plugin store is built with the plugin host")
    if settings.type is StoreType.MEMORY:
        return MemoryStore(clock)
    from extsvc.ratelimit.store.redis import build_redis_store  # only needs redis when used

    return build_redis_store(settings)
