"""The decision log: one structured record per decision, to stdout and to live readers.

What is recorded (setting ``decision_log``):

- ``default``: every ext_authz answer, every ext_proc immediate response (a policy answering the
  client itself), every rate-limit OVER_LIMIT answer and every RPC error;
- ``all``: also every rate-limit OK answer and every ext_proc stream that passed;
- ``off``: nothing (and the live stream refuses readers).

Where it goes:

- stdout, one JSON object a line (``decision_log_output: stdout``), sampled
  (``decision_log_sample``) and capped per second (``decision_log_max_per_second``) so a flood
  cannot fill a disk; lines are written by a background task in a thread, never on the request
  path;
- the live stream of the admin API (``extsvc tail``, ``extsvc top``): the last
  ``decision_log_recent`` records are kept in a ring, and each reader has a bounded queue; a
  reader that cannot keep up loses records (counted), never slows a request.

A record never holds a credential: no header values except those the operator names
(``decision_log_headers``), which pass :func:`extsvc.observability.logging.redact_headers`; the
query string is cut off the path; every text field is bounded (:data:`MAX_FIELD`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal, NamedTuple

from extsvc.observability.logging import LogThrottle, redact_headers
from extsvc.observability.metrics import Metrics

log = logging.getLogger(__name__)

Level = Literal["off", "default", "all"]
SERVICES = ("ext_authz", "ext_proc", "ratelimit")
#: Longest text kept in any field of a record (a path, a reason, a header value).
MAX_FIELD = 512
#: Records waiting for stdout beyond which new ones are dropped (``backlog``).
MAX_BACKLOG = 10_000
#: Seconds between writes to stdout.
FLUSH_INTERVAL_S = 0.2
#: Formatted batches waiting for the writer thread beyond which batches are dropped (backlog).
MAX_BATCHES = 50


def bounded(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` cut to ``limit`` characters (marked with an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def route_path(path: str) -> str:
    """The path of a request target without its query string (which may carry a credential:
    ``?access_token=...``), bounded."""
    cut = path.find("?")
    return bounded(path if cut < 0 else path[:cut])


def trace_id_of(header: Callable[[str], str | None]) -> str:
    """The trace id a request's own headers carry (W3C ``traceparent``, else B3), or "".

    :param header: a header's value by its lower-case name (``headers.get``).
    """
    parent = header("traceparent")
    if parent is not None and len(parent) >= 35 and parent[2] == "-":
        return parent[3:35]
    b3 = header("x-b3-traceid")
    if b3 is not None:
        return bounded(b3, 32)
    single = header("b3")
    if single is not None:
        return bounded(single.split("-", 1)[0], 32)
    return ""


class DecisionRecord(NamedTuple):
    """One decision. Built on the request path for every decision, so a named tuple: about
    six times cheaper to make than a frozen dataclass of the same fields."""

    time: float  # Unix time, seconds
    service: str
    policy: str
    outcome: str
    status: int = 0
    step: str = ""
    reason: str = ""
    latency_s: float = 0.0
    request_id: str = ""
    trace_id: str = ""
    authority: str = ""
    path: str = ""
    method: str = ""
    source: str = ""
    detail: tuple[tuple[str, str], ...] = ()
    worker: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The record as the JSON object written to stdout (and printed by ``tail --json``)."""
        entry: dict[str, Any] = {
            "time": format_time(self.time),
            "kind": "decision",
            "service": self.service,
            "policy": self.policy,
            "outcome": self.outcome,
            "status": self.status,
            "step": self.step,
            "reason": self.reason,
            "latency_ms": round(self.latency_s * 1000.0, 3),
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "authority": self.authority,
            "path": self.path,
            "method": self.method,
            "source": self.source,
            "worker": self.worker,
        }
        if self.detail:
            entry["detail"] = dict(self.detail)
        return entry


