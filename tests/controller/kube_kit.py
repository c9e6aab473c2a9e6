"""kmock fixtures for the Kubernetes layer's tests: an emulator closer to a real API server.

kmock's KubernetesEmulator never sets resourceVersion/uid/generation, stores metadata.namespace
only as sent, does not map PUT, ignores optimistic concurrency, applies spec sent to /status,
never ends a watch nor sends bookmarks, and sends errors with a Content-Type lightkube does not
recognise as an API error. :class:`KubeEmulator` fixes what
these tests rely on; :class:`Cluster` runs it on a port that can be stopped and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.config.models import Cluster as KCluster
from lightkube.config.models import User

from extsvc_controller.kube.kinds import KINDS, Kind

_ACTION = kmock.action
LEASE = Kind("Lease", "coordination.k8s.io", "v1", "leases")


def _replace_patch(old: Any, new: Any) -> Any:
    """A merge patch turning ``old`` into ``new`` (what a PUT does, on kmock's merge-only store)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out = {k: _replace_patch(old.get(k), v) for k, v in new.items()}
    out.update({k: None for k in old if k not in new})
    return out


class KubeEmulator(kmock.KubernetesEmulator):
    """:attr:`watch_limit`: end every watch after this many seconds (a server-side timeout),
    sending a BOOKMARK first when the client asked for bookmarks."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._counter = itertools.count(1)
        self.last_rv = 0
        self.watch_limit: float | None = None
        # Declared up front, as in a cluster with the CRDs installed (kmock's load_bundled() uses
        # a deprecated importlib API that this suite's warning filters turn into an error).
        for kind in (*KINDS, LEASE):
            self.resources[f"{kind.api_version}/{kind.plural}"] = kmock.ResourceInfo(
                kind=kind.kind, namespaced=True, verbs={"list", "watch", "get", "create", "patch"},
            )

    def _next_rv(self) -> str:
        self.last_rv = next(self._counter)
        return str(self.last_rv)

    def _stored(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        raw: dict[str, Any] = self.objects[key].raw
        return raw

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            if request.method == kmock.method.PUT and request.name:
                object.__setattr__(request, "action", _ACTION.UPDATE)
                old = self._stored(request)
                if old is not None and isinstance(request.data, dict):
                    self._check_rv(old, request.data)
                    new = dict(request.data)
                    if request.subresource != "status":
                        new.setdefault("status", old.get("status"))
                    object.__setattr__(request, "data", _replace_patch(old, new))
            if request.action == _ACTION.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                if request.namespace:
                    meta["namespace"] = request.namespace
                meta.update(uid=str(uuid.uuid4()), generation=1, resourceVersion=self._next_rv())
            elif request.action == _ACTION.UPDATE and request.name and isinstance(request.data, dict):
                old = self._stored(request)
                if old is not None:
                    self._check_rv(old, request.data)
                    data = request.data
                    if request.subresource == "status":
                        data = {"status": data.get("status")}
                    else:
                        data.pop("status", None)
                        if "spec" in data and data["spec"] != old.get("spec"):
                            gen = old.get("metadata", {}).get("generation") or 0
                            data.setdefault("metadata", {})["generation"] = gen + 1
                    data.setdefault("metadata", {})
                    data["metadata"] = {**(data["metadata"] or {}), "resourceVersion": self._next_rv()}
                    object.__setattr__(request, "data", data)
        return await super()._handle(request)

    @staticmethod
    def _check_rv(old: dict[str, Any], data: dict[str, Any]) -> None:
        sent = (data.get("metadata") or {}).get("resourceVersion")
        if sent is not None and sent != old.get("metadata", {}).get("resourceVersion"):
            raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        resp = await super()._render_error(exc)
        assert isinstance(resp, aiohttp.web.Response) and resp.body is not None
        body = resp.body if isinstance(resp.body, bytes) else b"{}"
        # lightkube raises ApiError only for exactly ``application/json``.
        headers = {"Content-Type": "application/json"}
        return aiohttp.web.Response(body=body, status=resp.status, headers=headers)

    async def _serve_list(self, request: Any) -> Any:
        out = await super()._serve_list(request)
        out["metadata"] = {"resourceVersion": str(self.last_rv)}
        return out

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        inner = super()._serve_watch(request)
        limit = self.watch_limit
        if limit is None:
            async for event in inner:
                yield event
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(inner), max(0.0, deadline - loop.time()))
                except (TimeoutError, StopAsyncIteration):
                    break
                yield event
        finally:
            await inner.aclose()
        if request.params.get("allowWatchBookmarks") == "true":
            yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(self.last_rv)}}}


class Cluster:
    """The emulator on a TCP port that :meth:`down` closes (connection refused) and :meth:`up`
    reopens on the same port, with the stored objects intact."""

    def __init__(self, emulator: KubeEmulator) -> None:
        self.emulator = emulator
        self._server: kmock.Server | None = None
        self.port: int | None = None

    async def up(self) -> None:
        self._server = kmock.Server(self.emulator, port=self.port)
        await self._server.__aenter__()
        self.port = self._server.port

    async def down(self) -> None:
        assert self._server is not None
        server, self._server = self._server, None
        await server.__aexit__(None, None, None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> AsyncClient:
        config = KubeConfig.from_one(cluster=KCluster(server=self.url), user=User(token="test-token"))
        return AsyncClient(config=config, namespace="default", trust_env=False)

    # --- seeding and changing objects through the API (so that watches see them) --------------

    def path(self, kind: Kind, ns: str, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{kind.version}" if not kind.group else f"/apis/{kind.group}/{kind.version}"
        return "/".join(p for p in (f"{base}/namespaces/{ns}/{kind.plural}", name, sub) if p)

    async def _call(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        limit = aiohttp.ClientTimeout(total=15)  # a stalled emulator fails the test, not hangs it
        async with aiohttp.ClientSession(timeout=limit) as s, s.request(
            method, self.url + path, data=None if body is None else json.dumps(body),
            headers={"Content-Type": ctype},
        ) as resp:
            text = await resp.text()
            assert resp.status < 300, (resp.status, text)
            return json.loads(text) if text else None

    async def create(self, kind: Kind, ns: str, name: str, **fields: Any) -> dict[str, Any]:
        meta = {"name": name, "namespace": ns}
        body = {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta, **fields}
        out: dict[str, Any] = await self._call("POST", self.path(kind, ns), body)
        return out

    async def patch(self, kind: Kind, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self._call(
            "PATCH", self.path(kind, ns, name), body, "application/merge-patch+json"
        )
        return out

    async def patch_status(self, kind: Kind, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """A merge-patch of the status subresource (as a controller writes it)."""
        out: dict[str, Any] = await self._call(
            "PATCH", self.path(kind, ns, name) + "/status", {"status": status},
            "application/merge-patch+json",
        )
        return out

    async def delete(self, kind: Kind, ns: str, name: str) -> None:
        await self._call("DELETE", self.path(kind, ns, name))

    def stored(self, kind: Kind, ns: str, name: str) -> dict[str, Any]:
        res = kmock.resource(kind.group, kind.version, kind.plural)
        raw: dict[str, Any] = self.emulator.objects[res, ns, name].raw
        return raw


@contextlib.asynccontextmanager
async def emulated_cluster() -> AsyncIterator[Cluster]:
    """An emulated API server on a port of its own, for one test (the ``cluster`` fixtures)."""
    async with KubeEmulator() as emu:
        c = Cluster(emu)
        await c.up()
        try:
            yield c
        finally:
            if c._server is not None:
                await c.down()


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait (polling) until ``predicate()``; fail the test with ``what`` after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "controller" / "manifests"
KIND_OF = {kind.kind: kind for kind in KINDS}


def kubeconfig(tmp_path: Path, cluster: Cluster) -> Path:
    """A kubeconfig file that points at ``cluster``."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
        "users": [{"name": "u", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
    }))
    return path


async def seed(cluster: Cluster, folder: Path = EXAMPLE) -> None:
    """Create every object of the manifests in ``folder`` through the API (watches see them)."""
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                meta = doc.pop("metadata")
                doc.pop("apiVersion")
                kind = KIND_OF[doc.pop("kind")]
                await cluster.create(kind, meta["namespace"], meta["name"], **doc)
