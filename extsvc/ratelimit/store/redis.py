"""Redis and Redis Cluster stores: one Lua script call (EVALSHA) per request.

The script applies every descriptor's operation of a request in one round trip, atomically (the
algorithms are in :mod:`extsvc.ratelimit.algorithms`; the script transcribes their ``*_step``
functions). On a cluster a script may only touch keys of one slot, so operations are grouped by
slot and the groups run concurrently; with ``hash_tag: true`` every key of a domain carries the
tag ``{<domain>}`` and a request is always one group, one call.

Fixed-window keys and their expiry are envoyproxy/ratelimit's (``INCRBY`` then the window as TTL),
so both servers can share a Redis during a migration (ratelimit also adds a random expiry jitter).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError

from extsvc.config.ratelimit import StoreSettings, StoreType
from extsvc.errors import StoreError
from extsvc.ratelimit.algorithms import Op
from extsvc.ratelimit.store.resp import PipelinedRedis, RespError

log = logging.getLogger(__name__)

# KEYS: the keys of every op in order (f: 1, s: 2 (current, previous), g: 1).
# ARGV: per op 5 values: kind, hits, a, b, c (see algorithms.*_op). Returns {x, y} per op.
LUA = """
local out = {}
local k = 1
for i = 1, #ARGV, 5 do
  local kind = ARGV[i]
  local hits = tonumber(ARGV[i + 1])
  local a = tonumber(ARGV[i + 2])
  local b = tonumber(ARGV[i + 3])
  local c = tonumber(ARGV[i + 4])
  if kind == 'f' then
    local n = redis.call('INCRBY', KEYS[k], hits)
    if n == hits then redis.call('PEXPIRE', KEYS[k], a) end
    out[#out + 1] = {n, 0}
    k = k + 1
  elseif kind == 's' then
    local cur = tonumber(redis.call('GET', KEYS[k]) or '0')
    local prev = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    local x = prev * b + 999999
    local est = (x - x % 1000000) / 1000000 + cur
    if est + hits > a then
      out[#out + 1] = {0, est}
    else
      if hits > 0 then
        redis.call('INCRBY', KEYS[k], hits)
        redis.call('PEXPIRE', KEYS[k], c)
      end
      out[#out + 1] = {1, est + hits}
    end
    k = k + 2
  else
    local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
    if tat < c then tat = c end
    local new = tat + hits * a
    if new - c > b then
      out[#out + 1] = {0, tat}
    else
      if hits > 0 then
        local ttl = new - c
        redis.call('SET', KEYS[k], string.format('%d', new), 'PX', (ttl - ttl % 1000) / 1000 + 1)
      end
      out[#out + 1] = {1, new}
    end
    k = k + 1
  end
end
return out
"""


LUA_SHA = hashlib.sha1(LUA.encode()).hexdigest()  # noqa: S324 (Redis names scripts by SHA-1)


_EVALSHA = b"$7\r\nEVALSHA\r\n$40\r\n" + LUA_SHA.encode() + b"\r\n"
#: Encoded RESP bulk strings of keys and of fixed-window argument groups, which repeat from
#: request to request (a window's keys, constant arguments); bounded, emptied when full.
_encoded: dict[Any, bytes] = {}
_ENCODED_MAX = 10_000


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _encode_args(op: Op) -> bytes:
    return b"".join(_bulk(str(v).encode()) for v in (op.kind, op.hits, op.a, op.b, op.c))


def _evalsha(ops: Sequence[Op]) -> bytes:
    """``EVALSHA LUA_SHA numkeys *keys *args`` as RESP, what ``encode()`` gives for
    ``_flatten(ops)``, with the repeating parts encoded once."""
    cache = _encoded
    if len(cache) >= _ENCODED_MAX:
        cache.clear()
    keys: list[bytes] = []
    args: list[bytes] = []
    for op in ops:
        for key in op.keys:
            data = cache.get(key)
            if data is None:
                data = cache[key] = _bulk(key.encode())
            keys.append(data)
        if op.kind == "f":
            ident = (op.hits, op.a, op.b, op.c)
            data = cache.get(ident)
            if data is None:
                data = cache[ident] = _encode_args(op)
            args.append(data)
        else:  # sliding and GCRA arguments change with the clock
            args.append(_encode_args(op))
    count = str(len(keys)).encode()
    return b"".join((
        b"*%d\r\n" % (3 + len(keys) + 5 * len(ops)), _EVALSHA,
        b"$%d\r\n%s\r\n" % (len(count), count), *keys, *args,
    ))


def _flatten(ops: Sequence[Op]) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = []
    for op in ops:
        keys.extend(op.keys)
        args.extend((op.kind, op.hits, op.a, op.b, op.c))
    return keys, args


def _common(settings: StoreSettings) -> dict[str, Any]:
    timeout = settings.timeout_ms / 1000
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # Never retry inside a request: the RPC deadline is short and the failure mode answers.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if settings.password_file is not None:
        options["password"] = Path(settings.password_file).read_text(encoding="utf-8").strip()
    return options


class RedisStore:
    """A single Redis (or a proxy in front of several): one EVALSHA per request.

    Uses the pipelining client of :mod:`extsvc.ratelimit.store.resp` (one connection, commands
    of concurrent requests share writes); the script is loaded on first use and again whenever
    Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH).
    """

    kind = "redis"

    def __init__(self, settings: StoreSettings) -> None:
        assert settings.url is not None
        password = (
            Path(settings.password_file).read_text(encoding="utf-8").strip()
            if settings.password_file is not None else None
        )
        self._client = PipelinedRedis(
            settings.url, timeout_s=settings.timeout_ms / 1000, password=password,
            pipeline_window_s=settings.pipeline_window_us / 1_000_000,
            pipeline_limit=settings.pipeline_limit,
        )

    async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        return await self.apply_by(ops, None)

    async def apply_by(self, ops: Sequence[Op], deadline: float | None) -> list[tuple[int, int]]:
        """:meth:`apply`, failing with StoreError at ``deadline`` (event-loop time) at the latest:
        the client's watchdog bounds the call, so the limiter arms no timer of its own."""
        try:
            result = await self._client.call_encoded(_evalsha(ops), deadline)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise StoreError(f"redis: {exc}") from exc
            keys, args = _flatten(ops)
            result = await self._client.call("EVAL", LUA, len(keys), *keys, *args, deadline=deadline)
        return [(x, y) for x, y in result]  # the script's integers arrive as ints

    async def aclose(self) -> None:
        await self._client.aclose()


class RedisClusterStore:
    """Redis Cluster: one EVALSHA per hash slot touched (one per request with ``hash_tag``)."""

    kind = "redis-cluster"

    def __init__(self, settings: StoreSettings) -> None:
        seeds = settings.urls or ([settings.url] if settings.url else [])
        nodes = []
        for seed in seeds:
            address = seed.split("://", 1)[-1].rsplit("@", 1)[-1].split("/", 1)[0]
            host, _, port = address.rpartition(":")
            nodes.append(ClusterNode(host, int(port or 6379)))
        self._client = RedisCluster(
            startup_nodes=nodes,
            max_connections=settings.pool,
            require_full_coverage=False,
            **_common(settings),
        )
        self._script = self._client.register_script(LUA)

    async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        groups: dict[int, list[int]] = {}
        for index, op in enumerate(ops):
            groups.setdefault(key_slot(op.keys[0].encode()), []).append(index)
        try:
            if len(groups) == 1:
                keys, args = _flatten(ops)
                result = await self._script(keys=keys, args=args)
                return [(int(x), int(y)) for x, y in result]
            parts = list(groups.values())
            answers = await asyncio.gather(
                *(self._script(keys=k, args=a) for k, a in (_flatten([ops[i] for i in p]) for p in parts))
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis-cluster: {exc}") from exc
        out: list[tuple[int, int]] = [(0, 0)] * len(ops)
        for part, answer in zip(parts, answers, strict=True):
            for index, (x, y) in zip(part, answer, strict=True):
                out[index] = (int(x), int(y))
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


def build_redis_store(settings: StoreSettings) -> RedisStore | RedisClusterStore:
    if settings.type is StoreType.REDIS_CLUSTER:
        return RedisClusterStore(settings)
    return RedisStore(settings)
