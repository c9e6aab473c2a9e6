"""The building blocks of the authentication plugins: finding, removing and caching credentials."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extsvc import Decision
from extsvc.credentials import (
    BEARER,
    CredentialSource,
    Forward,
    TtlCache,
    cookie_value,
    find_credential,
    removal,
)
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import compile_config, parse
from extsvc.testing import check_context

from .authkit import FakeClock


@pytest.mark.parametrize(
    ("header", "found"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearerabc", None),
    ],
)
def test_bearer_prefix(header: str, found: str | None) -> None:
    result = find_credential(check_context("/", headers={"authorization": header}), [BEARER])
    assert (result[0] if result else None) == found


def test_sources_are_tried_in_order_and_a_wrong_prefix_falls_through() -> None:
    sources = [BEARER, CredentialSource(cookie="session"), CredentialSource(query="token")]
    request = check_context("/?token=q", headers={"authorization": "Basic x", "cookie": "a=1; session=c"})
    assert find_credential(request, sources) == ("c", sources[1])
    assert find_credential(check_context("/?token=q"), sources) == ("q", sources[2])


def test_a_source_is_exactly_one_place() -> None:
    with pytest.raises(ValueError, match="exactly one of header, cookie, query"):
        CredentialSource(header="x", cookie="y")
    with pytest.raises(ValueError, match="prefix only applies to header"):
        CredentialSource(cookie="y", prefix="Bearer ")


_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
_VALUE = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(cookies=st.dictionaries(_NAME, _VALUE, min_size=1, max_size=6), data=st.data())
def test_removing_a_cookie_credential_keeps_every_other_cookie(
    cookies: dict[str, str], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(cookies)))
    header = "; ".join(f"{k}={v}" for k, v in cookies.items())
    request = check_context("/", headers={"cookie": header})
    assert cookie_value(header, name) == cookies[name]
    upstream_set, upstream_remove, _ = removal(request, CredentialSource(cookie=name))
    rest = {k: v for k, v in cookies.items() if k != name}
    if rest:
        kept = dict(part.split("=", 1) for part in upstream_set["cookie"].split("; "))
        assert kept == rest
        assert upstream_remove == ()
    else:
        assert (upstream_set, upstream_remove) == ({}, ("cookie",))


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(), st.lists(st.text(), max_size=4), st.integers(), st.booleans()))
def test_forwarded_header_values_never_carry_control_characters(value: object) -> None:
    headers, metadata = Forward(headers={"x-user": "sub"}, metadata={"user": "sub"}).apply({"sub": value})
    text = headers["x-user"]
    assert not any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text)
    assert metadata == {"user": value}  # metadata keeps the value as it is


def test_forward_follows_dotted_paths_and_skips_missing_attributes() -> None:
    forward = Forward(headers={"x-roles": "realm.roles", "x-none": "missing"}, metadata={"t": "tenant"})
    headers, metadata = forward.apply({"realm": {"roles": ["a", "b"]}, "tenant": "acme"})
    assert (headers, metadata) == ({"x-roles": "a,b"}, {"t": "acme"})
    assert forward.header_names() == frozenset({"x-roles", "x-none"})


@settings(max_examples=100, deadline=None)
@given(
    operations=st.lists(
        st.tuples(st.integers(0, 5), st.floats(0, 10), st.floats(0, 10)), max_size=40
    )
)
def test_the_ttl_cache_never_serves_an_expired_entry_and_stays_bounded(
    operations: list[tuple[int, float, float]],
) -> None:
    clock = FakeClock(0)
    cache: TtlCache[int] = TtlCache(3, clock)
    expiry: dict[bytes, float] = {}
    for key_number, lifetime, wait in operations:
        key = bytes([key_number])
        expires = clock() + lifetime
        cache.put(key, key_number, expires)
        if expires > clock():
            expiry[key] = expires
        else:
            expiry.pop(key, None)
        clock.advance(wait)
        assert len(cache) <= 3
        for known, expires in expiry.items():
            if cache.get(known) is not None:
                assert clock() < expires
        for stale in set(map(bytes, [[n] for n in range(6)])) - set(expiry):
            assert cache.get(stale) is None


PLUGINS_DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def credential_helpers_section() -> str:
    text = PLUGINS_DOC.read_text(encoding="utf-8")
    start = text.index("## Credential helpers (`extsvc.credentials`)")
    return text[start : text.index("\n## ", start)]


def test_the_plugin_api_is_exactly_what_docs_plugins_md_lists() -> None:
    import extsvc.credentials

    documented = re.findall(r"^- `(\w+)", credential_helpers_section(), re.M)
    assert sorted(documented) == sorted(extsvc.credentials.__all__)
    assert all(hasattr(extsvc.credentials, name) for name in extsvc.credentials.__all__)


async def test_the_docs_example_lets_a_team_in_and_keeps_its_token_from_the_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/plugins.md, "Credential helpers": the example runs here, as the other docs examples
    # run in tests/docs/test_docs.py
    example = re.compile(r"```python\n(# docs-example: team_tokens\n.*?)```", re.S)
    [source] = example.findall(credential_helpers_section())
    plugin = types.ModuleType("docs_team_tokens")
    # pydantic resolves the (postponed) annotations of the config model through sys.modules
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    exec(compile(source, "<docs:team_tokens>", "exec"), plugin.__dict__)
    host = PluginHost.create(load_entry_points=False, extra_plugins=[("docs-team-tokens", plugin)])
    tokens = tmp_path / "tokens"
    tokens.write_text("red s3cret-red\n\nblue s3cret-blue\n", encoding="utf-8")
    step = f"{{plugin: team-tokens, config: {{file: '{tokens}'}}}}"
    config = parse(f"policies:\n  t:\n    steps:\n      - {step}\n")
    runtime = await compile_config(config, host, Metrics())
    policy = runtime.policies["t"]

    async def answer(path: str, **headers: str) -> Decision:
        return (await policy.evaluate(check_context(path, headers=headers), deadline=1e12)).decision

    allowed = await answer("/", authorization="Bearer s3cret-blue", **{"x-team": "red"})
    assert allowed.allowed
    assert dict(allowed.upstream_set) == {"x-team": "blue"}
    assert "authorization" in allowed.upstream_remove
    for denied in (await answer("/"), await answer("/", authorization="Bearer s3cret-green")):
        assert (denied.allowed, denied.status) == (False, 401)
    await runtime.close()
