"""``extsvc tail`` and ``extsvc top``: clients of the live decision stream (admin API).

``tail`` prints decisions as a server makes them (like ``kubectl logs -f`` for decisions);
``top`` keeps per-policy rates, denial ratios and latency percentiles over a sliding window and
redraws them. Both connect to the admin port (HTTP/2 there goes to the admin gRPC API) and, by
default, ask for the decisions of every worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from extsvc.admin.v1 import admin_pb2, admin_pb2_grpc
from extsvc.observability.decisions import DecisionRecord, format_time

#: outcomes counted as "denied" in ``top``'s ratio
DENIED = frozenset({"deny", "over_limit", "immediate", "error", "unknown-policy", "protocol-error"})
_COLOURS = {
    "allow": "32", "ok": "32", "deny": "31", "over_limit": "33", "immediate": "35", "error": "1;31",
}


class TailError(Exception):
    """The stream could not be read (the message says why, for the command line)."""


@dataclass(frozen=True)
class Target:
    """Where and how to reach the admin API."""

    address: str = "127.0.0.1:9002"
    token: str | None = None
    all_workers: bool = True

    @classmethod
    def of(cls, address: str | None, token_file: Path | None, all_workers: bool = True) -> Target:
        """From the command line, else ``EXTSVC_ADMIN_ADDRESS`` / ``EXTSVC_ADMIN_TOKEN_FILE``."""
        address = address or os.environ.get("EXTSVC_ADMIN_ADDRESS") or "127.0.0.1:9002"
        host, _, port = address.rpartition(":")
        if host in ("0.0.0.0", "", "[::]", "::"):  # noqa: S104 (a listen address: reach it locally)
            address = f"127.0.0.1:{port}"
        token_path = token_file or (
            Path(os.environ["EXTSVC_ADMIN_TOKEN_FILE"])
            if os.environ.get("EXTSVC_ADMIN_TOKEN_FILE") else None
        )
        token = token_path.read_text().strip() if token_path is not None else None
        return cls(address, token or None, all_workers)


@dataclass
class Query:
    services: Sequence[str] = ()
    policies: Sequence[str] = ()
    outcomes: Sequence[str] = ()
    authority: str = ""
    path_prefix: str = ""
    recent: int = 0
    follow: bool = True

    def request(self, all_workers: bool) -> Any:
        return admin_pb2.WatchDecisionsRequest(
            filter=admin_pb2.DecisionFilter(
                services=list(self.services), policies=list(self.policies),
                outcomes=list(self.outcomes), authority=self.authority,
                path_prefix=self.path_prefix,
            ),
            recent=self.recent, all_workers=all_workers, no_follow=not self.follow,
        )


async def watch(target: Target, query: Query) -> AsyncIterator[Any]:
    """The stream's messages (``WatchDecisionsResponse``) until it ends.

    :raises TailError: unreachable, refused, or ended by an error.
    """
    metadata = (("authorization", f"Bearer {target.token}"),) if target.token else ()
    async with grpc.aio.insecure_channel(target.address) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), 5.0)
        except TimeoutError:
            raise TailError(f"cannot reach the admin API at {target.address}") from None
        call = admin_pb2_grpc.AdminStub(channel).WatchDecisions(
            query.request(target.all_workers), metadata=metadata
        )
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise TailError(f"{target.address}: {exc.code().name}: {exc.details()}") from None


def decision_dict(decision: Any) -> dict[str, Any]:
    """A ``Decision`` message as the decision log's JSON object (the server's own format)."""
    return DecisionRecord(
        decision.time_unix_ms / 1000, decision.service, decision.policy, decision.outcome,
        decision.status, decision.step, decision.reason, decision.latency_ms / 1000,
        decision.request_id, decision.trace_id, decision.authority, decision.path,
        decision.method, decision.source, tuple(sorted(decision.detail.items())), decision.worker,
    ).as_dict()


def format_line(decision: Any, colour: bool) -> str:
    """One decision as one line of text."""
    outcome = decision.outcome
    shown = outcome.upper()
    if colour and outcome in _COLOURS:
        shown = f"\033[{_COLOURS[outcome]}m{shown}\033[0m"
    parts = [format_time(decision.time_unix_ms / 1000), decision.service, decision.policy or "-", shown]
    if decision.status:
        parts.append(str(decision.status))
    if decision.step:
        parts.append(f"by {decision.step}")
    if decision.reason:
        parts.append(f"({decision.reason})")
    route = f"{decision.authority}{decision.path}"
    if decision.method or route:
        parts.append(f"{decision.method} {route}".strip())
    parts.append(f"{decision.latency_ms:.2f}ms")
    if decision.request_id:
        parts.append(f"req={decision.request_id}")
    if decision.trace_id:
        parts.append(f"trace={decision.trace_id}")
    for key, value in sorted(decision.detail.items()):
        parts.append(f"{key}={value}")
    if decision.worker:
        parts.append(f"worker={decision.worker}")
    return " ".join(parts)


async def tail(target: Target, query: Query, out: TextIO, *, as_json: bool, colour: bool) -> None:
    """Print decisions to ``out`` until the stream ends (or the caller is cancelled)."""
    async for message in watch(target, query):
        lines = []
        if message.dropped:
            lines.append(
                json.dumps({"kind": "dropped", "count": message.dropped}) if as_json
                else f"... {message.dropped} decisions dropped (this reader did not keep up)"
            )
        for decision in message.decisions:
            lines.append(json.dumps(decision_dict(decision), separators=(",", ":")) if as_json
                         else format_line(decision, colour))
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()


@dataclass
class _Seen:
    times: deque[float] = field(default_factory=deque)
    latencies: deque[float] = field(default_factory=deque)
    denied: deque[bool] = field(default_factory=deque)


class Summary:
    """Per (service, policy): decisions in the last ``window_s`` seconds (bounded per key)."""

    MAX_KEYS = 500
    MAX_PER_KEY = 100_000

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: dict[tuple[str, str], _Seen] = {}
        self.dropped = 0

    def add(self, decision: Any, now: float) -> None:
        key = (decision.service, decision.policy)
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= self.MAX_KEYS:
                return
            seen = self._seen[key] = _Seen()
        if len(seen.times) >= self.MAX_PER_KEY:
            self._expire(seen, now)
            if len(seen.times) >= self.MAX_PER_KEY:
                return
        seen.times.append(now)
        seen.latencies.append(decision.latency_ms)
        seen.denied.append(decision.outcome in DENIED)

    def _expire(self, seen: _Seen, now: float) -> None:
        while seen.times and seen.times[0] < now - self.window_s:
            seen.times.popleft()
            seen.latencies.popleft()
            seen.denied.popleft()

    def rows(self, now: float) -> list[tuple[str, str, float, float, float, float, int]]:
        """(service, policy, per second, denied share, p50 ms, p99 ms, count), busiest first."""
        rows = []
        for (service, policy), seen in self._seen.items():
            self._expire(seen, now)
            count = len(seen.times)
            if not count:
                continue
            ordered = sorted(seen.latencies)
            rows.append((
                service, policy, count / self.window_s, sum(seen.denied) / count,
                _quantile(ordered, 0.5), _quantile(ordered, 0.99), count,
            ))
        rows.sort(key=lambda r: (-r[2], r[0], r[1]))
        return rows

    def render(self, now: float) -> str:
        lines = [f"{'SERVICE':<10} {'POLICY':<24} {'RATE/S':>8} {'DENIED':>7} {'P50 MS':>8} "
                 f"{'P99 MS':>8} {'N':>7}   (last {self.window_s:g}s)"]
        for service, policy, rate, denied, p50, p99, count in self.rows(now):
            lines.append(f"{service:<10} {policy or '-':<24} {rate:>8.1f} {denied:>6.1%} "
                         f"{p50:>8.2f} {p99:>8.2f} {count:>7}")
        if self.dropped:
            lines.append(f"({self.dropped} decisions dropped: this reader did not keep up)")
        return "\n".join(lines)


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def top(
    target: Target, query: Query, out: TextIO, *, window_s: float, interval_s: float,
    iterations: int | None, clear: bool,
) -> None:
    """Redraw the :class:`Summary` every ``interval_s`` (``iterations`` times, or forever)."""
    summary = Summary(window_s)
    failure: list[BaseException] = []

    async def read() -> None:
        try:
            async for message in watch(target, query):
                now = time.monotonic()
                for decision in message.decisions:
                    summary.add(decision, now)
                summary.dropped += message.dropped
        except TailError as exc:
            failure.append(exc)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        shown = 0
        while iterations is None or shown < iterations:
            await asyncio.sleep(interval_s)
            if failure:
                raise failure[0]
            text = summary.render(time.monotonic())
            out.write(("\033[H\033[2J" if clear else "") + text + "\n" + ("" if clear else "\n"))
            out.flush()
            shown += 1
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def use_colour(choice: str, out: TextIO = sys.stdout) -> bool:
    """``auto``: on a terminal, unless ``NO_COLOR`` is set."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    return out.isatty() and not os.environ.get("NO_COLOR")
