"""Log set-up: JSON lines with UTC millisecond times, and DEBUG for extsvc's own loggers only."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from extsvc.observability import logging as extsvc_logging


@pytest.fixture
def restored() -> Iterator[None]:
    """configure() sets the root logger up: put it back (pytest's capture lives there)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {n: logging.getLogger(n).level for n in extsvc_logging.QUIET_LIBRARIES}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lib_level in libraries.items():
        logging.getLogger(name).setLevel(lib_level)


def test_json_times_are_utc_with_milliseconds() -> None:
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "extsvc.x"})
    record.created = 1_765_000_000.2509
    entry = json.loads(extsvc_logging.JsonFormatter().format(record))
    assert entry["time"] == "2025-12-06T05:46:40.250Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


@pytest.mark.usefixtures("restored")
def test_debug_is_for_extsvc_not_for_the_libraries_per_call_lines() -> None:
    extsvc_logging.configure("DEBUG", "json")
    assert logging.getLogger("extsvc.authz.service").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.INFO)
    extsvc_logging.configure("WARNING", "text")
    assert not logging.getLogger("grpc").isEnabledFor(logging.INFO)


def test_redaction_covers_credential_headers_configured_ones_and_query_strings() -> None:
    extsvc_logging._extra_sensitive = frozenset({"x-db-password"})
    try:
        redacted = extsvc_logging.redact_headers({
            "Authorization": "Bearer t", "x-db-password": "p", ":path": "/a/b?api_key=k&x=1",
            "x-tenant": "acme", "cookie": "sid=1",
        })
    finally:
        extsvc_logging._extra_sensitive = frozenset()
    assert redacted == {
        "Authorization": "<redacted>", "x-db-password": "<redacted>",
        ":path": "/a/b?<redacted>", "x-tenant": "acme", "cookie": "<redacted>",
    }
