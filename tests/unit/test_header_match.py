"""The ``header-match`` plugin: methods, path, headers; regexes in RE2 syntax (linear time)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from extsvc import Decision
from extsvc.cli import main
from extsvc.testing import check_context, plugin_context
from extsvc.types import Re2Pattern
from extsvc_plugins.header_match import HeaderMatch, HeaderMatchConfig


def step(match: dict[str, Any], **config: Any) -> HeaderMatch:
    model = HeaderMatchConfig.model_validate({"match": match, "on_no_match": "deny", **config})
    return HeaderMatch(model, plugin_context("header-match"))


async def decide(matcher: HeaderMatch, path: str = "/", **request: Any) -> Decision | None:
    return await matcher.check(check_context(path, **request))


async def test_methods_path_and_headers_must_all_hold() -> None:
    matcher = step({
        "methods": ["get"],
        "path": {"prefix": "/api/"},
        "headers": [{"name": "X-Tenant", "regex": "[a-z]+"}, {"name": "x-debug", "present": False}],
    })
    ok = {"x-tenant": "acme"}
    assert (await decide(matcher, "/api/x", method="GET", headers=ok)).allowed  # type: ignore[union-attr]
    for path, method, headers in [
        ("/api/x", "POST", ok),
        ("/other", "GET", ok),
        ("/api/x", "GET", {"x-tenant": "Acme"}),
        ("/api/x", "GET", {"x-tenant": "acme", "x-debug": "1"}),
        ("/api/x", "GET", {}),
    ]:
        decision = await decide(matcher, path, method=method, headers=headers)
        assert decision is not None and not decision.allowed, (path, method, headers)


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("[a-z]+", "acme", True),
        ("[a-z]+", "acme1", False),  # the whole value, as before (fullmatch)
        ("ac", "acme", False),
        ("^acme$", "acme", True),  # anchors are allowed and change nothing
        ("(?i)ACME", "acme", True),
        ("v[0-9]+\\.[0-9]+", "v1.25", True),
        ("(?P<major>[0-9]+)-x", "12-x", True),  # named groups parse (nothing is captured)
        ("caf\u00e9|tea", "caf\u00e9", True),  # UTF-8 text
        ("a.c", "a\nc", False),  # . does not match a newline, as in Python's re
    ],
)
async def test_regexes_match_the_whole_value(pattern: str, value: str, matches: bool) -> None:
    matcher = step({"headers": [{"name": "x-v", "regex": pattern}]})
    decision = await decide(matcher, headers={"x-v": value})
    assert decision is not None and decision.allowed is matches
    path_matcher = step({"path": {"regex": pattern}})
    decision = await decide(path_matcher, value)
    assert decision is not None and decision.allowed is matches


def test_re2_pattern_fullmatch_and_search() -> None:
    pattern = Re2Pattern("b+")
    assert pattern.fullmatch("bbb") and not pattern.fullmatch("abbb")
    assert pattern.search("abbbc") and not pattern.search("ac")
    assert Re2Pattern("").fullmatch("") and not Re2Pattern("").fullmatch("x")
    assert Re2Pattern("x.y").fullmatch("x\udcffy")  # a lone surrogate does not raise


@pytest.mark.timeout(10)  # with a backtracking engine this never ends: fail within 10 s
async def test_a_catastrophic_pattern_answers_in_linear_time() -> None:
    """``(a+)+$`` backtracks exponentially in Python's re (25 characters held the loop 1.1 s)."""
    matcher = step({"headers": [{"name": "x-v", "regex": "(a+)+$"}]})
    request = check_context("/", headers={"x-v": "a" * 10_000 + "!"})
    started = time.perf_counter()
    decision = await matcher.check(request)
    assert time.perf_counter() - started < 0.05
    assert decision is not None and not decision.allowed


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("(a)\\1", "invalid escape sequence: \\1"),  # backreference
        ("foo(?=bar)", "invalid perl operator: (?="),  # lookahead
        ("(?<!x)y", "invalid perl operator: (?<"),  # lookbehind
        ("end\\Z", "invalid escape sequence: \\Z"),  # RE2 writes \z
        ("(unclosed", "missing )"),
    ],
)
def test_patterns_re2_refuses_fail_the_config_with_the_field_named(
    pattern: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text(
        "default_policy: p\npolicies:\n  p:\n    steps:\n      - plugin: header-match\n"
        f"        config: {{match: {{headers: [{{name: x-v, regex: '{pattern}'}}]}}}}\n"
    )
    assert main(["validate", str(config)]) == 1
    err = capsys.readouterr().err
    assert "policies.p.steps[0].config.match.headers[0].regex: " in err
    assert f"invalid regular expression {pattern!r} (RE2 syntax): {error}" in err
    assert "no backreferences and no lookahead/lookbehind" in err
