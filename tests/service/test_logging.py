"""What the server logs about requests: the x-request-id, never a credential."""

from __future__ import annotations

import logging

import pytest

from .conftest import Serve

CONFIG = """
default_policy: open
policies:
  open:
    steps: [{plugin: set-headers, config: {remove_upstream: [authorization, cookie]}}]
  closed:
    steps: [{plugin: deny, config: {status: 401}}]
  broken:
    steps: [{plugin: script, config: {answer: raise}}]
  slow:
    timeout_ms: 20
    steps: [{plugin: script, config: {answer: sleep}}]
"""

#: Credential headers as a client sends them, and the secret part of each.
CREDENTIALS = {
    "authorization": "Bearer s3cr3t-bearer-token",
    "proxy-authorization": "Basic s3cr3t-proxy-basic",
    "cookie": "session=s3cr3t-session-cookie; theme=dark",
    "x-api-key": "s3cr3t-api-key",
}
SECRETS = ("s3cr3t-bearer-token", "s3cr3t-proxy-basic", "s3cr3t-session-cookie", "s3cr3t-api-key")


async def test_request_logs_carry_the_request_id_and_no_credential(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="extsvc")
    # One request per outcome: allow, deny, a raising step, a timed-out step, an unknown policy.
    cases = {"open": "rid-open", "closed": "rid-closed", "broken": "rid-broken",
             "slow": "rid-slow", "missing": "rid-missing"}
    async with serve(CONFIG) as served:
        for policy, request_id in cases.items():
            await served.check(
                "/account",
                headers=CREDENTIALS,
                context_extensions={"extsvc-policy": policy},
                request_id=request_id,
            )
    everything = caplog.text + "".join(str(vars(r)) for r in caplog.records)
    assert [s for s in SECRETS if s in everything] == []
    for request_id in cases.values():
        assert request_id in caplog.text, f"no log line carries {request_id}"
    # The per-request lines also carry it as a field, which JSON logs print as "request_id".
    fields = {getattr(r, "request_id", None) for r in caplog.records}
    assert {"rid-open", "rid-closed", "rid-missing"} <= fields
