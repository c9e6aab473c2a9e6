"""StatusWriter: the translator's statuses → the objects' status subresources, in kgateway's shapes.

* TrafficPolicy: ``status.ancestors[]`` of ``{ancestorRef (the Gateway), controllerName, conditions}``;
* HTTPRoute / GRPCRoute: ``status.parents[]`` of ``{parentRef (as in the spec), controllerName,
  conditions}``;
* Gateway: ``status.conditions`` and ``status.listeners[]`` (name, supportedKinds, attachedRoutes,
  conditions); GatewayExtension: ``status.conditions``.

Every condition gets ``observedGeneration``, and keeps its ``lastTransitionTime`` while its type
and status are unchanged, so an unchanged result gives a byte-identical status that is not written.
Entries of other controllers in ``parents`` / ``ancestors`` are kept (merged by controllerName);
since a merge-patch replaces a list whole, those patches carry the object's resourceVersion, and a
concurrent write by another controller makes ours fail (409) instead of erasing theirs.

Writes are merge-patches to the status subresource only, and only while ``leader()`` is true
(checked right before each one): a replica that lost its Lease stops writing at once.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
from lightkube import AsyncClient
from lightkube.types import PatchType

from ..model import GATEWAY_API
from ..results import Condition, Status
from .kinds import BY_NAME, as_dict, resource_version
from .metrics import KubeMetrics

log = logging.getLogger(__name__)

Key = tuple[str, str, str]
OWNED = ("Gateway", "HTTPRoute", "GRPCRoute", "GatewayExtension", "TrafficPolicy")
_MAX_CONDITIONS = 8  # the CRDs' maxItems
_MAX_ENTRIES = 16  # ancestors (PolicyStatus) / parents (RouteStatus) maxItems
_MAX_MESSAGE = 32768


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _time(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(
    new: Sequence[Condition], old: Any, generation: int | None, now: str
) -> list[dict[str, Any]]:
    """Kubernetes conditions (one per type: the first status/reason wins, messages are joined)."""
    previous = {c.get("type"): c for c in old if isinstance(c, dict)} if isinstance(old, list) else {}
    merged: dict[str, dict[str, Any]] = {}
    for c in new:
        if c.type in merged:
            if c.message and c.message not in merged[c.type]["message"]:
                merged[c.type]["message"] = "; ".join(filter(None, (merged[c.type]["message"], c.message)))
            continue
        merged[c.type] = {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
    out = []
    for cond in list(merged.values())[:_MAX_CONDITIONS]:
        cond["message"] = cond["message"][:_MAX_MESSAGE]
        if generation is not None:
            cond["observedGeneration"] = generation
        prev = previous.get(cond["type"])
        same = prev is not None and prev.get("status") == cond["status"] and prev.get("lastTransitionTime")
        cond["lastTransitionTime"] = prev["lastTransitionTime"] if same and prev else now
        out.append(cond)
    return out


def _entries(old: Any, key: str, controller: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Other controllers' entries (kept as they are) and ours (by ref, for lastTransitionTime)."""
    others: list[dict[str, Any]] = []
    ours: dict[str, dict[str, Any]] = {}
    for e in old if isinstance(old, list) else []:
        if not isinstance(e, dict):
            continue
        if e.get("controllerName") == controller:
            ours[_ref_id(e.get(key))] = e
        else:
            others.append(e)
    return others, ours


def _ref_id(ref: Any) -> str:
    return repr(sorted(ref.items())) if isinstance(ref, dict) else ""


def _route_parents(status: Status, obj: Mapping[str, Any]) -> list[tuple[dict[str, Any], list[Condition]]]:
    """Per Gateway parentRef of the spec: its conditions. The translator reports one Accepted per
    parent it resolved, with the message ``parent <ns>/<name>[/<section>]``; the other conditions
    (ResolvedRefs, replaced rules) concern the whole route. A parentRef the translator did not
    resolve (another controller's Gateway) gets no entry, unless no parent resolved at all."""
    spec = as_dict(obj.get("spec"))
    refs = [r for r in (spec.get("parentRefs") or []) if isinstance(r, dict)]
    refs = [
        r for r in refs
        if r.get("group", GATEWAY_API) == GATEWAY_API and r.get("kind", "Gateway") == "Gateway"
    ]
    accepted = [c for c in status.conditions if c.type == "Accepted" and c.message.startswith("parent ")]
    common = [c for c in status.conditions if c.type != "Accepted"]
    none_matched = [c for c in status.conditions if c.type == "Accepted" and c not in accepted]
    out = []
    for ref in refs:
        where = f"parent {ref.get('namespace') or status.namespace}/{ref.get('name')}"
        if ref.get("sectionName"):
            where += f"/{ref['sectionName']}"
        mine = [c for c in accepted if c.message == where]
        if mine:
            out.append((ref, [*mine, *common]))
        elif none_matched:
            out.append((ref, [*none_matched, *common]))
    return out


