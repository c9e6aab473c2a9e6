"""Rate-limit stores from plugins: registration, config, the request path, failures, closing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field

from extsvc import AuthorizerType, PluginContext, hookimpl
from extsvc.config.ratelimit import RateLimitSection, StoreSettings, StoreType
from extsvc.errors import ConfigError, PluginError, StoreError
from extsvc.observability.metrics import Metrics
from extsvc.plugin import host as host_module
from extsvc.plugin.host import PluginHost
from extsvc.plugin.records import LimitStoreType
from extsvc.ratelimit.algorithms import Op
from extsvc.ratelimit.limiter import DescriptorRequest
from extsvc.ratelimit.store.memory import MemoryStore
from extsvc.ratelimit.store.plugin import PluginStore
from extsvc.reload import ratelimit as reloader_module
from extsvc.reload.compile import check_plugins, parse
from extsvc.reload.provider import ConfigLoader
from extsvc.reload.ratelimit import RateLimitReloader
from extsvc.reload.runtime import RuntimeHolder
from extsvc.testing import running_server
from extsvc.testing.harness import wait_for_window_room

OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
NOW = 1_700_000_000.0

DOMAIN = """
domain: d
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 2, name: two}
"""


@pytest.fixture(autouse=True)
def _room_in_the_hour() -> None:
    """These tests count hour windows on the real clock: never across an hour's end."""
    wait_for_window_room(3600)


class CountingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: list[str] = Field(min_length=1)
    fail: bool = False  # apply raises StoreError
    crash: bool = False  # apply raises something else (a bug in the plugin)


class CountingStore:
    """Counts in a MemoryStore, and records every call and what happens to it."""

    kind = "whatever-the-object-says"

    def __init__(self, config: CountingConfig, ctx: PluginContext) -> None:
        self.config = config
        self.ctx = ctx
        self.memory = MemoryStore(lambda: NOW)
        self.calls: list[list[Op]] = []
        self.closed = False

    async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        self.calls.append(list(ops))
        if self.config.fail:
            raise StoreError("memcached: connection refused")
        if self.config.crash:
            raise KeyError("oops")
        return await self.memory.apply(ops)

    async def aclose(self) -> None:
        self.closed = True


class CountingPlugin:
    """Registers the ``counting`` store; remembers every store it built."""

    def __init__(self, name: str = "counting") -> None:
        self.name = name
        self.built: list[CountingStore] = []
        self.fail_build = False

    def build(self, config: CountingConfig, ctx: PluginContext) -> CountingStore:
        if self.fail_build:
            raise RuntimeError("no route to memcached")
        store = CountingStore(config, ctx)
        self.built.append(store)
        return store

    @hookimpl
    def extsvc_register_limit_stores(self) -> Iterator[LimitStoreType[Any]]:
        yield LimitStoreType(
            name=self.name, config_model=CountingConfig, factory=self.build,
            description="counts in memory, records calls",
        )


def make_host(*plugins: tuple[str, object]) -> PluginHost:
    return PluginHost.create(load_entry_points=False, extra_plugins=plugins)


@pytest.fixture
def plugin() -> CountingPlugin:
    return CountingPlugin()


@pytest.fixture
def host(plugin: CountingPlugin) -> PluginHost:
    return make_host(("counting-plugin", plugin))


@pytest.fixture
def domain_dir(tmp_path: Path) -> Path:
    (tmp_path / "d.yaml").write_text(DOMAIN)
    return tmp_path


def config_text(store: str, failure_mode: str = "allow") -> str:
    return f"ratelimit:\n  files: [d.yaml]\n  failure_mode: {failure_mode}\n  store: {store}\n"


PLUGIN_STORE = "{type: plugin, plugin: counting, config: {servers: ['10.0.0.1:11211']}}"


def section(store: str = PLUGIN_STORE, failure_mode: str = "allow") -> RateLimitSection:
    ratelimit = parse(config_text(store, failure_mode)).ratelimit
    assert ratelimit is not None
    return ratelimit


def problems_of(text: str, host: PluginHost) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_plugins(parse(text), host)
    return info.value.problems


async def ask(manager: RateLimitReloader, times: int = 1) -> list[bool]:
    assert manager.limiter is not None
    answers = []
    for _ in range(times):
        answer = await manager.limiter.should_rate_limit("d", [DescriptorRequest((("k", "v"),))])
        answers.append(answer.over)
    return answers


# -- registration ---------------------------------------------------------------------------------


