"""The ``client-cidr`` plugin: peer address or an x-forwarded-for hop against allow/deny ranges."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from extsvc import Decision
from extsvc.testing import check_context
from extsvc_plugins.client_cidr import ClientCidr, ClientCidrConfig

from .authkit import context


def step(**config: Any) -> ClientCidr:
    return ClientCidr(ClientCidrConfig.model_validate(config), context("client-cidr"))


async def answer(cidr: ClientCidr, source: str = "10.0.0.1:40000", **request: Any) -> Decision | None:
    return await cidr.check(check_context("/", source=source, **request))


async def test_allow_list_gates_and_abstains_inside() -> None:
    cidr = step(allow=["10.0.0.0/8"])
    assert await answer(cidr, "10.1.2.3:1") is None  # inside: the next step decides
    outside = await answer(cidr, "192.0.2.7:1")
    assert outside is not None and (outside.allowed, outside.status) == (False, 403)
    assert outside.reason == "client-cidr: 192.0.2.7 is not in an allow range"


async def test_deny_wins_over_allow() -> None:
    cidr = step(allow=["10.0.0.0/8"], deny=["10.66.0.0/16"], status=451, body="no")
    denied = await answer(cidr, "10.66.1.1:1")
    assert denied is not None and (denied.status, denied.body) == (451, "no")
    assert await answer(cidr, "10.67.1.1:1") is None


async def test_on_allowed_allow_decides() -> None:
    decision = await answer(step(allow=["10.0.0.0/8"], on_allowed="allow"), "10.0.0.9:1")
    assert decision is not None and decision.allowed


async def test_ipv6_and_ipv4_mapped_addresses() -> None:
    cidr = step(allow=["fd00::/8", "10.0.0.0/8"])
    assert await answer(cidr, "fd00::1:443") is None
    assert await answer(cidr, "::ffff:10.0.0.5:443") is None  # an IPv4 client on a dual-stack socket
    assert await answer(cidr, "2001:db8::1:443") is not None


@pytest.mark.parametrize(
    ("xff", "hop", "expected"),
    [
        ("203.0.113.9, 10.0.0.2", 1, None),  # the right-most hop: our proxy saw 10.0.0.2
        ("203.0.113.9, 10.0.0.2", 2, "203.0.113.9 is not in an allow range"),
        ("10.0.0.1, 203.0.113.9", 1, "203.0.113.9 is not in an allow range"),  # spoofed left entry ignored
        ("10.0.0.2", 2, "no client address (x-forwarded-for)"),
        ("", 1, "no client address (x-forwarded-for)"),
        ("not-an-ip", 1, "unparsable address 'not-an-ip'"),
    ],
)
async def test_x_forwarded_for_hops(xff: str, hop: int, expected: str | None) -> None:
    cidr = step(allow=["10.0.0.0/8"], source="x-forwarded-for", xff_hop=hop)
    headers = {"x-forwarded-for": xff} if xff else {}
    decision = await answer(cidr, "192.0.2.1:1", headers=headers)  # the peer is the proxy
    if expected is None:
        assert decision is None
    else:
        assert decision is not None and decision.reason == f"client-cidr: {expected}"


def test_config_needs_a_range_and_rejects_host_bits() -> None:
    with pytest.raises(ValidationError, match="set allow and/or deny"):
        ClientCidrConfig()
    with pytest.raises(ValidationError):
        ClientCidrConfig(allow=["10.0.0.1/8"])  # type: ignore[list-item]


NETWORKS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12")]
DENIED = [ipaddress.ip_network("10.13.0.0/16")]


@settings(max_examples=150, deadline=None)
@given(address=st.ip_addresses(v=4))
async def test_the_decision_matches_ipaddress_membership(address: ipaddress.IPv4Address) -> None:
    cidr = step(allow=[str(n) for n in NETWORKS], deny=[str(n) for n in DENIED])
    decision = await answer(cidr, f"{address}:1234")
    inside = any(address in n for n in NETWORKS) and not any(address in n for n in DENIED)
    assert (decision is None) == inside
