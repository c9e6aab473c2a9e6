"""The pure core of the rate-limit service: descriptors in, one store call, statuses out.

Matching follows envoyproxy/ratelimit (docs/internals/envoy-behaviour.md §4.4): per level the exact
``key_value``, else the first matching wildcard, else the bare ``key``; a limit applies only on the
node matched by the request's last entry; a node without ``rate_limit`` there means "no limit";
``replaces`` drops the named limits; ``unlimited`` answers OK with 2^32-1 remaining.
"""

from __future__ import annotations

import logging
import time
from asyncio import get_running_loop
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, NamedTuple

from extsvc.config.ratelimit import RateLimitSection
from extsvc.deadline import within
from extsvc.errors import StoreError
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import OTHER_LABEL
from extsvc.ratelimit import algorithms as alg
from extsvc.ratelimit.algorithms import Algorithm, Op, Outcome
from extsvc.ratelimit.config import MAX_UINT32, UNIT_SECONDS, Domain, DomainSet, Limit, Node
from extsvc.ratelimit.store import DeadlineStore, ImmediateStore, LimitStore

log = logging.getLogger(__name__)
_throttle = LogThrottle()

#: Local over-limit cache bound: past it, expired entries are dropped (then everything).
LOCAL_CACHE_MAX = 100_000
#: Bound of the per-domain cache of matched descriptors (see :class:`_Plan`); emptied when full.
PLAN_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class DescriptorRequest:
    """One request descriptor: entries, Envoy's optional limit override and hits_addend."""

    entries: tuple[tuple[str, str], ...]
    override: tuple[int, int] | None = None  # (requests_per_unit, rls Unit number)
    hits: int | None = None


class Status(NamedTuple):
    """One descriptor's answer (a named tuple: several are built per request)."""

    over: bool
    limit: Limit | None = None  # set: Envoy gets current_limit (and the x-ratelimit headers)
    remaining: int = 0
    reset_s: int = 0


OK_NO_LIMIT = Status(False)
UNLIMITED = Status(False, None, MAX_UINT32, 0)


@dataclass(frozen=True, slots=True)
class Answer:
    over: bool
    statuses: tuple[Status, ...]
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    #: why, when it is not the counters: "unknown-domain", "store-error" (for logs and tests)
    note: str = ""


def _capacity(limit: Limit) -> int:
    """The most hits one request can have admitted: the token bucket's burst, else the limit."""
    return limit.burst if limit.algorithm is Algorithm.TOKEN_BUCKET else limit.requests_per_unit


def match(domain: Domain, entries: Sequence[tuple[str, str]]) -> tuple[Limit | None, list[Node]]:
    """The limit for ``entries`` and the nodes matched on the way."""
    node = domain.root
    path: list[Node] = []
    limit: Limit | None = None
    last = len(entries) - 1
    for index, (key, value) in enumerate(entries):
        nxt = node.exact.get((key, value))
        if nxt is None:
            for wkey, pattern, candidate in node.wildcards:
                if wkey == key and pattern.fullmatch(value):
                    nxt = candidate
                    break
        if nxt is None:
            nxt = node.bare.get(key)
        if nxt is None:
            break
        path.append(nxt)
        if index == last:
            limit = nxt.limit
        node = nxt
    return limit, path


class _Stats:
    __slots__ = ("hits", "local_cache", "near", "over", "shadow", "within")

    def __init__(self, metrics: Any, domain: str, label: str) -> None:
        hot = metrics.hot
        self.hits = hot(metrics.rl_hits.labels(domain, label))
        self.over = hot(metrics.rl_over_limit.labels(domain, label))
        self.near = hot(metrics.rl_near_limit.labels(domain, label))
        self.within = hot(metrics.rl_within_limit.labels(domain, label))
        self.shadow = hot(metrics.rl_shadow_mode.labels(domain, label))
        self.local_cache = hot(metrics.rl_over_limit_local_cache.labels(domain, label))


