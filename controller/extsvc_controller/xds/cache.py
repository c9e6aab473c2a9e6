"""Snapshots of xDS resources, one per Gateway, and which Envoy belongs to which Gateway.

Why content hashes: xDS versions are opaque to Envoy, but a counter restarts with the controller
and can then collide with different content on a reconnecting Envoy, which would skip the update.
A hash of the deterministic serialization is the same for the same content in every process, is
never empty (Envoy treats ``""`` as "nothing accepted yet"), and lets an unchanged ``set`` push
nothing at all.

Why groups: every Envoy of one Gateway gets the same config, so snapshots are keyed by the Gateway
(``"<namespace>/<name>"``), not by node id; :func:`group_of` says which Gateway a node serves.

The cache is not thread-safe: call :meth:`SnapshotCache.set` and :meth:`SnapshotCache.remove` on
the event loop that runs the server (the wake-ups they send are plain calls into the streams).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from types import MappingProxyType
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

__all__ = [
    "CDS",
    "EDS",
    "LDS",
    "PUSH_ORDER",
    "RDS",
    "SDS",
    "SHORT_NAMES",
    "WILDCARD_TYPES",
    "NodeLedger",
    "NodeStatus",
    "SnapshotCache",
    "XdsSnapshot",
    "group_of",
    "parse_group",
    "selection_version",
]

log = logging.getLogger(__name__)

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# Make before break: clusters (and their endpoints) exist before a listener or route names them.
PUSH_ORDER: tuple[str, ...] = (CDS, EDS, LDS, RDS, SDS)
SHORT_NAMES: Mapping[str, str] = MappingProxyType(
    {CDS: "cds", EDS: "eds", LDS: "lds", RDS: "rds", SDS: "sds"}
)
# CDS and LDS are wildcard subscriptions: every response carries the complete set, and a name left
# out is deleted. EDS, RDS and SDS are fetched by name.
WILDCARD_TYPES = frozenset({CDS, LDS})

# The field that names each resource (ClusterLoadAssignment calls it cluster_name).
_NAME_FIELD: Mapping[str, str] = MappingProxyType(
    {CDS: "name", EDS: "cluster_name", LDS: "name", RDS: "name", SDS: "name"}
)

_VERSION_CHARS = 16  # 64 bits of sha256: short in logs and config_dump, no practical collisions

# Kubernetes: a namespace is a DNS label, a Gateway name a DNS subdomain.
_GROUP = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")


def _digest(parts: Iterable[bytes]) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "big"))  # length-prefixed: no ambiguous joins
        hasher.update(part)
    return hasher.hexdigest()[:_VERSION_CHARS]


def selection_version(versions: Iterable[tuple[str, str]]) -> str:
    """The version of a set of ``(name, resource version)`` pairs: the same set, the same version."""
    return _digest(f"{name}\0{version}".encode() for name, version in sorted(versions))


def parse_group(value: str) -> str | None:
    """``value`` when it has the form ``<namespace>/<name>`` (Kubernetes names), else None."""
    return value if _GROUP.fullmatch(value) else None


def group_of(node: Any) -> str | None:
    """The group (Gateway ``"<namespace>/<name>"``) an Envoy node serves, or None.

    First the node metadata's string field ``gateway`` (what :func:`~.bootstrap.ads_bootstrap`
    writes); when that is absent or not of the form ``<namespace>/<name>``, ``node.cluster`` if it
    has that form. A node that maps to nothing gets no config at all: sending it an empty CDS/LDS
    would delete whatever it is serving.
    """
    metadata = node.metadata
    if "gateway" in metadata.fields:
        value = metadata.fields["gateway"]
        if value.WhichOneof("kind") == "string_value":
            group = parse_group(value.string_value)
            if group is not None:
                return group
    return parse_group(node.cluster)


def _resource_name(type_url: str, message: Message) -> str:
    return str(getattr(message, _NAME_FIELD[type_url]))


def _freeze(
    resources: Mapping[str, Mapping[str, Message]], copy_messages: bool = True
) -> dict[str, dict[str, Message]]:
    """A private copy of the resources, checked: a known type URL, the right message, matching names.

    ``copy_messages=False``: the caller hands the messages over (it keeps no reference to change
    them through), so the snapshot keeps them as they are, without a second copy in memory.
    """
    frozen: dict[str, dict[str, Message]] = {}
    for type_url, by_name in resources.items():
        if type_url not in SHORT_NAMES:
            raise ValueError(f"unsupported xDS type URL {type_url!r}")
        expected = type_url.rpartition("/")[2]
        copies: dict[str, Message] = {}
        for name, message in by_name.items():
            if message.DESCRIPTOR.full_name != expected:
                raise ValueError(f"{type_url}: resource {name!r} is a {message.DESCRIPTOR.full_name}")
            if not name or _resource_name(type_url, message) != name:
                raise ValueError(
                    f"{SHORT_NAMES[type_url]}: key {name!r} differs from the resource's own name "
                    f"{_resource_name(type_url, message)!r}"
                )
            if copy_messages:
                copy = type(message)()
                copy.CopyFrom(message)  # later edits to the caller's message cannot change ours
                message = copy
            copies[name] = message
        frozen[type_url] = copies
    return frozen


@dataclass(frozen=True, eq=False)
class XdsSnapshot:
    """The complete xDS state of one group: type URL -> resource name -> protobuf message.

    A type that is absent means "none of that type": for CDS/LDS that is an empty set, sent as such
    once the snapshot exists. ``version`` covers all content; ``type_versions`` and
    ``resource_versions`` (hash of each resource's bytes) let the server send only what changed.
    The messages are copied on construction; do not modify what the properties return.
    """

    resources: Mapping[str, Mapping[str, Message]]
    #: False: the caller hands the messages over instead of the snapshot copying them
    copy_messages: InitVar[bool] = True
    version: str = field(init=False)
    type_versions: Mapping[str, str] = field(init=False, repr=False)
    resource_versions: Mapping[str, Mapping[str, str]] = field(init=False, repr=False)
    packed: Mapping[str, Mapping[str, any_pb2.Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self, copy_messages: bool) -> None:
        frozen = _freeze(self.resources, copy_messages)
        resource_versions: dict[str, Mapping[str, str]] = {}
        packed: dict[str, Mapping[str, any_pb2.Any]] = {}
        for type_url, by_name in frozen.items():
            versions: dict[str, str] = {}
            anys: dict[str, any_pb2.Any] = {}
            for name, message in sorted(by_name.items()):
                data = message.SerializeToString(deterministic=True)
                versions[name] = _digest([data])
                # Packed once here, not once per stream: every Envoy of the group shares them.
                anys[name] = any_pb2.Any(type_url=type_url, value=data)
            resource_versions[type_url] = MappingProxyType(versions)
            packed[type_url] = MappingProxyType(anys)
        type_versions = {
            type_url: selection_version(resource_versions.get(type_url, {}).items())
            for type_url in PUSH_ORDER
        }
        set_ = object.__setattr__  # frozen dataclass: derived fields are set once, here
        set_(self, "resources", MappingProxyType({t: MappingProxyType(r) for t, r in frozen.items()}))
        set_(self, "resource_versions", MappingProxyType(resource_versions))
        set_(self, "packed", MappingProxyType(packed))
        set_(self, "type_versions", MappingProxyType(type_versions))
        set_(self, "version", _digest(f"{t}\0{v}".encode() for t, v in sorted(type_versions.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, XdsSnapshot) and other.version == self.version

    def __hash__(self) -> int:
        return hash(self.version)

    def names(self, type_url: str) -> Mapping[str, str]:
        """Resource name -> resource version for one type (empty when the type is absent)."""
        return self.resource_versions.get(type_url, MappingProxyType({}))


@dataclass
class NodeStatus:
    """What one connected node has said: the last ACKed version and NACK message per type.

    Keys are type short names (``cds``...). NACK messages are already truncated. Kept only while
    the node has a stream open, so the ledger is bounded by the server's stream cap.
    """

    node_id: str
    group: str | None
    streams: int = 0
    acked: dict[str, str] = field(default_factory=dict)
    nacked: dict[str, str] = field(default_factory=dict)


class NodeLedger:
    """ACK/NACK bookkeeping per node id, for operators and tests ("has every Envoy taken v2?")."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeStatus] = {}

    def attach(self, node_id: str, group: str | None) -> NodeStatus:
        status = self._nodes.get(node_id)
        if status is None:
            status = self._nodes[node_id] = NodeStatus(node_id, group)
        status.group = group  # a reconnect may overlap a half-dead stream: the newest wins
        status.streams += 1
        return status

    def detach(self, node_id: str) -> None:
        status = self._nodes.get(node_id)
        if status is not None:
            status.streams -= 1
            if status.streams <= 0:
                del self._nodes[node_id]

    def get(self, node_id: str) -> NodeStatus | None:
        return self._nodes.get(node_id)

    def all(self) -> list[NodeStatus]:
        return list(self._nodes.values())


Wake = Callable[[], None]


class SnapshotCache:
    """One :class:`XdsSnapshot` per group, and the streams to wake when it changes."""

    def __init__(self) -> None:
        self._snapshots: dict[str, XdsSnapshot] = {}
        self._watchers: dict[str, set[Wake]] = {}
        self.nodes = NodeLedger()

    def get(self, group: str) -> XdsSnapshot | None:
        return self._snapshots.get(group)

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def set(self, group: str, snapshot: XdsSnapshot) -> bool:
        """Store ``snapshot`` for ``group``; wake the group's streams if the content changed.

        Returns whether it changed. Setting equal content again wakes nobody, so a translator may
        call this after every event without causing pushes.
        """
        previous = self._snapshots.get(group)
        if previous is not None and previous.version == snapshot.version:
            return False
        self._snapshots[group] = snapshot
        for wake in list(self._watchers.get(group, ())):
            wake()
        return True

    def remove(self, group: str) -> None:
        """Forget ``group``'s snapshot. Its Envoys keep their last config; nothing is pushed to them
        (an empty CDS/LDS would tear their listeners down) until a snapshot is set again."""
        self._snapshots.pop(group, None)

    def watch(self, group: str, wake: Wake) -> Callable[[], None]:
        """Call ``wake()`` whenever ``group``'s content changes; returns the function that stops it."""
        self._watchers.setdefault(group, set()).add(wake)

        def stop() -> None:
            watchers = self._watchers.get(group)
            if watchers is not None:
                watchers.discard(wake)
                if not watchers:
                    del self._watchers[group]

        return stop
