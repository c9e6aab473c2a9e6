"""Runtime.select: context_extensions, then the gRPC :authority, then default_policy."""

from __future__ import annotations

import pytest

from extsvc.reload.runtime import Runtime

from .conftest import CompileYaml

CONFIG = """
default_policy: fallback
authority_policies:
  api.example.com: api
  legacy:8080: legacy
policies:
  api: {steps: [{plugin: allow}]}
  legacy: {steps: [{plugin: allow}]}
  fallback: {steps: [{plugin: allow}]}
  authz.internal: {steps: [{plugin: allow}]}
"""


@pytest.fixture
async def runtime(compile_yaml: CompileYaml) -> Runtime:
    return await compile_yaml(CONFIG)


def pick(runtime: Runtime, authority: str, **ext: str) -> str:
    name, policy = runtime.select(ext, authority)
    assert policy is runtime.policies.get(name)
    return name


def test_context_extension_wins_over_authority(runtime: Runtime) -> None:
    name, policy = runtime.select({"extsvc-policy": "legacy", "route": "r1"}, "api.example.com")
    assert name == "legacy"
    assert policy is runtime.policies["legacy"]


def test_authority_is_not_computed_when_context_extensions_choose(runtime: Runtime) -> None:
    def authority() -> str:
        raise AssertionError("authority read although context_extensions chose")

    assert runtime.select({"extsvc-policy": "api"}, authority)[0] == "api"


def test_authority_callable_is_used_otherwise(runtime: Runtime) -> None:
    calls: list[int] = []

    def authority() -> str:
        calls.append(1)
        return "api.example.com"

    assert runtime.select({}, authority)[0] == "api"
    assert calls == [1]


def test_unknown_policy_in_context_extensions_is_none_not_the_default(runtime: Runtime) -> None:
    name, policy = runtime.select({"extsvc-policy": "ghost"}, "api.example.com")
    assert (name, policy) == ("ghost", None)


def test_an_empty_context_extension_falls_through(runtime: Runtime) -> None:
    assert runtime.select({"extsvc-policy": ""}, "api.example.com")[0] == "api"


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("authz.internal", "authz.internal"),  # a policy name itself
        ("authz.internal:9001", "authz.internal"),  # name:port
        ("api.example.com", "api"),  # authority_policies
        ("api.example.com:443", "api"),  # authority_policies, name:port
        ("legacy:8080", "legacy"),  # authority_policies key with a port
        ("legacy", "legacy"),  # also a policy name
        ("fallback:1", "fallback"),
        ("other.example", "fallback"),  # unknown -> default_policy
        ("other.example:9001", "fallback"),
        ("", "fallback"),
    ],
)
def test_authority_selection(runtime: Runtime, authority: str, expected: str) -> None:
    assert pick(runtime, authority) == expected


async def test_without_default_an_unknown_authority_selects_nothing(
    compile_yaml: CompileYaml,
) -> None:
    runtime = await compile_yaml("policies: {only: {steps: [{plugin: allow}]}}")
    assert runtime.select({}, "other.example") == ("", None)
    assert runtime.select({}, "") == ("", None)
    assert runtime.select({}, "only:9001")[0] == "only"



@pytest.mark.parametrize(
    ("config", "matters"),
    [
        (CONFIG, True),
        ("default_policy: only\npolicies: {only: {steps: [{plugin: allow}]}}", False),
        ("default_policy: only\nauthority_policies: {a.example: only}\n"
         "policies: {only: {steps: [{plugin: allow}]}}", False),
        ("policies: {only: {steps: [{plugin: allow}]}}", True),  # no default: only:9001 -> only
        ("default_policy: a\npolicies: {a: {steps: [{plugin: allow}]}, "
         "b: {steps: [{plugin: allow}]}}", True),
    ],
)
async def test_authority_matters_only_when_it_can_pick_another_policy(
    compile_yaml: CompileYaml, config: str, matters: bool
) -> None:
    """The service skips reading the call's metadata when no authority could change the answer."""
    runtime = await compile_yaml(config)
    assert runtime.authority_matters is matters
    if not matters:  # then every authority selects exactly what no authority selects
        for authority in ("", "only", "only:9001", "a.example", "other"):
            assert runtime.select({}, authority) == runtime.select({}, "")
