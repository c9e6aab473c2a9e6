"""The layer contract's moved pieces agree with what they were moved out of."""

from __future__ import annotations

from extsvc.config.ratelimit import StoreType
from extsvc.selection import by_authority
from extsvc.storetypes import BUILTIN_STORE_NAMES


def test_builtin_store_names_match_the_store_types() -> None:
    assert frozenset(t.value for t in StoreType) == BUILTIN_STORE_NAMES


def test_by_authority() -> None:
    policies = {"a", "b"}
    mapping = {"api.example": "b", "api.example:8443": "a"}
    assert by_authority("api.example", mapping, policies) == "b"
    assert by_authority("api.example:8443", mapping, policies) == "a"
    assert by_authority("api.example:9000", mapping, policies) == "b"
    assert by_authority("a", mapping, policies) == "a"
    assert by_authority("a:80", mapping, policies) == "a"
    assert by_authority("c", mapping, policies) is None


def test_grpcutil_call_authority_and_printable() -> None:
    from extsvc.grpcutil import AUTHORITY_METADATA_KEY, call_authority, printable

    class Metadata:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("other", "x"), (AUTHORITY_METADATA_KEY, "api.example:443"))

    class Accessor(Metadata):
        def experimental_authority(self) -> bytes:
            return b"direct.example"

    assert call_authority(Metadata()) == "api.example:443"
    assert call_authority(Accessor()) == "direct.example"
    assert printable("abc") == "'abc'"
    assert printable("x" * 100).endswith("... (100 characters)")