def test_the_host_collects_limit_stores_and_lists_them(host: PluginHost) -> None:
    assert set(host.limit_stores) == {"counting"}
    assert host.limit_stores["counting"].config_model is CountingConfig
    assert host.limit_store_owner("counting") == "counting-plugin"
    assert {p.name: p.kinds for p in host.plugins}["counting-plugin"] == ("counting",)


def test_a_plugin_may_provide_a_step_kind_and_a_store() -> None:
    class Both(CountingPlugin):
        @hookimpl
        def extsvc_register_authorizers(self) -> list[AuthorizerType[Any]]:
            return [AuthorizerType(name="counting-step", config_model=CountingConfig, factory=object)]  # type: ignore[arg-type]

    host = make_host(("both", Both()))
    assert {p.name: p.kinds for p in host.plugins}["both"] == ("counting-step", "counting")


def test_duplicate_store_names_fail_naming_both_plugins() -> None:
    with pytest.raises(PluginError) as info:
        make_host(("first", CountingPlugin("shared")), ("second", CountingPlugin("shared")))
    assert info.value.plugin == "second"
    assert "limit store 'shared' is already provided by plugin 'first'" in str(info.value)


@pytest.mark.parametrize("name", [t.value for t in StoreType])
def test_a_store_named_like_a_builtin_type_fails(name: str) -> None:
    with pytest.raises(PluginError) as info:
        make_host(("mine", CountingPlugin(name)))
    assert info.value.plugin == "mine"
    assert f"limit store {name!r} clashes with a built-in store type" in str(info.value)


def test_an_async_register_hook_is_rejected() -> None:
    class AsyncStores:
        @hookimpl
        async def extsvc_register_limit_stores(self) -> list[LimitStoreType[Any]]:
            return []

    with pytest.raises(PluginError, match="extsvc_register_limit_stores must not be async"):
        make_host(("async-stores", AsyncStores()))


def test_a_register_hook_returning_something_else_fails() -> None:
    class Wrong:
        @hookimpl
        def extsvc_register_limit_stores(self) -> list[object]:
            return [AuthorizerType(name="x", config_model=CountingConfig, factory=object)]  # type: ignore[arg-type]

    with pytest.raises(PluginError, match="returned AuthorizerType, expected LimitStoreType"):
        make_host(("wrong", Wrong()))


class FakeEntryPoint:
    """What the host reads of an installed plugin's entry point."""

    name = "counting-ep"
    value = "counting_extsvc.plugin"
    dist = None

    def __init__(self, plugin: object) -> None:
        self._plugin = plugin

    def load(self) -> object:
        return self._plugin


def test_allow_and_block_lists_apply_to_store_plugins(
    plugin: CountingPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_module, "_entry_points", lambda: [FakeEntryPoint(plugin)])
    assert set(PluginHost.create(builtins=()).limit_stores) == {"counting"}
    assert set(PluginHost.create(builtins=(), allow=["counting-ep"]).limit_stores) == {"counting"}
    assert PluginHost.create(builtins=(), allow=["someone-else"]).limit_stores == {}
    blocked = PluginHost.create(builtins=(), block=["counting-ep"])
    assert blocked.limit_stores == {}
    assert problems_of(config_text(PLUGIN_STORE), blocked) == [
        "ratelimit.store.plugin: unknown limit store 'counting' (known: none)"
    ]


# -- config ---------------------------------------------------------------------------------------


def test_the_builtin_store_syntax_is_unchanged() -> None:
    ratelimit = section("{type: redis, url: 'redis://127.0.0.1:6379/0', pool: 8}")
    assert ratelimit.store.type is StoreType.REDIS and ratelimit.store.pool == 8
    assert section("{}").store == StoreSettings()


def test_a_plugin_store_config_validates_against_its_model(host: PluginHost) -> None:
    config = parse(config_text(PLUGIN_STORE))
    check_plugins(config, host)
    assert config.ratelimit is not None
    store = config.ratelimit.store
    assert (store.type, store.plugin, store.config) == (
        StoreType.PLUGIN, "counting", {"servers": ["10.0.0.1:11211"]}
    )


def test_an_unknown_store_name_is_a_config_error_naming_it(host: PluginHost) -> None:
    text = config_text("{type: plugin, plugin: memcache, config: {}}")
    assert problems_of(text, host) == [
        "ratelimit.store.plugin: unknown limit store 'memcache' (known: counting)"
    ]


