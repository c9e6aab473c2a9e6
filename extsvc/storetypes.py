"""The built-in rate-limit store types, by name (bottom floor).

The plugin host refuses a plugin limit store named like one of them; the rate-limit section's
``StoreType`` (extsvc.config.ratelimit) lists the same names plus ``plugin``
(tests/unit/test_layers.py checks that the two agree).
"""

from __future__ import annotations

#: ``ratelimit.store.type`` values that name a built-in store (and ``plugin``, the plugin marker)
BUILTIN_STORE_NAMES = frozenset({"memory", "redis", "redis-cluster", "plugin"})
