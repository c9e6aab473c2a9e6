"""The pipelining Redis client: deadlines (its own timeout, the RPC's earlier one) and the parser."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extsvc.config.ratelimit import RateLimitSection, StoreSettings, StoreType
from extsvc.errors import StoreError
from extsvc.observability.metrics import Metrics
from extsvc.ratelimit.config import load_domains
from extsvc.ratelimit.limiter import DescriptorRequest, Limiter
from extsvc.ratelimit.store.redis import RedisStore
from extsvc.ratelimit.store.resp import PipelinedRedis, RespError, _Incomplete, parse


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP server that accepts and reads but never answers (a Redis that hangs)."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in writers:
        writer.close()
    server.close()


async def _fails_after(call: asyncio.Future[object], started: float) -> float:
    with pytest.raises(StoreError, match="no reply"):
        await call
    return time.monotonic() - started


async def test_a_callers_deadline_earlier_than_the_timeout_wins(silent_port: int) -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{silent_port}", timeout_s=5.0)
    try:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        call = asyncio.ensure_future(client.call("PING", deadline=loop.time() + 0.05))
        assert 0.04 <= await _fails_after(call, started) < 1.0
    finally:
        await client.aclose()


async def test_an_early_deadline_behind_a_later_one_is_not_held_up(silent_port: int) -> None:
    """Deadlines out of send order (RPCs with different budgets) each fail on time."""
    client = PipelinedRedis(f"redis://127.0.0.1:{silent_port}", timeout_s=5.0)
    try:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        late = asyncio.ensure_future(client.call("PING", deadline=loop.time() + 0.6))
        await asyncio.sleep(0.01)
        early = asyncio.ensure_future(client.call("PING", deadline=loop.time() + 0.05))
        assert await _fails_after(early, started) < 0.4
        assert not late.done()
        assert 0.55 <= await _fails_after(late, started) < 2.0
    finally:
        await client.aclose()


async def test_without_a_deadline_the_clients_timeout_bounds_a_call(silent_port: int) -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{silent_port}", timeout_s=0.1)
    try:
        started = time.monotonic()
        call = asyncio.ensure_future(client.call("PING"))
        assert 0.09 <= await _fails_after(call, started) < 1.5
    finally:
        await client.aclose()


async def test_limiter_answers_per_failure_mode_by_the_rpc_deadline(silent_port: int) -> None:
    """The Redis store bounds its call itself (apply_by): the limiter's answer comes by the
    RPC's budget even though the store's timeout_ms is far longer."""
    root = Path(__file__).resolve().parents[2]
    section = RateLimitSection(
        config_dir=Path("docs/ratelimit"), failure_mode="deny",
        store=StoreSettings(type=StoreType.REDIS, url=f"redis://127.0.0.1:{silent_port}",
                            timeout_ms=5000),
    )
    domains, problems = load_domains(section, root)
    assert problems == []
    store = RedisStore(section.store)
    limiter = Limiter(section, domains, store, Metrics())
    assert limiter._apply_by is not None
    try:
        request = (DescriptorRequest((("generic_key", "api"), ("api_key", "k1"))),)
        started = time.monotonic()
        answer = await limiter.should_rate_limit("gateway", request, 0, 0.05)
        assert time.monotonic() - started < 1.0
        assert answer.over and answer.note == "store-error"
    finally:
        await store.aclose()


# -- the reply parser -----------------------------------------------------------------------------

def reply_bytes(value: object) -> bytes:
    """RESP2 encoding of a reply (the test's reference, independent of the parser)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, str):
        return b"+" + value.encode() + b"\r\n"
    assert isinstance(value, list)
    return b"*%d\r\n" % len(value) + b"".join(reply_bytes(item) for item in value)


replies = st.recursive(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=12), st.none(),
              st.text("abcOK", min_size=1, max_size=5)),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(replies)
def test_parse_reads_any_reply_and_waits_for_a_cut_one(value: object) -> None:
    data = reply_bytes(value)
    assert parse(data, 0) == (value, len(data))
    for cut in range(len(data)):  # every prefix is incomplete, never misread
        with pytest.raises(_Incomplete):
            parse(data[:cut], 0)


def test_the_scripts_reply_shape_and_mixed_arrays() -> None:
    script = b"*3\r\n*2\r\n:5\r\n:0\r\n*2\r\n:1\r\n:42\r\n*2\r\n:-1\r\n:0\r\n"
    assert parse(script, 0) == ([[5, 0], [1, 42], [-1, 0]], len(script))
    mixed = b"*2\r\n*2\r\n:1\r\n$2\r\nab\r\n*-1\r\n"
    assert parse(mixed, 0) == ([[1, b"ab"], None], len(mixed))
    error, end = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(error, RespError) and end == 30


# -- the pipeline window ----------------------------------------------------------------------------


class _Pong:
    """A server answering PING with +PONG, recording how the commands arrived (one item per read)."""

    def __init__(self) -> None:
        self.reads: list[int] = []  # PINGs per read

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            count = data.count(b"PING")
            self.reads.append(count)
            writer.write(b"+PONG\r\n" * count)
            await writer.drain()
        writer.close()