def test_a_bad_store_config_names_the_field(host: PluginHost) -> None:
    text = config_text("{type: plugin, plugin: counting, config: {servers: [], timeout: 3}}")
    problems = problems_of(text, host)
    assert len(problems) == 2
    assert problems[0].startswith("ratelimit.store.config.servers: List should have at least 1 item")
    assert problems[1] == "ratelimit.store.config.timeout: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("{type: plugin}", "store type plugin needs plugin"),
        ("{type: plugin, plugin: counting, url: 'redis://x'}", "url: Redis settings"),
        ("{type: plugin, plugin: counting, pool: 8, timeout_ms: 5}", "pool, timeout_ms: Redis settings"),
        ("{type: memory, plugin: counting}", "plugin and config are for type plugin, not memory"),
        ("{type: redis, url: 'redis://x', config: {a: 1}}", "plugin and config are for type plugin"),
    ],
)
def test_store_fields_that_do_not_fit_the_type_are_rejected(store: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(config_text(store))
    assert info.value.problems[0].startswith("ratelimit.store: ")
    assert message in info.value.problems[0]


async def test_a_bad_store_config_keeps_the_last_good_config(host: PluginHost) -> None:
    holder = RuntimeHolder()
    loader = ConfigLoader(holder, host, Metrics())
    assert await loader.load_text(config_text(PLUGIN_STORE), source="good", base_dir=Path())
    good = holder.current
    bad = config_text("{type: plugin, plugin: counting, config: {servers: 'x:1'}}")
    assert not await loader.load_text(bad, source="bad", base_dir=Path())
    assert holder.current is good
    await holder.close()


# -- the request path -----------------------------------------------------------------------------


async def test_the_plugin_store_receives_the_ops_of_a_request(
    plugin: CountingPlugin, host: PluginHost, domain_dir: Path
) -> None:
    manager = RateLimitReloader(Metrics(), host=host, clock=lambda: NOW)
    await manager.apply(section(), domain_dir)
    assert await ask(manager, 3) == [False, False, True]
    [store] = plugin.built  # built once for the config, not per request
    assert len(store.calls) == 3
    op = store.calls[0][0]
    assert (op.kind, op.hits) == ("f", 1)
    assert op.keys[0].startswith("d_k_v_")
    assert (store.ctx.plugin, store.ctx.policy, store.ctx.step) == ("counting", "ratelimit", "store")
    assert store.ctx.base_dir == domain_dir
    assert manager.limiter is not None and manager.limiter.store.kind == "counting"
    await manager.aclose()
    assert store.closed


@pytest.mark.parametrize(("failure_mode", "over"), [("allow", False), ("deny", True)])
@pytest.mark.parametrize("raises", ["fail", "crash"])
async def test_a_failing_plugin_store_is_answered_per_failure_mode(
    host: PluginHost, domain_dir: Path, failure_mode: str, over: bool, raises: str
) -> None:
    metrics = Metrics()
    manager = RateLimitReloader(metrics, host=host, clock=lambda: NOW)
    store = f"{{type: plugin, plugin: counting, config: {{servers: [a], {raises}: true}}}}"
    await manager.apply(section(store, failure_mode), domain_dir)
    assert manager.limiter is not None
    answer = await manager.limiter.should_rate_limit("d", [DescriptorRequest((("k", "v"),))])
    assert (answer.over, answer.note) == (over, "store-error")
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_store_errors_total", {"store": "counting", "answer": failure_mode}
    ) == 1
    await manager.aclose()


async def test_a_bug_in_the_store_becomes_a_store_error_naming_it() -> None:
    store = CountingStore(CountingConfig(servers=["a"], crash=True), None)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=r"store plugin 'counting' raised KeyError\('oops'\)"):
        await PluginStore("counting", store).apply([])


async def test_the_store_is_kept_while_its_settings_stay_and_closed_when_replaced(
    plugin: CountingPlugin, host: PluginHost, domain_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reloader_module, "_RETIRE_AFTER_S", 0.0)
    manager = RateLimitReloader(Metrics(), host=host, clock=lambda: NOW)
    await manager.apply(section(), domain_dir)
    await ask(manager)
    await manager.apply(section(failure_mode="deny"), domain_dir)  # another setting, same store
    assert len(plugin.built) == 1 and await ask(manager) == [False]  # the counters live on
    other = "{type: plugin, plugin: counting, config: {servers: ['10.0.0.2:11211']}}"
    await manager.apply(section(other), domain_dir)
    first, second = plugin.built
    assert second.config.servers == ["10.0.0.2:11211"]
    await asyncio.sleep(0.01)
    assert first.closed and not second.closed
    await manager.apply(section("{type: memory}"), domain_dir)  # back to a built-in store
    await asyncio.sleep(0.01)
    assert second.closed
    await manager.aclose()


