"""The plugin host: the only place that talks to pluggy.

It registers the built-in plugins from a fixed list and third-party plugins from the ``extsvc``
entry-point group (honouring the allow and block lists), checks every hook implementation at
start-up, and collects the step kinds and rate-limit stores into a plain registry that config
compilation (and the rate-limit reloader) uses. The request path never sees the PluginManager.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from extsvc.errors import PluginError
from extsvc.plugin.hookspecs import ExtsvcSpecs
from extsvc.plugin.markers import ENTRY_POINT_GROUP, PROJECT
from extsvc.plugin.records import AuthorizerType, LimitStoreType, LoadedPlugin, ProcessorType
from extsvc.storetypes import BUILTIN_STORE_NAMES

if TYPE_CHECKING:
    from extsvc.settings import Settings

log = logging.getLogger(__name__)

#: Built-in plugins, registered in this order under the name on the left.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("allow", "extsvc_plugins.allow"),
    ("deny", "extsvc_plugins.deny"),
    ("header-match", "extsvc_plugins.header_match"),
    ("set-headers", "extsvc_plugins.set_headers"),
    ("jwt", "extsvc_plugins.jwt_auth"),
    ("api-key", "extsvc_plugins.api_key"),
    ("basic-auth", "extsvc_plugins.basic_auth"),
    ("client-cidr", "extsvc_plugins.client_cidr"),
    ("oauth2-introspection", "extsvc_plugins.oauth2_introspection"),
    ("headers", "extsvc_plugins.headers"),
    ("request-id", "extsvc_plugins.request_id"),
    ("json-redact", "extsvc_plugins.json_redact"),
    ("body-limit", "extsvc_plugins.body_limit"),
    ("response-timing", "extsvc_plugins.response_timing"),
)

#: Hooks whose implementations must be plain functions (their results are collected).
_SYNC_HOOKS = frozenset(
    {"extsvc_register_authorizers", "extsvc_register_processors", "extsvc_register_limit_stores"}
)

#: BUILTIN_STORE_NAMES (extsvc.storetypes): what ``ratelimit.store.type`` spells itself: a
#: plugin store taking one of these names would make a config read two ways (and ``plugin`` is
#: how a config selects a plugin store).
__all__ = ["BUILTIN_STORE_NAMES", "PluginHost"]


class PluginHost:
    """A typed facade over pluggy; build one per process with :meth:`create`."""

    def __init__(self, pm: pluggy.PluginManager, loaded: list[LoadedPlugin]) -> None:
        self._pm = pm
        self._loaded = loaded
        self.authorizers: dict[str, AuthorizerType[Any]] = {}
        self._kind_owner: dict[str, str] = {}
        self.processors: dict[str, ProcessorType[Any]] = {}
        self._processor_owner: dict[str, str] = {}
        self.limit_stores: dict[str, LimitStoreType[Any]] = {}
        self._limit_store_owner: dict[str, str] = {}
        #: entry-point names seen at start-up (None: entry points were not loaded)
        self._entry_points_at_start: frozenset[str] | None = None

    @classmethod
    def create(
        cls,
        *,
        allow: Sequence[str] | None = None,
        block: Sequence[str] = (),
        builtins: Iterable[tuple[str, str]] = BUILTIN_PLUGINS,
        extra_plugins: Iterable[tuple[str, object]] = (),
        load_entry_points: bool = True,
    ) -> PluginHost:
        """Register and check every plugin, then collect the kinds they provide.

        :param allow: if given, only third-party plugins with these entry-point names load.
        :param block: plugin names (built-in or entry point) that never load.
        :param extra_plugins: ``(name, module_or_object)`` registered directly (tests, embedding).
            An object that an entry point also provides (a plugin's own tests, run with its
            package installed) is registered once, under the name given here.
        :raises PluginError: import failure, misspelled hook, async impl of a sync hook,
            duplicate kind name, a limit store named like a built-in store type.
        """
        extras = list(extra_plugins)
        extra_objects = {id(plugin) for _, plugin in extras}
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(ExtsvcSpecs)
        blocked = set(block)
        for name in blocked:
            pm.set_blocked(name)
        loaded: list[LoadedPlugin] = []

        for name, module_name in builtins:
            if name in blocked:
                log.info("built-in plugin %s is blocked", name)
                continue
            module = importlib.import_module(module_name)
            cls._register(pm, name, module)
            loaded.append(LoadedPlugin(name, "builtin", _location(module), ()))

        if load_entry_points:
            for ep in _entry_points():
                if ep.name in blocked:
                    log.info("plugin %s (entry point %s) is blocked", ep.name, ep.value)
                    continue
                if allow is not None and ep.name not in allow:
                    log.info("plugin %s is not in the allow list; not loaded", ep.name)
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:  # any import failure must stop an auth server
                    raise PluginError(
                        f"entry point {ep.value!r} failed to import: {exc!r}", plugin=ep.name
                    ) from exc
                if id(plugin) in extra_objects:
                    log.debug("plugin %s (entry point %s) is also in extra_plugins: registered once, "
                              "from there", ep.name, ep.value)
                    continue
                cls._register(pm, ep.name, plugin)
                dist = ep.dist
                source = (
                    f"entry point ({dist.name} {dist.version})" if dist is not None else "entry point"
                )
                loaded.append(LoadedPlugin(ep.name, source, _location(plugin), ()))

        for name, plugin in extras:
            cls._register(pm, name, plugin)
            loaded.append(LoadedPlugin(name, "embedded", _location(plugin), ()))

        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            # the name it was registered under (entry-point or built-in name), as other errors use
            plugin_name = pm.get_name(exc.plugin) or str(
                getattr(exc.plugin, "__name__", repr(exc.plugin))
            )
            raise PluginError(f"implements an unknown hook: {exc}", plugin=plugin_name) from exc

        host = cls(pm, loaded)
        host._collect_kinds()
        if load_entry_points:
            host._entry_points_at_start = frozenset(ep.name for ep in _entry_points())
        return host

    def entry_points_added(self) -> list[str]:
        """Entry points of the ``extsvc`` group installed since this host was created.

        A running process cannot load them (a plugin's import may have side effects, and a
        reload must not change which code runs): config errors name them with a restart hint.
        """
        if self._entry_points_at_start is None:
            return []
        importlib.invalidate_caches()  # see distributions installed after the first lookup
        now = {ep.name: ep for ep in _entry_points()}
        return [
            f"{name} ({ep.dist.name if ep.dist else ep.value})"
            for name, ep in sorted(now.items())
            if name not in self._entry_points_at_start
        ]

    @staticmethod
    def _register(pm: pluggy.PluginManager, name: str, plugin: object) -> None:
        if pm.get_plugin(name) is not None:
            raise PluginError("a plugin with this name is already registered", plugin=name)
        try:
            pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(str(exc), plugin=name) from exc
        for hook_caller in pm.get_hookcallers(plugin) or ():
            firstresult = bool(hook_caller.spec and hook_caller.spec.opts.get("firstresult"))
            for impl in hook_caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                is_async = inspect.iscoroutinefunction(impl.function) or (
                    inspect.isasyncgenfunction(impl.function)
                )
                if is_async and (firstresult or hook_caller.name in _SYNC_HOOKS):
                    pm.unregister(plugin)
                    raise PluginError(
                        f"{hook_caller.name} must not be async (its result is used directly)",
                        plugin=name,
                    )

    def _collect(
        self, hook_name: str, record_type: type[Any], what: str, reserved: frozenset[str] = frozenset()
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The records one registration hook returns, by name, and the plugin owning each name.

        :param what: how errors call the kind ("authorizer kind", "limit store").
        :param reserved: names a plugin may not take (the built-in store types).
        :raises PluginError: a record of another type, a reserved or an already provided name.
        """
        records: dict[str, Any] = {}
        owners: dict[str, str] = {}
        # Each implementation is called directly, not through ``pm.hook``: the host must know
        # which plugin returned which record (to name the owner of a duplicate), which a hook
        # call's merged result list does not say; and the lifecycle hooks below may be async,
        # which pluggy cannot await. These calls run once per process, so pluggy's tracing
        # (``pm.trace``) is the only thing lost: the log names each plugin instead.
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():  # registration order
            result: Iterable[object] = impl.function() or ()
            for record in result:
                if not isinstance(record, record_type):
                    raise PluginError(
                        f"{hook_name} returned {type(record).__name__}, "
                        f"expected {record_type.__name__}",
                        plugin=impl.plugin_name,
                    )
                if record.name in reserved:
                    raise PluginError(
                        f"{what} {record.name!r} clashes with a built-in store type "
                        f"(reserved: {', '.join(sorted(reserved))})",
                        plugin=impl.plugin_name,
                    )
                owner = owners.get(record.name)
                if owner is not None:
                    raise PluginError(
                        f"{what} {record.name!r} is already provided by plugin {owner!r}",
                        plugin=impl.plugin_name,
                    )
                records[record.name] = record
                owners[record.name] = impl.plugin_name
        return records, owners

    def _collect_kinds(self) -> None:
        self.authorizers, self._kind_owner = self._collect(
            "extsvc_register_authorizers", AuthorizerType, "authorizer kind"
        )
        self.processors, self._processor_owner = self._collect(
            "extsvc_register_processors", ProcessorType, "processor kind"
        )
        self.limit_stores, self._limit_store_owner = self._collect(
            "extsvc_register_limit_stores", LimitStoreType, "limit store", BUILTIN_STORE_NAMES
        )
        owners = (self._kind_owner, self._processor_owner, self._limit_store_owner)
        self._loaded = [
            LoadedPlugin(
                p.name, p.source, p.location,
                tuple(name for owner in owners for name, by in owner.items() if by == p.name),
            )
            for p in self._loaded
        ]

    def limit_store_owner(self, name: str) -> str | None:
        return self._limit_store_owner.get(name)

    @property
    def plugins(self) -> list[LoadedPlugin]:
        """Every registered plugin, in registration order."""
        return list(self._loaded)

    def kind_owner(self, kind: str) -> str | None:
        return self._kind_owner.get(kind)

    async def startup(self, settings: Settings) -> None:
        """Run every ``extsvc_startup`` hook; an error stops the server."""
        for impl in self._pm.hook.extsvc_startup.get_hookimpls():
            try:
                result = impl.function(*[settings for _ in impl.argnames])
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # a plugin failing to start must stop the server
                raise PluginError(f"extsvc_startup failed: {exc!r}", plugin=impl.plugin_name) from exc

    async def shutdown(self) -> None:
        """Run every ``extsvc_shutdown`` hook; errors are logged, the others still run."""
        for impl in self._pm.hook.extsvc_shutdown.get_hookimpls():
            try:
                result = impl.function()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # isolate one plugin's shutdown failure from the others
                log.exception("plugin %s: extsvc_shutdown failed", impl.plugin_name)


def _entry_points() -> list[EntryPoint]:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _location(plugin: object) -> str:
    if isinstance(plugin, ModuleType):
        return str(getattr(plugin, "__file__", "") or plugin.__name__)
    module = inspect.getmodule(plugin)
    return str(getattr(module, "__file__", "") or type(plugin).__qualname__)
