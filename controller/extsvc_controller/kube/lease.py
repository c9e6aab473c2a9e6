"""LeaderElector: one status writer among replicas, through a coordination.k8s.io/v1 Lease.

Like client-go's: a candidate takes the Lease when it has no holder, or when its record (holder,
renewTime) has not changed for ``lease_duration`` *as observed locally* (no trust in other
replicas' clocks); the leader renews every ``retry_period``; every write carries the
resourceVersion read, so of two candidates only one wins (the other gets 409). The leader gives
up at once when a renew is refused (409, or someone else holds the Lease) or when it could not
renew for ``renew_deadline``; :attr:`is_leader` also turns false by itself past that deadline, so a
replica stuck in a slow request does not go on writing. On :meth:`stop` the Lease is released
(holder cleared) so a standby takes over at its next retry instead of after an expiry.

All candidates must use the same durations (they are replicas of one Deployment).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import time
from collections.abc import Callable

import httpx2
from lightkube import AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from .metrics import KubeMetrics

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(
        self,
        client: AsyncClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callable[[], None] = lambda: None,
        on_stopped_leading: Callable[[], None] = lambda: None,
        metrics: KubeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")
        self._client = client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._started, self._stopped = on_started_leading, on_stopped_leading
        self.metrics = metrics if metrics is not None else KubeMetrics()
        self._clock = clock
        self._leading = False
        self._renewed_at = 0.0  # clock() of the last successful acquire/renew
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._stopping = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self._leading and self._clock() - self._renewed_at < self.renew_deadline

    async def run(self) -> None:
        """Try to acquire, then renew, every ``retry_period`` until :meth:`stop` (then release).
        Cancelling the task instead is a crash: leadership ends, the Lease is left to expire."""
        self._stopping.clear()
        try:
            while not self._stopping.is_set():
                await self._try_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.retry_period)
            if self._leading:
                await self._release()
        finally:
            self._set_leading(False)

    def stop(self) -> None:
        self._stopping.set()

    # --- internals -----------------------------------------------------------------------------

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        self.metrics.leader.set(1 if leading else 0)
        self.metrics.leader_transitions.inc()
        log.info("%s %s leading (Lease %s/%s)", self.identity, "started" if leading else "stopped",
                 self.namespace, self.name)
        try:
            (self._started if leading else self._stopped)()
        except Exception:  # a broken callback must not break the election
            log.exception("leader callback failed")

    def _spec(self, lease: Lease | None, now: datetime.datetime) -> LeaseSpec:
        old = lease.spec if lease is not None and lease.spec is not None else LeaseSpec()
        ours = old.holderIdentity == self.identity
        return LeaseSpec(
            holderIdentity=self.identity,
            leaseDurationSeconds=max(1, math.ceil(self.lease_duration)),
            acquireTime=old.acquireTime if ours and old.acquireTime else now,
            renewTime=now,
            leaseTransitions=(old.leaseTransitions or 0) + (0 if ours or lease is None else 1),
        )

    async def _try_once(self) -> None:
        try:
            async with asyncio.timeout(self.renew_deadline):
                won = await self._acquire_or_renew()
        except (httpx2.HTTPError, TimeoutError, OSError) as exc:
            conflict = isinstance(exc, httpx2.HTTPStatusError) and exc.response.status_code == 409
            log.debug("Lease %s/%s: %s", self.namespace, self.name, type(exc).__name__)
            if self._leading and (conflict or self._clock() - self._renewed_at >= self.renew_deadline):
                self._set_leading(False)  # taken by someone else, or unrenewable too long
            return
        if won:
            self._renewed_at = self._clock()
            self._set_leading(True)
        else:
            self._set_leading(False)

    async def _acquire_or_renew(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        try:
            lease = await self._client.get(Lease, self.name, namespace=self.namespace)
        except httpx2.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
            meta = ObjectMeta(name=self.name, namespace=self.namespace)
            await self._client.create(Lease(metadata=meta, spec=self._spec(None, now)))
            return True
        spec = lease.spec or LeaseSpec()
        record = (spec.holderIdentity or "", str(spec.renewTime))
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        holder = spec.holderIdentity or ""
        expired = self._clock() - self._observed_at >= self.lease_duration
        if holder and holder != self.identity and not expired:
            return False
        lease.spec = self._spec(lease, now)
        await self._client.replace(lease)  # carries metadata.resourceVersion: 409 if it moved
        return True

    async def _release(self) -> None:
        """Clear the holder (only if still ours), so that a standby need not wait for expiry."""
        try:
            async with asyncio.timeout(self.renew_deadline):
                lease = await self._client.get(Lease, self.name, namespace=self.namespace)
                if lease.spec is None or lease.spec.holderIdentity != self.identity:
                    return
                lease.spec.holderIdentity = ""
                lease.spec.leaseDurationSeconds = 1
                await self._client.replace(lease)
        except (httpx2.HTTPError, TimeoutError, OSError) as exc:
            log.warning("Lease %s/%s not released (%s)", self.namespace, self.name, type(exc).__name__)
