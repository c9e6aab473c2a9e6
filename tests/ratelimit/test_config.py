"""Domain files in envoyproxy/ratelimit's format: what loads, and what is rejected, and how."""

from __future__ import annotations

from pathlib import Path

import pytest

from extsvc.config.ratelimit import RateLimitSection
from extsvc.errors import ConfigError
from extsvc.ratelimit.algorithms import Algorithm
from extsvc.ratelimit.config import DomainFileError, load_domains, merge_domains, parse_domain
from extsvc.reload.compile import parse

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(DomainFileError) as info:
        parse_domain(text, "f.yaml")
    return info.value.problems


def test_basic_file_and_extensions() -> None:
    domain = parse_domain(
        """
domain: d
descriptors:
  - key: k1
    value: v1
    rate_limit: {unit: Minute, requests_per_unit: 5, name: one}
    descriptors:
      - key: sub
        rate_limit: {unit: second, requests_per_unit: 1, algorithm: token_bucket, burst: 4}
  - key: k2
    rate_limit: {unlimited: true}
    shadow_mode: true
""",
        "f.yaml",
    )
    one = domain.root.exact[("k1", "v1")].limit
    assert one is not None and (one.unit, one.window_s, one.name, one.label) == (2, 60, "one", "one")
    sub = domain.root.exact[("k1", "v1")].bare["sub"].limit
    assert sub is not None and sub.algorithm is Algorithm.TOKEN_BUCKET and sub.burst == 4
    assert sub.label == "k1_v1.sub"
    k2 = domain.root.bare["k2"].limit
    assert k2 is not None and k2.unlimited and k2.shadow_mode


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("domain: ''\n", "f.yaml: domain: String should have at least 1 character"),
        ("descriptors: []\n", "f.yaml: domain: Field required"),
        ("domain: d\ndescriptors:\n  - key: ''\n", "f.yaml: descriptors[0].key: String should have"),
        ("domain: d\ndescriptors:\n  - key: a\n  - key: a\n", "f.yaml: descriptors[1].key: duplicate descriptor 'a'"),  # noqa: E501
        ("domain: d\ndescriptors:\n  - {key: a, value: b}\n  - {key: a, value: b}\n",
         "f.yaml: descriptors[1].key: duplicate descriptor 'a_b'"),
        ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
         "f.yaml: descriptors[0].rate_limit.unit: 'fortnight' is not one of second"),
        ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, unlimited: true}\n",
         "f.yaml: descriptors[0].rate_limit: unlimited cannot be combined with unit"),
        ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, name: x, replaces: [{name: x}]}\n",  # noqa: E501
         "replaces: a limit cannot replace itself"),
        ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, replaces: []}\n",
         "replaces must not be empty"),
        ("domain: d\ndescriptors:\n  - key: a\n    ratelimit: {unit: second}\n",
         "f.yaml: descriptors[0].ratelimit: Extra inputs are not permitted"),
        ("domain: d\ndescriptors:\n  - key: 7\n", "f.yaml: descriptors[0].key: Input should be a valid string"),  # noqa: E501
        ("domain: d\ndescriptors: [1, 2]\n", "f.yaml: descriptors[0]: Input should be a valid dictionary"),
        ("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: hour, burst: 2}\n",  # noqa: E501
         "f.yaml: descriptors[0].descriptors[0].rate_limit: burst is only for algorithm: token_bucket"),
        ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: hour, algorithm: leaky}\n",
         "f.yaml: descriptors[0].rate_limit.algorithm: Input should be"),
        ("domain: [d\n", "f.yaml: not valid YAML"),
        # a bucket whose arrival times the Redis script's doubles could not hold exactly
        ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: year, requests_per_unit: 1, algorithm: token_bucket, burst: 100}\n",  # noqa: E501
         "f.yaml: descriptors[0].rate_limit: burst / requests_per_unit x unit: a bucket that takes over 35 years"),  # noqa: E501
    ],
)
def test_bad_files_name_file_and_field(text: str, expected: str) -> None:
    assert any(p.startswith(expected) or expected in p for p in problems(text)), problems(text)


def test_duplicate_domain_names_both_files_and_keeps_the_first() -> None:
    a = parse_domain("domain: d\n", "a.yaml")
    b = parse_domain("domain: d\n", "b.yaml")
    c = parse_domain("domain: e\n", "c.yaml")
    merged = merge_domains([a, b, c])
    assert merged.domains == {"d": a, "e": c}
    assert merged.problems == ("b.yaml: domain: 'd' is already defined in a.yaml (this file is ignored)",)


def test_section_is_validated_with_the_main_config() -> None:
    with pytest.raises(ConfigError) as info:
        parse("ratelimit: {store: {type: redis}}\n")
    text = "\n".join(info.value.problems)
    assert "ratelimit.store: Value error" in text or "ratelimit.store" in text
    config = parse("ratelimit: {files: [a.yaml], failure_mode: deny}\n")
    assert config.ratelimit == RateLimitSection(files=[Path("a.yaml")], failure_mode="deny")


def test_docs_example_domain_files_load() -> None:
    section = RateLimitSection(config_dir=Path("docs/ratelimit"))
    domains, found = load_domains(section, ROOT)
    assert found == []
    assert {"gateway", "tenants", "smooth"} <= set(domains.domains)


def test_the_docs_config_section_parses() -> None:
    import re

    text = (ROOT / "docs" / "ratelimit.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(version: 1\nratelimit:.*?)```", text, re.S)
    assert block is not None
    config = parse(block.group(1))
    assert config.ratelimit is not None and config.ratelimit.config_dir == Path("ratelimit/")


def test_a_domain_file_alias_bomb_is_refused() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "domain: d\n" + "\n".join(levels) + "\ndescriptors: [{key: k, value: *a8}]\n"
    with pytest.raises(DomainFileError, match=r"bomb\.yaml: not valid YAML: .*alias"):
        parse_domain(text, "bomb.yaml")
