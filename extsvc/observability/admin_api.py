"""The admin gRPC API (proto/extsvc/admin/v1/admin.proto): the live decision stream.

Each worker serves it on a Unix socket of its own, ``<run dir>/admin-<worker>.sock``; the admin
port (:mod:`extsvc.observability.admin`) hands every HTTP/2 connection it accepts to the socket
of the worker that accepted it, so the API shares the admin port's address and exposure
(loopback by default). With ``--workers N`` the supervisor gives all workers one run dir, and a
``WatchDecisions`` call with ``all_workers`` merges the other workers' streams, read from their
sockets, into its own.

Bounded: a reader's queue (``DecisionLog``), readers per worker (``decision_stream_max_readers``),
the filter's lists and strings (:data:`MAX_FILTER_VALUES`, :data:`MAX_FILTER_TEXT`), and the
merge queue of an ``all_workers`` call (:data:`MERGE_QUEUE` batches); past any of them records
are dropped and counted, never waited for. Decisions go out in batches, at most one message per
reader every :data:`BATCH_INTERVAL_S`: per decision, a busy server then pays for building its
message, not for a gRPC write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from extsvc.admin.v1 import admin_pb2, admin_pb2_grpc
from extsvc.observability.decisions import DecisionFilter, DecisionLog, DecisionRecord

log = logging.getLogger(__name__)

SERVICE_NAME = "extsvc.admin.v1.Admin"
#: Environment variable naming the run dir the workers of one supervisor share.
RUN_DIR_ENV = "EXTSVC_RUN_DIR"
MAX_FILTER_VALUES = 64
MAX_FILTER_TEXT = 1024
#: Messages an all_workers call may have waiting from the other workers.
MERGE_QUEUE = 4096
#: Seconds before a lost connection to another worker is tried again.
PEER_RETRY_S = 1.0
#: Seconds a reader's next message waits, gathering decisions (at most ~20 messages a second).
BATCH_INTERVAL_S = 0.05
#: Decisions per message when sending the kept ones.
RECENT_BATCH = 500


def to_message(record: DecisionRecord) -> Any:
    """A :class:`DecisionRecord` as the API's ``Decision`` message."""
    return admin_pb2.Decision(
        time_unix_ms=int(record.time * 1000), service=record.service, policy=record.policy,
        outcome=record.outcome, status=record.status, step=record.step, reason=record.reason,
        latency_ms=record.latency_s * 1000.0, request_id=record.request_id,
        trace_id=record.trace_id, authority=record.authority, path=record.path,
        method=record.method, source=record.source, worker=record.worker,
        detail=dict(record.detail),
    )


def _filter_of(message: Any) -> DecisionFilter:
    def values(field: Any) -> frozenset[str]:
        if len(field) > MAX_FILTER_VALUES:
            raise ValueError(f"more than {MAX_FILTER_VALUES} values in one filter field")
        return frozenset(v[:MAX_FILTER_TEXT] for v in field)

    return DecisionFilter(
        services=values(message.services), policies=values(message.policies),
        outcomes=values(message.outcomes), authority=message.authority[:MAX_FILTER_TEXT],
        path_prefix=message.path_prefix[:MAX_FILTER_TEXT],
    )


