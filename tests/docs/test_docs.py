"""The docs are part of the feature: their examples run here, and the hook docs match the specs."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

from extsvc.observability.metrics import Metrics
from extsvc.plugin.hookspecs import ExtsvcSpecs
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import check_plugins, compile_config, parse
from extsvc.testing import check_context

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(language: str, marker: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for lang, body in FENCE.findall(doc.read_text(encoding="utf-8")):
            if lang == language and body.lstrip().startswith(marker):
                found.append((f"{doc.relative_to(ROOT)}", body))
    return found


def docs_example(name: str) -> str:
    for _, body in blocks("python", "# docs-example:"):
        if body.lstrip().startswith(f"# docs-example: {name}\n"):
            return body
    raise AssertionError(f"docs example {name!r} not found")


def load_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<docs:{name}>", "exec"), module.__dict__)
    return module


def test_every_hookspec_is_documented_with_an_example() -> None:
    plugin_doc = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    specs = [n for n, _ in inspect.getmembers(ExtsvcSpecs, inspect.isfunction) if n.startswith("extsvc_")]
    assert specs, "no hookspecs found"
    for name in specs:
        assert f"### `{name}(" in plugin_doc, f"docs/plugins.md has no section for {name}"
        assert "Example::" in (getattr(ExtsvcSpecs, name).__doc__ or ""), f"{name} has no Example"


CONFIG_BLOCKS = blocks("yaml", "# extsvc config")


def test_docs_have_config_examples() -> None:
    assert len(CONFIG_BLOCKS) >= 2


@pytest.mark.parametrize(("where", "text"), CONFIG_BLOCKS, ids=[w for w, _ in CONFIG_BLOCKS])
def test_config_examples_in_docs_are_valid(where: str, text: str) -> None:
    host = PluginHost.create()  # includes the installed example plugin (tenant-header)
    check_plugins(parse(text, source=where), host)


async def test_default_config_compiles() -> None:
    from extsvc.reload.provider import embedded_default_config

    runtime = await compile_config(parse(embedded_default_config()), PluginHost.create(), Metrics())
    assert runtime.config.default_policy == "demo"
    await runtime.close()


async def test_plugin_example_in_docs_works_in_a_policy() -> None:
    plugin = load_module("docs_tenant_header", docs_example("tenant_header"))
    host = PluginHost.create(load_entry_points=False, extra_plugins=[("docs-tenant", plugin)])
    config = parse(
        "policies:\n  t:\n    steps:\n"
        "      - {plugin: tenant-header, config: {allowed: [acme]}}\n"
        "      - {plugin: allow}\n"
    )
    runtime = await compile_config(config, host, Metrics())
    policy = runtime.policies["t"]
    allowed = await policy.evaluate(check_context("/", headers={"x-tenant": "acme"}), deadline=1e12)
    denied = await policy.evaluate(check_context("/", headers={"x-tenant": "evil"}), deadline=1e12)
    assert allowed.decision.allowed
    assert (denied.decision.allowed, denied.decision.status) == (False, 403)
    await runtime.close()


# The package of "Testing a plugin" (docs/plugins.md) runs in tests/docs/test_plugin_package.py.


def _extproc_config(*steps: str) -> str:
    lines = "".join(f"        - {step}\n" for step in steps)
    return f"extproc:\n  default_policy: p\n  policies:\n    p:\n      processors:\n{lines}"


async def test_processor_example_in_docs_tags_and_denies() -> None:
    from extsvc.testing.extproc import headers_message, stream_for

    plugin = load_module("docs_tenant_tag", docs_example("tenant_tag"))
    host = PluginHost.create(load_entry_points=False, extra_plugins=[("docs-tenant-tag", plugin)])
    config = _extproc_config("{plugin: tenant-tag}")
    stream = await stream_for(config, host=host)
    [answer] = await stream.feed(headers_message({":path": "/", "x-tenant": "acme"}))
    assert answer.request_headers.response.header_mutation.set_headers == []
    assert answer.dynamic_metadata.fields["extsvc"].struct_value.fields["tenant"].string_value == "acme"
    [answer] = await stream.feed(headers_message({":status": "200"}, response=True))
    [option] = answer.response_headers.response.header_mutation.set_headers
    assert (option.header.key, option.header.raw_value) == ("x-tenant", b"acme")
    denied = await stream_for(config, host=host)
    [answer] = await denied.feed(headers_message({":path": "/"}))
    assert (answer.immediate_response.status.code, answer.immediate_response.details) == (400, "no_tenant")


async def test_fixed_headers_example_in_docs_answers_without_its_hook() -> None:
    from extsvc.testing.extproc import headers_message, stream_for

    plugin = load_module("docs_server_banner", docs_example("server_banner"))
    calls: list[object] = []
    hook = plugin.ServerBanner.on_response_headers

    async def counted(self: object, message: object, /) -> None:
        calls.append(message)
        await hook(self, message)

    plugin.ServerBanner.on_response_headers = counted
    host = PluginHost.create(load_entry_points=False, extra_plugins=[("docs-banner", plugin)])
    answers = []
    for steps in (["{plugin: server-banner, config: {value: edge}}"],
                  ["{plugin: server-banner, config: {value: edge}}",
                   "{plugin: headers, config: {response: {rename: {x-a: x-b}}}}"]):
        stream = await stream_for(_extproc_config(*steps), host=host)
        await stream.feed(headers_message({":path": "/"}))
        [answer] = await stream.feed(headers_message({":status": "200", "server": "up"}, response=True))
        answers.append(answer.response_headers.response.header_mutation)
    assert len(calls) == 1  # the first policy is fixed: its hook did not run; the second ran it
    assert answers[0] == answers[1]
    assert [(o.header.key, o.header.raw_value) for o in answers[0].set_headers] == [("x-served-by", b"edge")]
    assert list(answers[0].remove_headers) == ["server"]


async def test_limit_store_example_in_docs_serves_the_docs_domains() -> None:
    from extsvc.errors import ConfigError
    from extsvc.ratelimit.limiter import DescriptorRequest
    from extsvc.reload.ratelimit import RateLimitReloader

    plugin = load_module("docs_dict_store", docs_example("dict_store"))
    host = PluginHost.create(load_entry_points=False, extra_plugins=[("docs-dict", plugin)])
    [(where, text)] = blocks("yaml", "# a plugin store")
    config = parse(text, source=where)
    check_plugins(config, host)
    assert config.ratelimit is not None
    manager = RateLimitReloader(Metrics(), host=host, clock=lambda: 1_700_000_000.0)
    await manager.apply(config.ratelimit, ROOT / "docs")  # config_dir: ratelimit/ (docs/ratelimit)
    limiter = manager.limiter
    assert limiter is not None and limiter.store.kind == "dict"

    async def overs(domain: str, key: str, times: int) -> list[bool]:
        descriptor = DescriptorRequest(((key, "client-1"),))
        return [(await limiter.should_rate_limit(domain, [descriptor])).over for _ in range(times)]

    assert await overs("gateway", "remote_address", 51) == [False] * 50 + [True]  # fixed window
    assert await overs("smooth", "client", 61) == [False] * 60 + [True]  # sliding window
    assert await overs("smooth", "upload", 6) == [False] * 5 + [True]  # token bucket
    values = limiter.store.store._values  # type: ignore[attr-defined]
    assert values and all(key.startswith(("edge_", "{edge_")) for key in values)

    bad = text.replace("max_keys: 50000", "max_keys: many")
    with pytest.raises(ConfigError) as info:
        check_plugins(parse(bad), host)
    assert info.value.problems[0].startswith(
        "ratelimit.store.config.max_keys: Input should be a valid integer"
    )
    await manager.aclose()


def test_every_setting_is_in_the_operator_guide() -> None:
    from extsvc.settings import ENV_PREFIX, Settings

    guide = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    assert [n for n in Settings.model_fields if f"`{ENV_PREFIX}{n.upper()}`" not in guide] == []