class _Plan:
    """What a descriptor's entries resolve to in one domain, computed once per distinct entries.

    Matching, the metrics label (and its bound counters) and the key base depend only on the
    domain tree and the entries, so they are cached per limiter (a reload builds a new limiter,
    hence new plans). For fixed windows the window's key and the store operation for the usual
    ``hits`` are kept too, and rebuilt when the window moves on.
    """

    __slots__ = ("base", "limit", "near", "op", "path", "start", "stats")

    def __init__(
        self, limit: Limit | None, path: list[Node], stats: _Stats | None, base: str, near: int
    ) -> None:
        self.limit = limit
        self.path = path
        self.stats = stats
        self.base = base
        self.near = near  # the highest count that is neither near nor over the limit
        self.start = -1  # the fixed window ``op`` was built for
        self.op: Op | None = None


class _Resolved:
    """A request's descriptors resolved in one domain: each one's limit (after ``replaces``; None:
    no limit) and plan (None for Envoy's per-descriptor override). Remembered per descriptor
    tuple (see :meth:`Limiter.should_rate_limit`), with the tuple itself so that its id cannot
    be reused meanwhile."""

    __slots__ = ("descriptors", "domain", "limits", "plans")

    def __init__(
        self,
        descriptors: Sequence[DescriptorRequest],
        domain: Domain,
        limits: list[Limit | None],
        plans: list[_Plan | None],
    ) -> None:
        self.descriptors = descriptors
        self.domain = domain
        self.limits = limits
        self.plans = plans