async def test_shutdown_closes_a_store_still_waiting_to_retire(
    plugin: CountingPlugin, host: PluginHost, domain_dir: Path
) -> None:
    manager = RateLimitReloader(Metrics(), host=host, clock=lambda: NOW)
    await manager.apply(section(), domain_dir)
    await manager.apply(section("{type: memory}"), domain_dir)
    [store] = plugin.built
    assert not store.closed  # requests that picked it up get a few seconds
    started = time.monotonic()
    await manager.aclose()
    assert store.closed and time.monotonic() - started < 1


async def test_a_store_that_fails_to_build_keeps_the_previous_one_and_is_retried(
    plugin: CountingPlugin, host: PluginHost, domain_dir: Path
) -> None:
    metrics = Metrics()
    manager = RateLimitReloader(metrics, host=host, clock=lambda: NOW)
    plugin.fail_build = True
    await manager.apply(section(), domain_dir)
    assert manager.limiter is None  # nothing to serve with yet: the service answers UNAVAILABLE
    assert manager.problems == [
        "ratelimit.store: store plugin 'counting' failed to build: no route to memcached"
    ]
    await manager.apply(section("{type: memory}"), domain_dir)
    assert manager.problems == [] and await ask(manager) == [False]
    await manager.apply(section(), domain_dir)
    assert manager.limiter is not None and manager.limiter.store.kind == "memory"  # kept
    assert manager.limiter.section.store.type is StoreType.MEMORY
    await manager.reload_now()  # the retry fails the same way: reported once
    assert metrics.registry.get_sample_value(
        "extsvc_config_reloads_total", {"result": "error"}
    ) == 2
    plugin.fail_build = False
    assert await manager.reload_now()
    assert manager.problems == []
    assert manager.limiter is not None and manager.limiter.store.kind == "counting"
    await manager.aclose()


async def test_a_factory_returning_no_store_is_reported(domain_dir: Path) -> None:
    class NotAStore(CountingPlugin):
        def build(self, config: CountingConfig, ctx: PluginContext) -> Any:
            return object()

    manager = RateLimitReloader(Metrics(), host=make_host(("bad", NotAStore())), clock=lambda: NOW)
    await manager.apply(section(), domain_dir)
    assert manager.limiter is None
    assert manager.problems == [
        "ratelimit.store: store plugin 'counting' built object, which is not a LimitStore "
        "(kind, async apply(ops), async aclose())"
    ]
    await manager.aclose()


# -- the service ----------------------------------------------------------------------------------


def rl_request(value: str) -> Any:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="k", value=value)
    return rls_pb2.RateLimitRequest(
        domain="d", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
    )


async def test_the_service_counts_in_the_plugin_store_and_reloads_it(
    plugin: CountingPlugin, host: PluginHost, domain_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reloader_module, "_RETIRE_AFTER_S", 0.0)
    path = domain_dir / "extsvc.yaml"
    path.write_text(config_text(PLUGIN_STORE))
    async with running_server(path, host=host, reload_interval_s=0.05) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        answers = [(await stub.ShouldRateLimit(rl_request("svc"))).overall_code for _ in range(3)]
        assert answers == [OK, OK, OVER]
        [first] = plugin.built
        assert [op.keys[0].startswith("d_k_svc_") for [op] in first.calls] == [True] * 3

        # A bad store config is rejected; the store serving keeps its counters.
        path.write_text(config_text("{type: plugin, plugin: counting, config: {servers: []}}"))
        await asyncio.sleep(0.3)
        assert (await stub.ShouldRateLimit(rl_request("svc"))).overall_code == OVER
        assert plugin.built == [first]

        # A store that fails, with failure_mode deny: OVER_LIMIT for everyone.
        path.write_text(config_text(
            "{type: plugin, plugin: counting, config: {servers: [a], fail: true}}", "deny"
        ))
        for _ in range(100):
            if len(plugin.built) == 2 and first.closed:
                break
            await asyncio.sleep(0.05)
        assert first.closed
        answer = await stub.ShouldRateLimit(rl_request("fresh"))
        assert answer.overall_code == OVER and len(plugin.built[1].calls) == 1
    assert plugin.built[1].closed  # at shutdown