@pytest.fixture
async def pong() -> AsyncIterator[tuple[_Pong, int]]:
    recorder = _Pong()
    server = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
    yield recorder, server.sockets[0].getsockname()[1]
    server.close()


async def _pings_turns_apart(client: PipelinedRedis, count: int, recorder: _Pong) -> list[object]:
    assert await client.call("PING") == "PONG"  # connected (commands issued while connecting
    recorder.reads.clear()                       # leave together whatever the window)
    calls = []
    for _ in range(count):
        calls.append(asyncio.ensure_future(client.call("PING")))
        for _ in range(3):  # a few event-loop turns between requests, as under load
            await asyncio.sleep(0)
    return list(await asyncio.gather(*calls))


async def test_without_a_window_each_turns_commands_leave_at_once(pong: tuple[_Pong, int]) -> None:
    recorder, port = pong
    client = PipelinedRedis(f"redis://127.0.0.1:{port}", timeout_s=2.0)
    try:
        assert await _pings_turns_apart(client, 3, recorder) == ["PONG"] * 3
        assert recorder.reads == [1, 1, 1]
    finally:
        await client.aclose()


async def test_a_window_lets_requests_of_later_turns_share_a_write(pong: tuple[_Pong, int]) -> None:
    recorder, port = pong
    client = PipelinedRedis(f"redis://127.0.0.1:{port}", timeout_s=2.0, pipeline_window_s=0.05)
    try:
        assert await _pings_turns_apart(client, 3, recorder) == ["PONG"] * 3
        assert recorder.reads == [3]
    finally:
        await client.aclose()


async def test_a_full_pipeline_leaves_before_the_window_closes(pong: tuple[_Pong, int]) -> None:
    recorder, port = pong
    client = PipelinedRedis(
        f"redis://127.0.0.1:{port}", timeout_s=5.0, pipeline_window_s=1.0, pipeline_limit=2
    )
    try:
        assert await client.call("PING") == "PONG"  # connected (after one window)
        recorder.reads.clear()
        started = time.monotonic()
        calls = [asyncio.ensure_future(client.call("PING"))]
        await asyncio.sleep(0)
        calls.append(asyncio.ensure_future(client.call("PING")))
        assert await asyncio.gather(*calls) == ["PONG"] * 2
        assert time.monotonic() - started < 0.5  # the limit, not the 1 s window, sent them
        assert recorder.reads == [2]
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"type": "redis-cluster", "urls": ["redis://a:1"], "pipeline_window_us": 200},
         "pipeline_window_us applies to type redis only"),
        ({"type": "memory", "pipeline_window_us": 200}, "pipeline_window_us applies to type redis"),
        ({"type": "redis", "url": "redis://a:1", "pipeline_window_us": -1}, "greater than or equal"),
    ],
)
def test_pipeline_settings_are_checked(settings: dict[str, object], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        StoreSettings.model_validate(settings)
    assert StoreSettings.model_validate(
        {"type": "redis", "url": "redis://a:1", "pipeline_window_us": 300}
    ).pipeline_window_us == 300


async def test_a_quiet_connection_holds_nothing(pong: tuple[_Pong, int]) -> None:
    """The window applies only while writes follow each other closely (load); a lone request
    leaves at the next turn."""
    recorder, port = pong
    client = PipelinedRedis(f"redis://127.0.0.1:{port}", timeout_s=5.0, pipeline_window_s=0.3)
    try:
        started = time.monotonic()
        assert await client.call("PING") == "PONG"  # the first write ever: not held
        first = time.monotonic() - started
        await asyncio.sleep(0.4)  # longer than the window: quiet again
        lone = time.monotonic()
        assert await client.call("PING") == "PONG"
        assert first < 0.25 and time.monotonic() - lone < 0.25
        assert recorder.reads == [1, 1]
    finally:
        await client.aclose()


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_default_sub_millisecond_window_batches_on_both_event_loops(loop_name: str) -> None:
    """Event-loop timers tick in milliseconds and uvloop rounds shorter delays down to nothing:
    the 500 µs default must still hold commands on uvloop (extsvc's default loop)."""
    from extsvc.eventloop import loop_factory

    async def main() -> tuple[list[object], list[int]]:
        recorder = _Pong()
        server = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = PipelinedRedis(f"redis://127.0.0.1:{port}", timeout_s=2.0, pipeline_window_s=0.0005)
        try:
            return await _pings_turns_apart(client, 4, recorder), recorder.reads
        finally:
            await client.aclose()
            server.close()

    name, factory = loop_factory(loop_name)
    assert name == loop_name
    with asyncio.Runner(loop_factory=factory) as runner:
        pongs, reads = runner.run(main())
    assert pongs == ["PONG"] * 4
    # The first may leave alone (the connection was quiet); the others follow within the window.
    assert len(reads) <= 2, reads