class Limiter:
    """One compiled rate-limit config: the section's settings, the domains and the store.

    :param metrics: the :class:`extsvc.observability.metrics.Metrics` (``rl_*`` metrics).
    :param clock: unix time in seconds (a fake one in tests).
    """

    def __init__(
        self,
        section: RateLimitSection,
        domains: DomainSet,
        store: LimitStore,
        metrics: Any,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.section = section
        self.domains = domains
        self.store = store
        self._metrics = metrics
        self._clock = clock
        # Optional capabilities (extsvc.ratelimit.store), checked once here, never per request.
        #: a store that answers without waiting (memory) is called without a coroutine, and is
        #: the only kind not bounded by the RPC's deadline
        self._apply_now: Callable[[list[Op]], list[tuple[int, int]]] | None = (
            store.apply_now if isinstance(store, ImmediateStore) else None
        )
        self._remote = self._apply_now is None
        #: a remote store that bounds its call itself (no timer per request)
        self._apply_by: Callable[[list[Op], float], Awaitable[list[tuple[int, int]]]] | None = (
            store.apply_by if isinstance(store, DeadlineStore) else None
        )
        #: the time of each call to a store that waits (an immediate one's is the RPC's own)
        self._store_duration = metrics.hot(metrics.rl_store_duration.labels(store.kind))
        self._prefix = section.store.key_prefix
        self._max_values = section.max_metric_values
        self._hash_tag = section.store.hash_tag
        self._near_ratio = section.near_limit_ratio
        self._headers_enabled = section.response_headers.enabled
        self._local: dict[str, float] | None = {} if section.local_cache else None
        self._stats: dict[tuple[str, str], _Stats] = {}
        self._plans: dict[str, dict[tuple[tuple[str, str], ...], _Plan]] = {}
        #: id(descriptor tuple) -> what it resolved to: see should_rate_limit
        self._resolved: dict[int, _Resolved] = {}
        self._store_errors = {
            mode: metrics.hot(metrics.rl_store_errors.labels(store.kind, mode))
            for mode in ("allow", "deny")
        }
        self._unknown = metrics.rl_unknown_domain
        over = section.over_limit
        self._over_headers = tuple(over.headers.items())
        self._over_body = over.body

    @property
    def remote(self) -> bool:
        """Whether store calls wait on a network (and so are bounded by the RPC's deadline)."""
        return self._remote

    def with_domains(self, domains: DomainSet) -> Limiter:
        """The same settings and store (and counters) with other domains."""
        twin = Limiter(self.section, domains, self.store, self._metrics, clock=self._clock)
        twin._local = self._local
        twin._stats = self._stats
        return twin

    def _stats_for(self, domain: str, labelled: tuple[str, bool]) -> _Stats:
        """The counters of ``labelled`` = (label, taken from the request): request-derived
        labels past the domain's cap (``max_metric_values``) share the ``(other)`` series."""
        label, dynamic = labelled
        stats = self._stats.get((domain, label))
        if stats is None:
            if dynamic:
                label = self._metrics.rl_label(domain, label, self._max_values)
                if label is OTHER_LABEL:
                    held = _throttle.allow(f"labels:{domain[:128]}")
                    if held is not None:
                        log.warning(
                            "rate-limit domain %r: more than %d distinct metric label values from "
                            "requests (detailed_metric, value_to_metric, limit overrides); the next "
                            "ones are counted as %s (%d more since the last report)",
                            domain[:128], self._max_values, OTHER_LABEL, held,
                        )
                stats = self._stats.get((domain, label))
            if stats is None:
                stats = self._stats[(domain, label)] = _Stats(self._metrics, domain, label)
        return stats

    async def should_rate_limit(
        self,
        domain_name: str,
        descriptors: Sequence[DescriptorRequest],
        request_hits: int = 0,
        timeout_s: float | None = None,
    ) -> Answer:
        domain = self.domains.domains.get(domain_name)
        if domain is None:
            return self._unknown_domain(domain_name, len(descriptors))
        default_hits = max(1, request_hits)
        now = self._clock()
        now_s = int(now)

        # 1. Match every descriptor (cached per distinct entries: see _Plan), or take the
        #    result for this very descriptor tuple (the service passes the same tuple for the
        #    same request bytes, see convert.parse_request).
        resolved = self._resolved.get(id(descriptors))
        if resolved is None or resolved.descriptors is not descriptors or resolved.domain is not domain:
            resolved = self._resolve(domain, descriptors)
        limits = resolved.limits
        plans = resolved.plans

        # 2. One store operation per limited descriptor; the others are answered here.
        statuses = [OK_NO_LIMIT] * len(descriptors)
        over = False
        ops: list[Op] = []
        #: per op: (descriptor index, hits, counters, fixed window's near-limit threshold or -1)
        todo: list[tuple[int, int, _Stats, int]] = []
        local = self._local
        for i, limit in enumerate(limits):
            if limit is None:
                continue
            if limit.unlimited:
                statuses[i] = UNLIMITED
                continue
            d = descriptors[i]
            hits = default_hits if d.hits is None else d.hits
            if hits > limit.requests_per_unit:  # over the limit or a large burst: see clamp_hits
                hits = alg.clamp_hits(hits, _capacity(limit))
            plan = plans[i]
            op: Op | None
            if plan is None:  # Envoy's per-descriptor limit override: nothing cached
                st = self._stats_for(domain_name, self._label(limit, [], d.entries))
                op = self._op(limit, self._base_key(domain_name, d.entries, []), hits, now, now_s)
                near = int(limit.requests_per_unit * self._near_ratio)
            else:
                bound = plan.stats
                if bound is None:  # bound on first use (a replaced limit never gets a series)
                    bound = plan.stats = self._stats_for(
                        domain_name, self._label(limit, plan.path, d.entries)
                    )
                st = bound
                near = plan.near
                if limit.algorithm is Algorithm.FIXED_WINDOW:  # the usual case: op cached
                    window = limit.window_s
                    start = now_s - now_s % window  # alg.fixed_window_start
                    op = plan.op
                    if op is None or plan.start != start or op.hits != hits:
                        op = plan.op = alg.fixed_op(plan.base, hits, window, now_s)
                        plan.start = start
                else:
                    op = self._op(limit, plan.base, hits, now, now_s)
            st.hits.inc(hits)
            if limit.algorithm is not Algorithm.FIXED_WINDOW:
                near = -1  # no short cut for its answer (see 4.)
                if op is None:  # a zero limit under sliding/token bucket: nothing can pass
                    statuses[i] = Status(True, limit, 0, limit.window_s)
                    st.over.inc(hits)
                    over = True
                    continue
            elif local is not None:  # the over-limit cache: fixed windows only
                assert op is not None
                until = local.get(op.keys[0])
                if until is not None and until > now:
                    statuses[i] = Status(True, limit, 0, limit.window_s - now_s % limit.window_s)
                    st.over.inc(hits)
                    st.local_cache.inc(hits)
                    over = True
                    continue
            assert op is not None
            ops.append(op)
            todo.append((i, hits, st, near))

        # 3. One store call for the whole request.
        if ops:
            try:
                if self._apply_now is not None:
                    results = self._apply_now(ops)
                else:
                    results = await self._apply(ops, timeout_s)
            except (StoreError, TimeoutError, OSError) as exc:
                return self._store_failed(exc, descriptors, limits, timeout_s)

            # 4. Each answer to a status, counted.
            for op, (i, hits, st, near), result in zip(ops, todo, results, strict=True):
                limit = limits[i]
                assert limit is not None
                used = result[0]
                if hits and used <= near:
                    # The common case, short-cut: a fixed window well within the limit (at or
                    # below the near-limit threshold, itself <= the limit). What fixed_status,
                    # tally and _account give for it: every hit within, none near or over.
                    st.within.inc(hits)
                    window = limit.window_s
                    statuses[i] = Status(
                        False, limit, limit.requests_per_unit - used, window - now_s % window
                    )
                    continue
                status = statuses[i] = self._account(
                    limit, op, self._outcome(limit, op, result, hits, now_s), hits, st, now
                )
                over = over or status.over

        if over or self._headers_enabled:
            return self._answer(tuple(statuses), limits)
        return Answer(False, tuple(statuses))  # what _answer gives when no status is over

    # --- pieces ---------------------------------------------------------------------------

    async def _apply(self, ops: list[Op], timeout_s: float | None) -> list[tuple[int, int]]:
        """The call of a store that waits, bounded by ``timeout_s``: by the store itself when it
        is a :class:`DeadlineStore` (no timer per request), else by :func:`within`; its time is
        observed in ``extsvc_ratelimit_store_duration_seconds``."""
        began = perf_counter()
        try:
            if timeout_s is None:
                return await self.store.apply(ops)
            if self._apply_by is not None:
                return await self._apply_by(ops, get_running_loop().time() + timeout_s)
            return await within(self.store.apply(ops), timeout_s)
        finally:
            self._store_duration.observe(perf_counter() - began)

    def _resolve(self, domain: Domain, descriptors: Sequence[DescriptorRequest]) -> _Resolved:
        """Each descriptor's limit (after ``replaces``) and plan (None for Envoy's override);
        remembered for a tuple of descriptors (immutable: safe to remember by identity)."""
        plans = self._plans.get(domain.name)
        if plans is None:
            plans = self._plans[domain.name] = {}
        count = len(descriptors)
        limits: list[Limit | None] = [None] * count
        chosen: list[_Plan | None] = [None] * count
        replaced: frozenset[str] | None = None
        for i, d in enumerate(descriptors):
            if d.override is not None:
                limit = self._override(d)
            else:
                plan = plans.get(d.entries)
                if plan is None:
                    plan = self._plan(plans, domain, d.entries)
                chosen[i] = plan
                limit = plan.limit
            if limit is not None and limit.replaces:
                replaced = limit.replaces if replaced is None else replaced | limit.replaces
            limits[i] = limit
        if replaced:
            limits = [None if (lm is not None and lm.name in replaced) else lm for lm in limits]
        resolved = _Resolved(descriptors, domain, limits, chosen)
        if type(descriptors) is tuple:
            if len(self._resolved) >= PLAN_CACHE_MAX:
                self._resolved.clear()
            self._resolved[id(descriptors)] = resolved
        return resolved

    def _plan(
        self,
        plans: dict[tuple[tuple[str, str], ...], _Plan],
        domain: Domain,
        entries: tuple[tuple[str, str], ...],
    ) -> _Plan:
        limit, path = match(domain, entries)
        near = int(limit.requests_per_unit * self._near_ratio) if limit is not None else 0
        plan = _Plan(limit, path, None, self._base_key(domain.name, entries, path), near)
        if len(plans) >= PLAN_CACHE_MAX:
            plans.clear()
        plans[entries] = plan
        return plan

    def _override(self, d: DescriptorRequest) -> Limit | None:
        assert d.override is not None
        rpu, unit = d.override
        window = UNIT_SECONDS.get(unit)
        if window is None:
            return None  # UNKNOWN unit: nothing to count in
        # The keys only: values are the request's (Envoy's route config names the keys).
        label = "override:" + ".".join(k for k, _ in d.entries)
        return Limit(requests_per_unit=rpu, unit=unit, window_s=window, name="", label=label)

    @staticmethod
    def _label(
        limit: Limit, path: list[Node], entries: Sequence[tuple[str, str]]
    ) -> tuple[str, bool]:
        """The ``limit`` label, and whether it holds request values (then capped per domain)."""
        if limit.detailed_metric:
            return ".".join(f"{k}_{v}" for k, v in entries), True
        if not path:  # Envoy's limit override: its keys are the request's
            return limit.label, True
        if not limit.name and any(node.value_to_metric for node in path):
            parts = []
            for node, (k, v) in zip(path, entries, strict=False):
                if node.value_to_metric:
                    parts.append(f"{k}_{v}")  # the request's value: opted in
                elif node.value:
                    parts.append(f"{k}_{node.value}")  # the configured value (or wildcard)
                else:
                    parts.append(k)
            return ".".join(parts), True
        return limit.label, False

    def _base_key(self, domain: str, entries: Sequence[tuple[str, str]], path: list[Node]) -> str:
        # docs/internals/envoy-behaviour.md §4.4: prefix + domain + "_" + Σ(key_value_) + windowStart
        parts = [self._prefix, f"{{{domain}}}" if self._hash_tag else domain, "_"]
        for index, (key, value) in enumerate(entries):
            shared = path[index].value if index < len(path) and path[index].share_threshold else None
            # share_threshold: every value matching the wildcard shares one counter
            parts.append(f"{key}_{shared or value}_")
        return "".join(parts)

    @staticmethod
    def _op(limit: Limit, base: str, hits: int, now: float, now_s: int) -> Op | None:
        if limit.algorithm is Algorithm.FIXED_WINDOW:
            return alg.fixed_op(base, hits, limit.window_s, now_s)
        if limit.requests_per_unit == 0:
            return None
        if limit.algorithm is Algorithm.SLIDING_WINDOW:
            return alg.sliding_op(base, hits, limit.requests_per_unit, limit.window_s, int(now * 1000))
        return alg.gcra_op(
            base, hits, limit.requests_per_unit, limit.burst or limit.requests_per_unit,
            limit.window_s, int(now * 1_000_000),
        )

    @staticmethod
    def _outcome(limit: Limit, op: Op, result: tuple[int, int], hits: int, now_s: int) -> Outcome:
        x, y = result
        if limit.algorithm is Algorithm.FIXED_WINDOW:
            return alg.fixed_status(x, hits, limit.requests_per_unit, limit.window_s, now_s)
        if limit.algorithm is Algorithm.SLIDING_WINDOW:
            return alg.sliding_status(x, y, hits, limit.requests_per_unit, limit.window_s, now_s)
        # GcraOp: a, b, c = interval_us, tolerance_us, now_us
        return alg.gcra_status(x, y, hits, op.a, op.b, op.c)

    def _account(
        self, limit: Limit, op: Op, outcome: Outcome, hits: int, st: _Stats | None, now: float
    ) -> Status:
        t = alg.tally(outcome, hits, limit.requests_per_unit, self._near_ratio)
        if st is not None:
            if t.over:
                st.over.inc(t.over)
            if t.near:
                st.near.inc(t.near)
            if t.within:
                st.within.inc(t.within)
        if outcome.over:
            if self._local is not None and limit.algorithm is Algorithm.FIXED_WINDOW:
                self._remember(op.keys[0], now + outcome.reset_s)
            if limit.shadow_mode:
                if st is not None:
                    st.shadow.inc(hits)
                return Status(False, limit, 0, outcome.reset_s)
        return Status(outcome.over, limit, outcome.remaining, outcome.reset_s)

    def _remember(self, key: str, until: float) -> None:
        local = self._local
        assert local is not None
        if len(local) >= LOCAL_CACHE_MAX:
            now = self._clock()
            for stale in [k for k, t in local.items() if t <= now]:
                del local[stale]
            if len(local) >= LOCAL_CACHE_MAX:
                local.clear()
        local[key] = until

    def _answer(self, statuses: tuple[Status, ...], limits: Sequence[Limit | None]) -> Answer:
        over = False
        quota_total = quota_over = 0
        for status, limit in zip(statuses, limits, strict=True):
            if limit is not None and limit.quota_mode:
                quota_total += 1
                quota_over += status.over
            elif status.over:
                over = True
        if quota_total and quota_over == quota_total:
            over = True  # quota descriptors decide only when all of them are over
        if over and self.section.shadow_mode:
            self._metrics.rl_global_shadow_mode.inc()
            over = False
        headers: tuple[tuple[str, str], ...] = ()
        if self.section.response_headers.enabled:
            headers = self._limit_headers(statuses)
        if over:
            return Answer(True, statuses, headers + self._over_headers, self._over_body)
        return Answer(False, statuses, headers)

    def _limit_headers(self, statuses: Sequence[Status]) -> tuple[tuple[str, str], ...]:
        chosen: Status | None = None
        for status in statuses:
            if status.limit is not None and (chosen is None or status.remaining < chosen.remaining):
                chosen = status
        if chosen is None or chosen.limit is None:
            return ()
        names = self.section.response_headers
        return (
            (names.limit, str(chosen.limit.requests_per_unit)),
            (names.remaining, str(chosen.remaining)),
            (names.reset, str(chosen.reset_s)),
        )

    def _unknown_domain(self, name: str, count: int) -> Answer:
        self._unknown.inc()
        held = _throttle.allow(f"domain:{name[:128]}")
        if held is not None:
            log.warning("rate-limit request for unknown domain %r: answering %s "
                        "(%d more since the last report)", name[:128], self.section.unknown_domain, held)
        over = self.section.unknown_domain == "over_limit"
        statuses = tuple(Status(over) for _ in range(count))
        if over:
            return Answer(True, statuses, self._over_headers, self._over_body, note="unknown-domain")
        return Answer(False, statuses, note="unknown-domain")

    def _store_failed(
        self,
        exc: BaseException,
        descriptors: Sequence[DescriptorRequest],
        limits: Sequence[Limit | None],
        timeout_s: float | None,
    ) -> Answer:
        mode = self.section.failure_mode
        self._store_errors[mode].inc()
        reason = f"no answer within {timeout_s * 1000:.0f} ms" if isinstance(exc, TimeoutError) and \
            timeout_s is not None else str(exc) or type(exc).__name__
        held = _throttle.allow("store-failed")
        if held is not None:
            log.warning("rate-limit store %s failed (%s): answering per failure_mode=%s "
                        "(%d more since the last report)", self.store.kind, reason, mode, held)
        if mode == "allow":
            return Answer(False, tuple(OK_NO_LIMIT for _ in descriptors), note="store-error")
        statuses = tuple(
            Status(lm is not None and not lm.unlimited, lm if lm is not None and not lm.unlimited else None)
            for lm in limits
        )
        return Answer(True, statuses, self._over_headers, self._over_body, note="store-error")
