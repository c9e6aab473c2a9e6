"""Authority-based policy selection, shared by ext_authz (Runtime.select) and ext_proc
(ExtprocPolicies.select). Bottom floor: no extsvc imports."""

from __future__ import annotations

from collections.abc import Container, Mapping


def by_authority(
    host: str, authority_policies: Mapping[str, str], policies: Container[str]
) -> str | None:
    """The policy ``host`` (a call's ``:authority``) picks, ``None`` when it picks none.

    ``authority_policies`` first, then a policy named like the host; then the same two for the
    host without its port (``"policy:port"`` -> ``"policy"``).
    """
    name = authority_policies.get(host)
    if name is None and host in policies:
        name = host
    if name is None:
        bare = host.rsplit(":", 1)[0]
        name = authority_policies.get(bare) or (bare if bare in policies else None)
    return name