def format_time(unix_s: float) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-12-07T02:10:11.123Z``."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """Which records a reader wants; empty fields match everything."""

    services: frozenset[str] = frozenset()
    policies: frozenset[str] = frozenset()
    outcomes: frozenset[str] = frozenset()
    authority: str = ""
    path_prefix: str = ""

    def matches(self, record: DecisionRecord) -> bool:
        return (
            (not self.services or record.service in self.services)
            and (not self.policies or record.policy in self.policies)
            and (not self.outcomes or record.outcome in self.outcomes)
            and (not self.authority or record.authority == self.authority)
            and (not self.path_prefix or record.path.startswith(self.path_prefix))
        )


class Reader:
    """One live reader: a bounded queue of the records that match its filter.

    :meth:`offer` runs on the request path (a filter check and an append); the reader's task
    waits in :meth:`take`. Past ``max_queued`` waiting records, new ones are dropped and
    counted, and :meth:`take` reports how many.
    """

    __slots__ = ("_dropped_metric", "_queue", "_sent", "_wake", "dropped", "filter", "max_queued")

    def __init__(self, filter: DecisionFilter, max_queued: int, metrics: Metrics) -> None:
        self.filter = filter
        self.max_queued = max_queued
        self._queue: deque[DecisionRecord] = deque()
        self._wake = asyncio.Event()
        #: dropped since the last take()
        self.dropped = 0
        self._dropped_metric = metrics.hot(metrics.decision_dropped.labels("stream", "slow-reader"))
        self._sent = metrics.hot(metrics.decision_records.labels("stream"))

    def offer(self, record: DecisionRecord) -> None:
        if not self.filter.matches(record):
            return
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            self._dropped_metric.inc()
            return
        self._queue.append(record)
        self._sent.inc()
        self._wake.set()

    def put_all(self, records: Iterable[DecisionRecord]) -> None:
        """Queue earlier records (the recent ones), as :meth:`offer` would."""
        for record in records:
            self.offer(record)

    async def take(self) -> tuple[list[DecisionRecord], int]:
        """Wait for records; return them and how many were dropped before them."""
        while not self._queue and not self.dropped:
            self._wake.clear()
            await self._wake.wait()
        records = list(self._queue)
        self._queue.clear()
        dropped, self.dropped = self.dropped, 0
        return records, dropped


class DecisionLog:
    """The process's decision log (one per worker).

    :param level: ``off``, ``default`` or ``all`` (see the module's docstring).
    :param stdout: write JSON lines to ``out`` (standard output unless given).
    :param sample: share of records written to stdout (the live stream sees all).
    :param max_per_second: most records written to stdout per second.
    :param recent: records kept for readers that attach later.
    :param reader_queue: records a reader may have waiting before new ones are dropped.
    :param max_readers: live readers at once.
    :param headers: request headers copied into records (values redacted as in logs).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        level: Level = "default",
        stdout: bool = True,
        sample: float = 1.0,
        max_per_second: int = 200,
        recent: int = 1000,
        reader_queue: int = 1000,
        max_readers: int = 16,
        headers: Iterable[str] = (),
        worker: int | None = None,
        out: BinaryIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.level = level
        #: any decision recorded at all (the services check this once per request)
        self.active = level != "off"
        #: also the routine ones: rate-limit OK answers, ext_proc streams that passed
        self.everything = level == "all"
        self.headers = tuple(h.lower() for h in headers)
        self.worker = int(os.environ.get("EXTSVC_WORKER_INDEX", "0")) if worker is None else worker
        self.clock = clock
        self._metrics = metrics
        self._stdout = stdout and self.active
        self._sample = sample
        self._max_per_second = max_per_second
        self._second = 0
        self._this_second = 0
        self._recent: deque[DecisionRecord] = deque(maxlen=max(recent, 0) or 1)
        self._keep_recent = recent > 0
        self._reader_queue = reader_queue
        self._max_readers = max_readers
        self.readers: list[Reader] = []
        self._pending: list[DecisionRecord] = []
        self._out = out
        self._written = metrics.hot(metrics.decision_records.labels("stdout"))
        self._over_rate = metrics.hot(metrics.decision_dropped.labels("stdout", "rate"))
        self._backlog = metrics.hot(metrics.decision_dropped.labels("stdout", "backlog"))
        self._readers_gauge = metrics.decision_readers
        self._flusher: asyncio.Task[None] | None = None
        self._writer: threading.Thread | None = None
        #: formatted batches of lines for the writer thread, None to stop
        self._lines: queue.Queue[list[bytes] | None] = queue.Queue(MAX_BATCHES)
        self._throttle = LogThrottle()

    # --- the request path -----------------------------------------------------------------

    def record(self, record: DecisionRecord) -> None:
        """Keep ``record``, hand it to the live readers and (sampled, capped) to stdout."""
        if self._keep_recent:
            self._recent.append(record)
        for reader in self.readers:
            reader.offer(record)
        if not self._stdout:
            return
        if self._sample < 1.0 and random.random() >= self._sample:  # noqa: S311 (sampling)
            return
        second = int(record.time)
        if second != self._second:
            self._second, self._this_second = second, 0
        if self._this_second >= self._max_per_second:
            self._over_rate.inc()
            return
        self._this_second += 1
        if len(self._pending) >= MAX_BACKLOG:
            self._backlog.inc()
            return
        self._pending.append(record)

    def header_detail(self, headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        """The configured headers of a request, redacted and bounded, for a record's detail."""
        if not self.headers:
            return ()
        present = {h: headers[h] for h in self.headers if h in headers}
        return tuple((k, bounded(v)) for k, v in redact_headers(present).items())

    # --- readers --------------------------------------------------------------------------

    def attach(self, filter: DecisionFilter, recent: int = 0) -> Reader | None:
        """A new live reader, first given up to ``recent`` kept records that match; None when
        ``max_readers`` are attached already."""
        if len(self.readers) >= self._max_readers:
            return None
        reader = Reader(filter, self._reader_queue, self._metrics)
        if recent > 0 and self._keep_recent:
            matching = [r for r in self._recent if filter.matches(r)]
            reader.put_all(matching[-recent:])
        self.readers.append(reader)
        self._readers_gauge.inc()
        return reader

    def detach(self, reader: Reader) -> None:
        if reader in self.readers:
            self.readers.remove(reader)
            self._readers_gauge.dec()

    def recent(self, filter: DecisionFilter, count: int) -> list[DecisionRecord]:
        """Up to ``count`` of the most recent kept records that match ``filter``."""
        if count <= 0 or not self._keep_recent:
            return []
        return [r for r in self._recent if filter.matches(r)][-count:]

    # --- stdout ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start writing to stdout: a task on the running loop formats the pending records
        every :data:`FLUSH_INTERVAL_S`, a daemon thread writes them (a stdout nobody reads
        then stalls only that thread, and never the loop or the shutdown)."""
        if self._stdout and self._flusher is None:
            self._writer = threading.Thread(target=self._write_loop, name="decision-log",
                                            daemon=True)
            self._writer.start()
            self._flusher = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Hand over what is pending and give the writer up to ``timeout_s`` to write it."""
        if self._flusher is None:
            return
        self._flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._flusher
        self._flusher = None
        self.flush()
        self._lines.put(None)  # the writer's stop mark, after the last lines
        if self._writer is not None:  # joined from a thread: the wait itself is bounded
            await asyncio.to_thread(self._writer.join, timeout_s)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()

    def flush(self) -> None:
        """Format the pending records and hand them to the writer thread."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        lines = [
            json.dumps(r.as_dict(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            for r in pending
        ]
        try:
            self._lines.put_nowait(lines)
        except queue.Full:  # the writer is stuck (stdout not read): drop, count
            self._backlog.inc(len(lines))

    def _write_loop(self) -> None:
        out = self._out if self._out is not None else sys.stdout.buffer
        while True:
            lines = self._lines.get()
            if lines is None:
                return
            written = 0
            try:
                for line in lines:
                    # one write per line: with --workers every process writes to the same pipe,
                    # and a write up to PIPE_BUF (4 KiB) is never interleaved with another's
                    out.write(line)
                    out.flush()
                    written += 1
            except (OSError, ValueError) as exc:  # closed or full: count, never crash
                self._backlog.inc(len(lines) - written)
                held = self._throttle.allow("write")
                if held is not None:
                    log.warning("decision log: writing to stdout failed: %s", exc)
            self._written.inc(written)
