"""envoy/output.py's own output path agrees with betterproto2's serializer."""

from __future__ import annotations

import copy
from typing import Any

import betterproto2
import pytest
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.google.protobuf import Any as PbAny

from extsvc_controller import envoy

from .test_golden import run


def _clean(value: Any) -> Any:
    """What the renderer did before: betterproto2's proto-JSON, an empty Any written ``{}``."""
    if isinstance(value, dict):
        if value == {"@type": ""}:
            return {}
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@pytest.mark.parametrize("case", ["providers", "ratelimit", "merge", "failures"])
def test_walker_matches_betterproto2_to_dict(case: str) -> None:
    boot = run(case).bootstrap
    assert envoy.to_dict(boot) == _clean(boot.to_dict(casing=betterproto2.Casing.SNAKE))


def test_typed_any_still_serializes() -> None:
    """A TypedAny keeps its message, and ``bytes()`` (for xDS) still packs it as ``Any.pack`` does."""
    boot = run("providers").bootstrap
    again = type(boot).parse(bytes(boot))
    assert envoy.to_dict(again) == envoy.to_dict(boot)
    message = LocalRateLimit(stat_prefix="x")
    packed = envoy.pack(message)
    assert packed.type_url == PbAny.pack(message).type_url
    assert packed.value == PbAny.pack(message).value
    assert copy.deepcopy(boot) == boot
