"""Leader election on a ``coordination.k8s.io/v1`` Lease, so that two operator replicas never both reconcile.

kopf has no leader election (its peering pauses lower-priority operators, not equal ones), so the election wraps
kopf instead: a replica acquires the Lease before kopf starts, renews it while kopf runs, and stops kopf (the
process exits; the Deployment restarts it as a standby) when it could not renew for ``renew_deadline``. A standby
polls and takes the Lease over when its holder has not renewed it for ``leaseDurationSeconds``, or at once when
the holder released it on a clean shutdown. As in client-go, expiry is judged by how long the *standby* has seen
the Lease unchanged on its own monotonic clock, never by ``renewTime``: the nodes' clocks need not agree.

The decisions are the pure functions below; :class:`Elector` does the API calls, through
:class:`xling.operator.kube.Kube` (sync, run in a thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from xling.operator.kube import Conflict, Kube

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timings:
    """client-go's defaults: a standby takes over 15 s after the last renewal; the leader gives up after 10 s
    without one, so it has stopped before anyone may take over."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(f"need 0 < retry period < renew deadline < lease duration, got {self}")


def is_free(spec: Mapping[str, Any]) -> bool:
    """No holder: never taken, or released by a leader that shut down cleanly."""
    return not spec.get("holderIdentity")


def is_expired(spec: Mapping[str, Any], unchanged_since: float, now: float) -> bool:
    """The holder has not renewed for its ``leaseDurationSeconds``, counted from when this candidate last saw
    the Lease change (its own clock)."""
    return now - unchanged_since >= float(spec.get("leaseDurationSeconds") or 0)


def may_take(spec: Mapping[str, Any], me: str, unchanged_since: float, now: float) -> bool:
    """Whether ``me`` may write itself into the Lease: it is free, mine already (a renewal), or expired."""
    return is_free(spec) or spec.get("holderIdentity") == me or is_expired(spec, unchanged_since, now)


def must_stop(last_renewed: float, now: float, timings: Timings) -> bool:
    """The leader stops serving once it has failed to renew for the renew deadline (before a standby may take
    over, which needs the longer lease duration)."""
    return now - last_renewed >= timings.renew_deadline


def micro_time(at: datetime.datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claimed(spec: Mapping[str, Any], me: str, now: datetime.datetime, timings: Timings) -> dict[str, Any]:
    """The Lease spec with ``me`` holding it: a renewal keeps acquireTime, a takeover counts a transition (a new
    Lease, ``spec`` empty, starts at 0)."""
    renewing = spec.get("holderIdentity") == me
    transitions = int(spec.get("leaseTransitions") or 0)
    return {
        "holderIdentity": me,
        "leaseDurationSeconds": max(1, round(timings.duration)),
        "acquireTime": spec.get("acquireTime") if renewing else micro_time(now),
        "renewTime": micro_time(now),
        "leaseTransitions": transitions if renewing or not spec else transitions + 1,
    }


def released(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The Lease spec a leader leaves on a clean shutdown: no holder, so a standby takes over at its next poll."""
    return {**spec, "holderIdentity": None, "leaseDurationSeconds": 1}


class Elector:
    """One candidate for one Lease. :meth:`acquire` blocks until it leads; :meth:`hold` returns when it lost."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        timings: Timings = Timings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.timings, self.clock = timings, clock
        self._seen: Mapping[str, Any] | None = None  # the Lease spec as last read
        self._seen_at = 0.0  # when it last changed, on self.clock
        self.leading = False

    def try_once(self) -> bool:
        """One read and, if allowed, one write of the Lease; True when this candidate holds it now."""
        now = self.clock()
        timeout = self.timings.renew_deadline / 2  # a hung request must not outlast the renew deadline
        lease = self.kube.read_lease(self.namespace, self.name, timeout=timeout)
        wall = datetime.datetime.now(datetime.UTC)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": claimed({}, self.identity, wall, self.timings),
            }
            try:
                self.kube.create_lease(body, timeout=timeout)
            except Conflict:  # another candidate created it first
                return False
            self._saw(body["spec"], now)
            return True
        spec = lease.get("spec") or {}
        if spec != self._seen:
            self._saw(spec, now)
        if not may_take(spec, self.identity, self._seen_at, now):
            return False
        lease["spec"] = claimed(spec, self.identity, wall, self.timings)  # metadata keeps resourceVersion
        try:
            self.kube.replace_lease(lease, timeout=timeout)
        except Conflict:  # someone wrote it since our read
            return False
        self._saw(lease["spec"], now)
        return True

    def _saw(self, spec: Mapping[str, Any], at: float) -> None:
        self._seen, self._seen_at = spec, at

    async def acquire(self) -> None:
        """Poll every retry period until this candidate holds the Lease."""
        while not await self._attempt():
            await asyncio.sleep(self.timings.retry_period)
        self.leading = True
        log.info(f"leading: lease {self.namespace}/{self.name} held by {self.identity}")

    async def hold(self) -> None:
        """Renew every retry period; return when renewals have failed for the renew deadline (leadership lost)."""
        last = self.clock()
        while True:
            await asyncio.sleep(self.timings.retry_period)
            started = self.clock()  # a standby can have seen the renewal no earlier than this
            left = last + self.timings.renew_deadline - started
            try:  # a slow attempt must not carry the leader past its deadline (into a standby's takeover)
                renewed = left > 0 and await asyncio.wait_for(self._attempt(), left)
            except TimeoutError:
                renewed = False
            if renewed:
                last = started
            elif must_stop(last, self.clock(), self.timings):
                self.leading = False
                log.error(
                    f"lost lease {self.namespace}/{self.name}: not renewed for {self.timings.renew_deadline}s"
                )
                return

    async def _attempt(self) -> bool:
        try:
            return await asyncio.to_thread(self.try_once)
        except Exception as err:  # an unreachable or failing API server: a failed attempt, retried
            log.warning(f"lease {self.namespace}/{self.name}: {err!r}")
            return False

    def release(self) -> None:
        """Best effort, on a clean shutdown: hand the Lease over at once instead of after its duration."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = self.kube.read_lease(self.namespace, self.name, timeout=self.timings.retry_period)
            if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"] = released(lease["spec"])
                self.kube.replace_lease(lease, timeout=self.timings.retry_period)
        except Exception as err:  # the standby takes over after the lease duration instead
            log.warning(f"could not release lease {self.namespace}/{self.name}: {err!r}")
