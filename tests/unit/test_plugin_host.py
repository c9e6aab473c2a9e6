"""PluginHost: built-ins, entry points, allow/block lists, hook checks, lifecycle hooks."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from typing import Any

import pytest
from pydantic import BaseModel

from extsvc import AuthorizerType, Decision, hookimpl
from extsvc.cli import main
from extsvc.errors import PluginError
from extsvc.plugin import host as host_module
from extsvc.plugin.host import BUILTIN_PLUGINS, PluginHost
from extsvc.settings import Settings

BUILTIN_KINDS = {
    "allow", "deny", "header-match", "set-headers",
    "jwt", "api-key", "basic-auth", "client-cidr", "oauth2-introspection",
}


class EmptyConfig(BaseModel, frozen=True, extra="forbid"):
    pass


class Nothing:
    def __init__(self, config: EmptyConfig, ctx: object) -> None:
        pass

    async def check(self, request: object, /) -> Decision | None:
        return None


def kind(name: str) -> AuthorizerType[Any]:
    return AuthorizerType(name=name, config_model=EmptyConfig, factory=Nothing)


class Provides:
    """A plugin object providing the given kinds."""

    def __init__(self, *names: str) -> None:
        self.names = names

    @hookimpl
    def extsvc_register_authorizers(self) -> list[AuthorizerType[Any]]:
        return [kind(n) for n in self.names]


def names(host: PluginHost) -> list[str]:
    return [p.name for p in host.plugins]


# -- built-ins and the example entry-point plugin -------------------------------------------------


def test_builtins_are_registered_in_order_with_their_kinds() -> None:
    host = PluginHost.create(load_entry_points=False)
    assert names(host) == [name for name, _ in BUILTIN_PLUGINS]
    assert set(host.authorizers) == BUILTIN_KINDS
    by_name = {p.name: p for p in host.plugins}
    assert by_name["header-match"].kinds == ("header-match",)
    assert by_name["allow"].source == "builtin"
    assert by_name["allow"].location.endswith("extsvc_plugins/allow.py")
    assert host.kind_owner("set-headers") == "set-headers"
    assert host.kind_owner("nope") is None


def test_example_plugin_loads_through_its_real_entry_point() -> None:
    host = PluginHost.create()
    assert "tenant-header" in host.authorizers
    assert host.kind_owner("tenant-header") == "acme"
    acme = {p.name: p for p in host.plugins}["acme"]
    assert acme.source == "entry point (acme-extsvc 1.0.0)"
    assert acme.kinds == ("tenant-header",)
    assert acme.location.endswith("acme_extsvc/plugin.py")
    assert acme.describe() == {
        "name": "acme",
        "source": "entry point (acme-extsvc 1.0.0)",
        "location": acme.location,
        "kinds": ["tenant-header"],
    }


def test_allow_list_admits_listed_entry_points_only() -> None:
    assert "tenant-header" in PluginHost.create(allow=["acme"]).authorizers
    excluded = PluginHost.create(allow=["someone-else"])
    assert "tenant-header" not in excluded.authorizers
    assert "acme" not in names(excluded)
    # the allow list is about third-party plugins: built-ins still load
    assert set(excluded.authorizers) == BUILTIN_KINDS


def test_block_list_excludes_an_entry_point_plugin() -> None:
    host = PluginHost.create(block=["acme"])
    assert "acme" not in names(host)
    assert "tenant-header" not in host.authorizers


def test_block_list_wins_over_the_allow_list() -> None:
    host = PluginHost.create(allow=["acme"], block=["acme"])
    assert "tenant-header" not in host.authorizers


def test_block_list_can_block_a_builtin() -> None:
    host = PluginHost.create(block=["deny"], load_entry_points=False)
    assert "deny" not in names(host)
    assert set(host.authorizers) == BUILTIN_KINDS - {"deny"}


def test_plugins_list_cli_shows_the_entry_point_source(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("EXTSVC_PLUGINS_ALLOW", "EXTSVC_PLUGINS_BLOCK"):
        monkeypatch.delenv(key, raising=False)
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    acme_line = next(line for line in out.splitlines() if line.startswith("acme "))
    assert "entry point (acme-extsvc 1.0.0)" in acme_line
    assert "kinds: tenant-header" in acme_line

    assert main(["plugins", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["source"] for r in rows}["acme"] == "entry point (acme-extsvc 1.0.0)"
    assert {r["name"] for r in rows} >= {"allow", "deny", "header-match", "set-headers", "acme"}


def test_plugins_list_cli_honours_the_block_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXTSVC_PLUGINS_ALLOW", raising=False)
    monkeypatch.setenv("EXTSVC_PLUGINS_BLOCK", "acme, deny")
    assert main(["plugins", "list", "--json"]) == 0
    listed = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert "acme" not in listed
    assert "deny" not in listed
    assert "allow" in listed


# -- entry points that fail ----------------------------------------------------------------------


def broken_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="broken", value="no_such_module_xyz", group="extsvc")
    monkeypatch.setattr(host_module, "_entry_points", lambda: [ep])


def test_an_entry_point_that_fails_to_import_is_a_plugin_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken_entry_point(monkeypatch)
    with pytest.raises(PluginError) as info:
        PluginHost.create()
    assert info.value.plugin == "broken"
    assert "no_such_module_xyz" in str(info.value)
    assert "failed to import" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_a_blocked_or_not_allowed_entry_point_is_never_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken_entry_point(monkeypatch)
    assert "broken" not in names(PluginHost.create(block=["broken"]))
    assert "broken" not in names(PluginHost.create(allow=[]))


def test_entry_points_are_not_loaded_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    broken_entry_point(monkeypatch)
    host = PluginHost.create(load_entry_points=False)
    assert "broken" not in names(host)


# -- hook implementation checks ------------------------------------------------------------------


class Misspelled:
    @hookimpl
    def extsvc_register_authorizer(self) -> list[AuthorizerType[Any]]:  # missing "s"
        return [kind("typo")]


def test_a_misspelled_hook_fails_naming_the_plugin() -> None:
    with pytest.raises(PluginError) as info:
        PluginHost.create(extra_plugins=[("typo-plugin", Misspelled())], load_entry_points=False)
    assert info.value.plugin == "typo-plugin"
    assert "extsvc_register_authorizer" in str(info.value)
    assert "unknown hook" in str(info.value)


def test_duplicate_kind_names_fail_naming_both_plugins() -> None:
    with pytest.raises(PluginError) as info:
        PluginHost.create(
            extra_plugins=[("first", Provides("shared")), ("second", Provides("shared"))],
            load_entry_points=False,
        )
    assert info.value.plugin == "second"
    message = str(info.value)
    assert "'second'" in message
    assert "'first'" in message
    assert "'shared'" in message


def test_a_kind_that_shadows_a_builtin_fails() -> None:
    with pytest.raises(PluginError) as info:
        PluginHost.create(extra_plugins=[("mine", Provides("allow"))], load_entry_points=False)
    assert info.value.plugin == "mine"
    assert "already provided by plugin 'allow'" in str(info.value)


def test_two_plugins_with_the_same_name_fail() -> None:
    with pytest.raises(PluginError) as info:
        PluginHost.create(extra_plugins=[("allow", Provides("other"))], load_entry_points=False)
    assert info.value.plugin == "allow"
    assert "already registered" in str(info.value)


def test_an_installed_plugin_passed_in_extra_plugins_is_registered_once() -> None:
    # A plugin's own tests, run with its package installed, pass the module they import: the
    # entry point loads that same module object, which must not count as a duplicate.
    import acme_extsvc.plugin

    host = PluginHost.create(extra_plugins=[("mine", acme_extsvc.plugin)])
    assert host.kind_owner("tenant-header") == "mine"
    by_name = {p.name: p for p in host.plugins}
    assert "acme" not in by_name
    assert (by_name["mine"].source, by_name["mine"].kinds) == ("embedded", ("tenant-header",))
    # Under the entry point's own name too.
    same_name = PluginHost.create(extra_plugins=[("acme", acme_extsvc.plugin)])
    assert same_name.kind_owner("tenant-header") == "acme"


def test_another_object_with_an_installed_kind_is_still_a_duplicate() -> None:
    with pytest.raises(PluginError) as info:
        PluginHost.create(extra_plugins=[("mine", Provides("tenant-header"))])
    assert "already provided by plugin 'acme'" in str(info.value)


class AsyncRegister:
    @hookimpl
    async def extsvc_register_authorizers(self) -> list[AuthorizerType[Any]]:
        return [kind("async-kind")]


class AsyncGenRegister:
    @hookimpl
    async def extsvc_register_authorizers(self) -> Any:
        yield kind("async-gen-kind")


@pytest.mark.parametrize("plugin", [AsyncRegister(), AsyncGenRegister()], ids=["coroutine", "asyncgen"])
def test_an_async_register_hook_is_rejected(plugin: object) -> None:
    with pytest.raises(PluginError) as info:
        PluginHost.create(extra_plugins=[("async-one", plugin)], load_entry_points=False)
    assert info.value.plugin == "async-one"
    assert "extsvc_register_authorizers must not be async" in str(info.value)


class ReturnsWrongThing:
    @hookimpl
    def extsvc_register_authorizers(self) -> list[object]:
        return [{"name": "dict-kind"}]


def test_a_register_hook_returning_something_else_fails() -> None:
    with pytest.raises(PluginError) as info:
        PluginHost.create(extra_plugins=[("wrong", ReturnsWrongThing())], load_entry_points=False)
    assert info.value.plugin == "wrong"
    assert "returned dict, expected AuthorizerType" in str(info.value)


class ReturnsNone:
    @hookimpl
    def extsvc_register_authorizers(self) -> None:
        return None


def test_a_register_hook_returning_none_provides_nothing() -> None:
    host = PluginHost.create(extra_plugins=[("none", ReturnsNone())], load_entry_points=False)
    assert {p.name: p.kinds for p in host.plugins}["none"] == ()
    assert set(host.authorizers) == BUILTIN_KINDS


def test_an_embedded_plugin_is_listed_with_its_kinds() -> None:
    host = PluginHost.create(extra_plugins=[("mine", Provides("a", "b"))], load_entry_points=False)
    mine = {p.name: p for p in host.plugins}["mine"]
    assert mine.source == "embedded"
    assert mine.kinds == ("a", "b")
    assert mine.location.endswith("test_plugin_host.py")
    assert host.kind_owner("b") == "mine"


# -- lifecycle hooks -----------------------------------------------------------------------------


class Lifecycle:
    def __init__(self, events: list[str], tag: str, *, is_async: bool) -> None:
        self.events = events
        self.tag = tag
        self.is_async = is_async

    @hookimpl
    def extsvc_startup(self, settings: Settings) -> Any:
        if self.is_async:

            async def later() -> None:
                self.events.append(f"{self.tag} async startup {settings.grpc_address}")

            return later()
        self.events.append(f"{self.tag} sync startup {settings.grpc_address}")
        return None

    @hookimpl
    def extsvc_shutdown(self) -> Any:
        if self.is_async:

            async def later() -> None:
                self.events.append(f"{self.tag} async shutdown")

            return later()
        self.events.append(f"{self.tag} sync shutdown")
        return None


class AsyncDefLifecycle:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    @hookimpl
    async def extsvc_startup(self) -> None:  # takes no settings: that is allowed
        self.events.append("async-def startup")

    @hookimpl
    async def extsvc_shutdown(self) -> None:
        self.events.append("async-def shutdown")


async def test_sync_and_async_lifecycle_hooks_are_called_and_awaited() -> None:
    events: list[str] = []
    host = PluginHost.create(
        extra_plugins=[
            ("sync-one", Lifecycle(events, "s", is_async=False)),
            ("async-one", Lifecycle(events, "a", is_async=True)),
            ("async-def", AsyncDefLifecycle(events)),
        ],
        load_entry_points=False,
    )
    settings = Settings.load({"grpc_address": "127.0.0.1:7"}, env={})
    await host.startup(settings)
    assert sorted(events) == sorted(
        ["s sync startup 127.0.0.1:7", "a async startup 127.0.0.1:7", "async-def startup"]
    )
    events.clear()
    await host.shutdown()
    assert sorted(events) == sorted(["s sync shutdown", "a async shutdown", "async-def shutdown"])


class FailingStartup:
    @hookimpl
    async def extsvc_startup(self, settings: Settings) -> None:
        raise ConnectionError("no database")


async def test_a_failing_startup_hook_is_a_plugin_error_naming_the_plugin() -> None:
    host = PluginHost.create(extra_plugins=[("db", FailingStartup())], load_entry_points=False)
    with pytest.raises(PluginError) as info:
        await host.startup(Settings.load(env={}))
    assert info.value.plugin == "db"
    assert "no database" in str(info.value)


class FailingShutdown:
    @hookimpl
    def extsvc_shutdown(self) -> None:
        raise RuntimeError("cannot flush")


async def test_a_failing_shutdown_hook_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    host = PluginHost.create(
        extra_plugins=[
            ("bad", FailingShutdown()),
            ("good", Lifecycle(events, "g", is_async=True)),
        ],
        load_entry_points=False,
    )
    await host.shutdown()
    assert events == ["g async shutdown"]
    assert "plugin bad: extsvc_shutdown failed" in caplog.text
