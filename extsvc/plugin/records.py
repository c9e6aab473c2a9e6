"""Frozen records that registration hooks return."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from extsvc.extproc.model import Processor
    from extsvc.plugin.context import PluginContext
    from extsvc.plugin.protocols import Authorizer
    from extsvc.ratelimit.store import LimitStore

ConfigT = TypeVar("ConfigT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class AuthorizerType(Generic[ConfigT]):
    """An ext_authz step kind a plugin provides.

    :param name: the kind, as written in a policy step's ``plugin:`` field (kebab-case, unique).
    :param config_model: the pydantic model the step's ``config:`` block is validated against at
        load time. Declare it ``frozen=True, extra="forbid"`` so typos are rejected.
    :param factory: ``factory(config, ctx)`` returns the object that answers requests (see
        :class:`extsvc.plugin.protocols.Authorizer`). Called once per step at each config load.
    :param description: one line for ``extsvc plugins list``.
    """

    name: str
    config_model: type[ConfigT]
    factory: Callable[[ConfigT, PluginContext], Authorizer]
    description: str = ""


@dataclass(frozen=True, slots=True)
class ProcessorType(Generic[ConfigT]):
    """An ext_proc processor kind a plugin provides.

    :param name: the kind, as written in a policy's ``processors[].plugin`` (kebab-case, unique
        among processor kinds).
    :param config_model: the pydantic model the processor's ``config:`` block is validated
        against at load time (``frozen=True, extra="forbid"``).
    :param factory: ``factory(config, ctx)`` returns a :class:`extsvc.Processor`. Called once per
        processor entry at each config load; the object serves every stream of that policy.
    :param description: one line for ``extsvc plugins list``.
    """

    name: str
    config_model: type[ConfigT]
    factory: Callable[[ConfigT, PluginContext], Processor]
    description: str = ""


@dataclass(frozen=True, slots=True)
class LimitStoreType(Generic[ConfigT]):
    """A rate-limit counter store a plugin provides (memcached, a database, ...).

    :param name: what the ``ratelimit.store.plugin`` field names (kebab-case, unique among limit
        stores, and not one of the built-in store types ``memory``, ``redis``, ``redis-cluster``).
        Metrics and logs label the store with it.
    :param config_model: the pydantic model the ``ratelimit.store.config`` block is validated
        against at load time (``frozen=True, extra="forbid"``).
    :param factory: ``factory(config, ctx)`` returns a :class:`extsvc.ratelimit.store.LimitStore`.
        Called once each time the store settings change (not per request); the object then
        serves every request until it is replaced, when its ``aclose()`` is awaited.
    :param description: one line for ``extsvc plugins list``.
    """

    name: str
    config_model: type[ConfigT]
    factory: Callable[[ConfigT, PluginContext], LimitStore]
    description: str = ""


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    """What ``extsvc plugins list`` shows about one registered plugin."""

    name: str
    source: str  # "builtin" or "entry point <dist> <version>"
    location: str  # the module file
    kinds: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "location": self.location,
            "kinds": list(self.kinds),
        }
