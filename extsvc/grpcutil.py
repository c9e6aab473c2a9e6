"""gRPC helpers every service shares: the call's ``:authority``, and request-chosen names in logs.

Bottom floor: imports only extsvc.protocol_names, so the ext_authz, ext_proc and rate-limit services use
it without importing each other.
"""

from __future__ import annotations

from typing import Any

from extsvc.protocol_names import AUTHORITY_METADATA_KEY

__all__ = ["AUTHORITY_METADATA_KEY", "UNKNOWN_POLICY_LABEL", "call_authority", "printable"]

#: the ``policy`` label of the requests that named no configured policy
UNKNOWN_POLICY_LABEL = "(unknown)"
#: how much of a request-chosen name a log line shows
LOGGED_NAME_CHARS = 64


def call_authority(context: Any) -> str:
    """The ``:authority`` of the gRPC call (``GatewayExtension.grpcService.authority``).

    grpcio 1.85's asyncio server does not expose ``:authority`` (grpc/grpc#38906); newer releases
    add an accessor, used when present. Until then the value is read from the ``x-extsvc-authority``
    metadata that the Envoy config can send with ``grpc_service.initial_metadata``.
    """
    kind = type(context)
    try:
        name = _AUTHORITY_ACCESSOR[kind]
    except KeyError:  # once per context class: a missing attribute costs a raised AttributeError
        name = next((n for n in ("experimental_authority", "authority") if hasattr(kind, n)), None)
        _AUTHORITY_ACCESSOR[kind] = name
    if name is not None:
        value = getattr(context, name)()
        if value:
            return value.decode() if isinstance(value, bytes) else str(value)
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORITY_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


#: per servicer-context class, the name of its ``:authority`` accessor (None: it has none)
_AUTHORITY_ACCESSOR: dict[type, str | None] = {}


def printable(name: str) -> str:
    """``name`` for a log line: quoted, at most :data:`LOGGED_NAME_CHARS` characters of it."""
    if len(name) <= LOGGED_NAME_CHARS:
        return repr(name)
    return f"{name[:LOGGED_NAME_CHARS]!r}... ({len(name)} characters)"