def status_body(
    status: Status,
    obj: Mapping[str, Any],
    controller_name: str,
    now: str,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The part of ``status`` this controller writes for ``obj`` (``base``: the status it has now)."""
    meta = as_dict(obj.get("metadata"))
    gen = meta.get("generation")
    generation = gen if isinstance(gen, int) else None
    current = base if base is not None else as_dict(obj.get("status"))
    if status.kind in ("Gateway", "GatewayExtension"):
        body: dict[str, Any] = {
            "conditions": conditions(status.conditions, current.get("conditions"), generation, now)
        }
        if status.listeners:
            before = {
                e.get("name"): e for e in current.get("listeners") or [] if isinstance(e, dict)
            }
            body["listeners"] = [
                {
                    "name": ln.name,
                    "supportedKinds": [{"group": GATEWAY_API, "kind": k} for k in ln.supported_kinds],
                    "attachedRoutes": ln.attached_routes,
                    "conditions": conditions(
                        ln.conditions, before.get(ln.name, {}).get("conditions"), generation, now
                    ),
                }
                for ln in status.listeners[:_MAX_ENTRIES]
            ]
        return body
    if status.kind == "TrafficPolicy":
        others, ours = _entries(current.get("ancestors"), "ancestorRef", controller_name)
        entries = []
        for a in status.ancestors:
            ref = {"group": GATEWAY_API, "kind": "Gateway", "namespace": a.namespace, "name": a.name}
            prev = ours.get(_ref_id(ref), {})
            entries.append({
                "ancestorRef": ref,
                "controllerName": controller_name,
                "conditions": conditions(a.conditions, prev.get("conditions"), generation, now),
            })
        return {"ancestors": [*others, *entries][:_MAX_ENTRIES]}
    # HTTPRoute, GRPCRoute
    others, ours = _entries(current.get("parents"), "parentRef", controller_name)
    entries = []
    for ref, conds in _route_parents(status, obj):
        prev = ours.get(_ref_id(ref), {})
        entries.append({
            "parentRef": ref,
            "controllerName": controller_name,
            "conditions": conditions(conds, prev.get("conditions"), generation, now),
        })
    return {"parents": [*others, *entries][:_MAX_ENTRIES]}


@dataclass(frozen=True, slots=True)
class _Written:
    body: dict[str, Any]
    rv_before: str | None  # the object's resourceVersion the body was built on
    rv_after: str | None  # the one our patch produced


@dataclass(slots=True)
class WriteResult:
    written: int = 0
    unchanged: int = 0
    failed: int = 0
    not_leader: bool = False  # stopped because leadership was lost (or never held)


class StatusWriter:
    """:param controller_name: this controller's name in ``parents``/``ancestors`` (e.g.
    ``extsvc.dev/controller``). :param leader: true while this replica may write.
    :param gateway_classes: when given, Gateways of other classes are never written."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        controller_name: str,
        leader: Callable[[], bool],
        metrics: KubeMetrics | None = None,
        gateway_classes: Collection[str] | None = None,
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self._client = client
        self.controller_name = controller_name
        self._leader = leader
        self.metrics = metrics if metrics is not None else KubeMetrics()
        self._classes = gateway_classes
        self._clock = clock
        self._written: dict[Key, _Written] = {}

    def _owned(self, kind: str, obj: Mapping[str, Any]) -> bool:
        if kind not in OWNED:
            return False
        if kind == "Gateway" and self._classes is not None:
            spec = as_dict(obj.get("spec"))
            return str(spec.get("gatewayClassName")) in self._classes
        return True

    async def write(self, statuses: Iterable[Status], objects: Iterable[Mapping[str, Any]]) -> WriteResult:
        """Write what changed. ``objects``: the current objects (``KubeSource.objects()``); a status
        whose object is not among them is not written (it was deleted, or is not read)."""
        index: dict[Key, Mapping[str, Any]] = {}
        for o in objects:
            meta = as_dict(o.get("metadata"))
            index[(str(o.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))] = o
        result = WriteResult()
        now = _time(self._clock())
        for st in statuses:
            key = (st.kind, st.namespace, st.name)
            obj = index.get(key)
            if obj is None or not self._owned(st.kind, obj):
                continue
            rv = resource_version(dict(obj))
            current = as_dict(obj.get("status"))
            precondition = rv
            prev = self._written.get(key)
            if prev is not None and rv is not None and rv == prev.rv_before:
                # Our last write has not reached the source yet: build on what we wrote.
                current = {**current, **prev.body}
                precondition = prev.rv_after
            body = status_body(st, obj, self.controller_name, now, current)
            if all(current.get(k) == v for k, v in body.items()):
                result.unchanged += 1
                self.metrics.status_skipped.labels(st.kind).inc()
                continue
            if not self._leader():
                result.not_leader = True
                return result
            if await self._patch(st.kind, st.namespace, st.name, body, precondition, rv):
                result.written += 1
            else:
                result.failed += 1
        return result

    async def _patch(
        self, kind: str, ns: str, name: str, body: dict[str, Any], precondition: str | None, rv: str | None
    ) -> bool:
        patch: dict[str, Any] = {"status": body}
        if precondition is not None and ("parents" in body or "ancestors" in body):
            patch["metadata"] = {"resourceVersion": precondition}
        res = BY_NAME[kind].resource()
        try:
            out = await self._client.patch(
                res.Status, name, patch, namespace=ns, patch_type=PatchType.MERGE  # type: ignore[attr-defined]
            )
        except httpx2.HTTPError as exc:
            code = exc.response.status_code if isinstance(exc, httpx2.HTTPStatusError) else None
            log.warning("status of %s %s/%s not written (%s)", kind, ns, name, code or type(exc).__name__)
            self.metrics.status_writes.labels(kind, "error").inc()
            self._written.pop((kind, ns, name), None)
            return False
        after = getattr(getattr(out, "metadata", None), "resourceVersion", None)
        self._written[(kind, ns, name)] = _Written(body, rv, after if isinstance(after, str) else None)
        self.metrics.status_writes.labels(kind, "ok").inc()
        return True
