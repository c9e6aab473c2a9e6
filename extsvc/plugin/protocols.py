"""The typed seams compiled policies call on the request path (no pluggy there)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from extsvc.plugin.check import CheckContext, Decision


@runtime_checkable
class Authorizer(Protocol):
    """One compiled ext_authz step.

    ``check`` returns a :class:`Decision` to allow or deny, or ``None`` to abstain. It runs under
    the RPC's remaining deadline; raising or overrunning makes the policy answer per ``on_error``.
    It must not block the event loop (no synchronous network or file I/O).
    """

    async def check(self, request: CheckContext, /) -> Decision | None: ...


@runtime_checkable
class Startable(Protocol):
    """Optional: awaited once before the step's config starts serving (fetch keys, warm caches)."""

    async def start(self) -> None: ...


@runtime_checkable
class Closable(Protocol):
    """Optional: awaited once after the step's config is retired and its requests finished."""

    async def aclose(self) -> None: ...


@runtime_checkable
class IdentitySource(Protocol):
    """Optional: the upstream headers through which a step passes an identity on (``x-user``).

    When a policy allows, every identity header of its steps that the allowing decision does not
    set is removed from the upstream request, so a client cannot send ``x-user`` itself and have
    it reach the backend when another step (or no step) established the identity.
    """

    identity_headers: frozenset[str]
