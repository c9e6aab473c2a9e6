"""The hostile suite: what an attacker or an unlucky day does to extsvc, and what must hold.

Every test here is bounded in time and bytes, talks to 127.0.0.1 only, and is marked ``hostile``
(``./scripts/test -m hostile`` runs just these). Each module covers one area of the hardening
guarantees in docs/hardening.md.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/hostile/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.hostile)