class AdminApi(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    """:param decisions: this worker's decision log.
    :param token: required as ``authorization: Bearer <token>`` when set.
    :param run_dir: where the workers' sockets live (None: a private temporary folder).
    :param worker: this worker's index."""

    def __init__(
        self, decisions: DecisionLog, *, token: str | None = None, run_dir: Path | None = None,
        worker: int = 0,
    ) -> None:
        self._decisions = decisions
        self._token = token
        self._own_dir = run_dir is None
        self._run_dir = run_dir
        self._worker = worker
        self._server: Any = None
        self.socket_path: str | None = None

    async def start(self) -> None:
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="extsvc-run-"))
        path = self._run_dir / f"admin-{self._worker}.sock"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a worker that died: this worker index is ours now
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        admin_pb2_grpc.add_AdminServicer_to_server(self, server)
        if not server.add_insecure_port(f"unix:{path}"):
            raise OSError(f"cannot listen on {path}")
        await server.start()
        self._server = server
        self.socket_path = str(path)

    async def stop(self, grace: float = 0.5) -> None:
        """Stop serving (readers are cut: their streams end with CANCELLED)."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            self.socket_path = None
        if self._own_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def _peers(self) -> list[str]:
        """The sockets of the other workers sharing the run dir."""
        if self._run_dir is None:
            return []
        return sorted(
            str(p) for p in self._run_dir.glob("admin-*.sock") if str(p) != self.socket_path
        )

    async def WatchDecisions(self, request: Any, context: Any) -> AsyncIterator[Any]:
        if self._token is not None:
            sent = dict(context.invocation_metadata() or ()).get("authorization", "")
            if not hmac.compare_digest(str(sent).encode(), f"Bearer {self._token}".encode()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
        if not self._decisions.active:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "the decision log is off (decision_log: off)"
            )
        try:
            filter = _filter_of(request.filter)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        recent = min(request.recent, 100_000)
        peers = self._peers() if request.all_workers else []
        if request.no_follow or (peers and recent):
            # the kept decisions of every worker, merged in time order; then (following) the
            # new ones only
            async for message in self._recent(filter, recent, request.filter, peers):
                yield message
            if request.no_follow:
                return
            recent = 0
        reader = self._decisions.attach(filter, recent)
        if reader is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many decision readers")
        assert reader is not None  # abort() raised otherwise
        try:
            if not peers:
                while True:
                    records, dropped = await reader.take()
                    yield admin_pb2.WatchDecisionsResponse(
                        decisions=[to_message(r) for r in records], dropped=dropped
                    )
                    # what comes meanwhile goes in the next message: one message per batch
                    # costs the loop far less than one per decision on a busy server
                    await asyncio.sleep(BATCH_INTERVAL_S)
            else:
                async for message in self._merge(reader, request.filter, peers):
                    yield message
        finally:
            self._decisions.detach(reader)

    async def _recent(
        self, filter: DecisionFilter, recent: int, wire_filter: Any, peers: list[str]
    ) -> AsyncIterator[Any]:
        """The kept decisions of this worker (and the peers'), oldest first, then the end."""
        messages = [to_message(r) for r in self._decisions.recent(filter, recent)]
        for peer in peers:
            try:
                async with grpc.aio.insecure_channel(f"unix:{peer}") as channel:
                    call = admin_pb2_grpc.AdminStub(channel).WatchDecisions(
                        _peer_request(wire_filter, recent, follow=False),
                        metadata=self._metadata(), timeout=5.0,
                    )
                    async for response in call:
                        messages.extend(response.decisions)
            except grpc.aio.AioRpcError as exc:  # a worker restarting: the others still answer
                log.debug("decision stream: worker socket %s: %s", peer, exc.code())
        messages.sort(key=lambda m: m.time_unix_ms)
        kept = messages[-recent:] if recent else []
        for start in range(0, len(kept), RECENT_BATCH):
            yield admin_pb2.WatchDecisionsResponse(decisions=kept[start:start + RECENT_BATCH])

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token is not None else ()

    async def _merge(self, reader: Any, wire_filter: Any, peers: list[str]) -> AsyncIterator[Any]:
        """This worker's new decisions and the other workers' (read from their sockets), as
        they come; a worker that restarts is read again once its socket is back."""
        queue: asyncio.Queue[Any] = asyncio.Queue(MERGE_QUEUE)
        dropped = 0

        def put(message: Any) -> None:
            nonlocal dropped
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                dropped += len(message.decisions) + message.dropped

        async def local() -> None:
            while True:
                records, lost = await reader.take()
                put(admin_pb2.WatchDecisionsResponse(
                    decisions=[to_message(r) for r in records], dropped=lost
                ))
                await asyncio.sleep(BATCH_INTERVAL_S)

        async def remote(peer: str) -> None:
            while True:
                peer_request = _peer_request(wire_filter, 0, follow=True)
                try:
                    async with grpc.aio.insecure_channel(f"unix:{peer}") as channel:
                        call = admin_pb2_grpc.AdminStub(channel).WatchDecisions(
                            peer_request, metadata=self._metadata()
                        )
                        async for response in call:
                            put(response)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                      grpc.StatusCode.FAILED_PRECONDITION):
                        return
                    if peer not in self._peers():  # the worker is gone for good
                        return
                await asyncio.sleep(PEER_RETRY_S)

        tasks = [asyncio.ensure_future(local())] + [asyncio.ensure_future(remote(p)) for p in peers]
        try:
            while True:
                message = await queue.get()
                if dropped:
                    message.dropped += dropped
                    dropped = 0
                yield message
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _peer_request(wire_filter: Any, recent: int, *, follow: bool) -> Any:
    """What one worker asks another: the same filter, that worker's decisions only."""
    return admin_pb2.WatchDecisionsRequest(
        filter=wire_filter, recent=recent, all_workers=False, no_follow=not follow
    )


def read_token(path: Path | None) -> str | None:
    """The admin token in ``path`` (whitespace around it ignored); None when unset.

    :raises ValueError: the file is empty.
    """
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"admin_token_file {path} is empty")
    return token
