"""Leader election (operator/election.py): the pure decisions, the Lease against the emulator, and two operator
processes of which only the leader reconciles and the standby takes over."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest

from tests.support.k8s_emulator import Emulator, experiment, kubeconfig
from xling.operator import rbac
from xling.operator.crd import GROUP, PLURAL, VERSION
from xling.operator.election import Elector, Timings, claimed, is_expired, may_take, must_stop, released
from xling.operator.kube import Conflict, Kube

T = Timings(duration=3.0, renew_deadline=2.0, retry_period=0.25)
NOW = datetime.datetime(2026, 12, 5, 9, 0, tzinfo=datetime.UTC)
LEASES = "coordination.k8s.io/v1/leases"


# --- the decisions ------------------------------------------------------------------------------------------


def test_timings_keep_the_leader_stopping_before_a_standby_may_take_over() -> None:
    Timings()
    for bad in ((15, 15, 2), (15, 10, 10), (15, 10, 0)):
        with pytest.raises(ValueError):
            Timings(*bad)


def test_expiry_counts_on_the_candidates_clock_from_the_last_change() -> None:
    held = {"holderIdentity": "a", "leaseDurationSeconds": 15, "renewTime": "1999-01-01T00:00:00.000000Z"}
    assert not is_expired(held, unchanged_since=100.0, now=114.9)  # an ancient renewTime does not matter
    assert is_expired(held, unchanged_since=100.0, now=115.0)
    assert not may_take(held, "b", 100.0, 110.0)
    assert may_take(held, "b", 100.0, 116.0)
    assert may_take(held, "a", 100.0, 101.0)  # renewing one's own
    assert may_take(released(held), "b", 100.0, 100.0)  # released: at once
    assert may_take({}, "b", 100.0, 100.0)


def test_leader_stops_at_the_renew_deadline() -> None:
    assert not must_stop(last_renewed=10.0, now=11.9, timings=T)
    assert must_stop(last_renewed=10.0, now=12.0, timings=T)


def test_claim_keeps_acquire_time_on_renewal_and_counts_takeovers() -> None:
    first = claimed({}, "a", NOW, T)
    assert first == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 3,
        "acquireTime": "2026-12-05T09:00:00.000000Z",
        "renewTime": "2026-12-05T09:00:00.000000Z",
        "leaseTransitions": 0,
    }
    later = NOW + datetime.timedelta(seconds=2)
    renewed = claimed(first, "a", later, T)
    assert renewed["acquireTime"] == first["acquireTime"] and renewed["leaseTransitions"] == 0
    assert renewed["renewTime"] == "2026-12-05T09:00:02.000000Z"
    taken = claimed(renewed, "b", later, T)
    assert taken["acquireTime"] == taken["renewTime"] and taken["leaseTransitions"] == 1
    assert claimed(released(taken), "a", later, T)["leaseTransitions"] == 2


class _HungApi:
    """An API server that stopped answering: every read hangs for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def read_lease(self, namespace: str, name: str, timeout: float) -> None:
        time.sleep(self.seconds)


async def test_a_hung_renewal_does_not_carry_the_leader_past_its_deadline() -> None:
    timings = Timings(duration=3.0, renew_deadline=1.0, retry_period=0.2)
    elector = Elector(_HungApi(2.5), "default", "op", "a", timings)  # type: ignore[arg-type]
    start = time.monotonic()
    await asyncio.wait_for(elector.hold(), 10)
    assert time.monotonic() - start < timings.renew_deadline + 0.5  # well before a standby may take over


# --- the Lease against the emulator -------------------------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Emulator, str]]:
    async with Emulator() as k8s, kmock.Server(k8s, host="127.0.0.1") as srv:
        url = str(srv.url).rstrip("/")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(url, tmp_path / "kubeconfig")))
        yield k8s, url


async def test_lease_get_create_replace_with_conflicts(api: tuple[Emulator, str]) -> None:
    k8s, _ = api
    kube = Kube.from_environment()
    body = {"metadata": {"name": "op", "namespace": "default"}, "spec": claimed({}, "a", NOW, T)}
    try:
        assert await asyncio.to_thread(kube.read_lease, "default", "op", 5) is None
        await asyncio.to_thread(kube.create_lease, body, 5)
        with pytest.raises(Conflict):
            await asyncio.to_thread(kube.create_lease, body, 5)
        read = await asyncio.to_thread(kube.read_lease, "default", "op", 5)
        stale = {**read, "spec": claimed(read["spec"], "b", NOW, T)}
        read["spec"] = claimed(read["spec"], "a", NOW, T)
        written = await asyncio.to_thread(kube.replace_lease, read, 5)
        assert written["metadata"]["resourceVersion"] != stale["metadata"]["resourceVersion"]
        with pytest.raises(Conflict):  # b read before a's write: its update must not win
            await asyncio.to_thread(kube.replace_lease, stale, 5)
        assert (await asyncio.to_thread(kube.read_lease, "default", "op", 5))["spec"]["holderIdentity"] == "a"
    finally:
        kube.close()
    assert k8s.requests_made() == rbac.LEADER_ELECTION_CALLS  # and nothing else


async def test_a_standby_takes_over_only_an_expired_lease(api: tuple[Emulator, str]) -> None:
    clock = [100.0]
    kube = Kube.from_environment()
    a, b = (Elector(kube, "default", "op", who, T, clock=lambda: clock[0]) for who in ("a", "b"))
    try:
        assert await asyncio.to_thread(a.try_once)
        assert not await asyncio.to_thread(b.try_once)
        clock[0] += 2.0
        assert await asyncio.to_thread(a.try_once)  # a renews: b's view of it changes
        assert not await asyncio.to_thread(b.try_once)
        clock[0] += 2.9  # a stops renewing; b has seen it unchanged for less than the duration
        assert not await asyncio.to_thread(b.try_once)
        clock[0] += 0.2
        assert await asyncio.to_thread(b.try_once)
        assert not await asyncio.to_thread(a.try_once)  # a cannot renew any more
        b.leading = True
        await asyncio.to_thread(b.release)
        assert await asyncio.to_thread(a.try_once)  # released: at once
    finally:
        kube.close()


# --- two operator processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return result


class Operators:
    """``python -m xling.operator`` processes with the election on, against one emulator."""

    def __init__(self, k8s: Emulator, url: str, tmp: Path) -> None:
        self.k8s, self.url, self.tmp = k8s, url, tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.probes: dict[str, str] = {}
        self.metrics: dict[str, str] = {}

    def start(self, who: str) -> None:
        probe = f"http://127.0.0.1:{_free_port()}/healthz"
        metrics_port = _free_port()
        env = {
            "XLING_METRICS_PORT": str(metrics_port),
            **os.environ,
            "KUBECONFIG": str(self.tmp / "kubeconfig"),
            "POD_NAME": who,
            "XLING_LEASE_NAME": "rel-xling-operator",
            "XLING_LEASE_NAMESPACE": "xling",
            "XLING_LEASE_DURATION": str(T.duration),
            "XLING_LEASE_RENEW_DEADLINE": str(T.renew_deadline),
            "XLING_LEASE_RETRY_PERIOD": str(T.retry_period),
        }
        with (self.tmp / f"{who}.log").open("w") as log:
            self.procs[who] = subprocess.Popen(
                [sys.executable, "-m", "xling.operator", "--liveness", probe, "--log-format", "plain"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        self.probes[who] = probe
        self.metrics[who] = f"http://127.0.0.1:{metrics_port}/metrics"

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.k8s.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def holder(self) -> str:
        spec = (self.get(LEASES, "xling", "rel-xling-operator") or {}).get("spec") or {}
        return (spec.get("holderIdentity") or "").partition("_")[0]

    async def probe(self, who: str) -> Any:
        return json.loads(await self._get(self.probes[who]) or "null")

    async def leader_gauge(self, who: str) -> float | None:
        """xling_leader on ``who``'s metrics port."""
        text = await self._get(self.metrics[who])
        values = [float(v) for v in re.findall(r"^xling_leader (\S+)$", text or "", flags=re.M)]
        return values[0] if values else None

    @staticmethod
    async def _get(url: str) -> str | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(url) as resp,
            ):
                return await resp.text() if resp.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def create(self, name: str) -> None:
        path = f"{self.url}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
        async with aiohttp.ClientSession() as session, session.post(path, json=experiment(name)) as resp:
            assert resp.status == 201, await resp.text()

    def rayjob_creates(self) -> int:
        return sum(1 for v, g, r, _ in self.k8s.log if (v, g, r) == ("create", "ray.io", "rayjobs"))

    def has_rayjob(self, name: str) -> bool:
        return self.get("ray.io/v1/rayjobs", "default", name) is not None

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture
async def operators(api: tuple[Emulator, str], tmp_path: Path) -> AsyncIterator[Operators]:
    ops = Operators(*api, tmp_path)
    try:
        yield ops
    except BaseException:
        print(ops.logs())
        raise
    finally:
        ops.stop_all()


async def test_only_the_leader_reconciles_and_a_standby_takes_over(operators: Operators) -> None:
    ops = operators
    for who in ("a", "b"):
        ops.start(who)
    for who in ("a", "b"):
        await _until(lambda who=who: ops.probe(who), 60, f"{who}'s probe")
    await ops.create("one")
    await _until(lambda: asyncio.sleep(0, ops.has_rayjob("one")), 30, "the RayJob of one")
    await asyncio.sleep(4 * T.retry_period)  # time for the other one to reconcile too, if it did
    assert ops.rayjob_creates() == 1  # without an election both create it (the second one gets a 409)
    leader, standby = ("a", "b") if ops.holder() == "a" else ("b", "a")
    assert ops.holder() == leader
    assert await ops.probe(standby) == {"standby": True}
    assert (await ops.leader_gauge(leader), await ops.leader_gauge(standby)) == (1.0, 0.0)

    ops.procs[leader].send_signal(signal.SIGKILL)  # a node lost: no release
    killed = time.monotonic()
    await _until(lambda: asyncio.sleep(0, ops.holder() == standby), 30, "the standby to take over")
    took = time.monotonic() - killed
    # not before the Lease expired (the last renewal was about a retry period before the kill at most), and
    # within its duration plus polling (slack for a loaded machine)
    assert T.duration - 2 * T.retry_period <= took <= T.duration + 2 * T.retry_period + 2.0, took
    await ops.create("two")
    await _until(lambda: asyncio.sleep(0, ops.has_rayjob("two")), 30, "the RayJob of two (the new leader)")
    assert await _until(lambda: ops.leader_gauge(standby), 30, "the new leader's metrics") == 1.0

    ops.procs[standby].send_signal(signal.SIGTERM)  # a clean shutdown hands the Lease over
    assert await asyncio.to_thread(ops.procs[standby].wait, 30) == 0
    assert ops.holder() == ""


async def test_a_leader_that_cannot_renew_stops_serving(
    operators: Operators, api: tuple[Emulator, str]
) -> None:
    ops, (k8s, url) = operators, api
    ops.start("a")
    await _until(lambda: asyncio.sleep(0, ops.holder() == "a"), 60, "a to lead")
    lease = k8s.objects[LEASES, "xling", "rel-xling-operator"].raw
    stolen = {**lease, "spec": claimed(lease["spec"], "thief", datetime.datetime.now(datetime.UTC), T)}
    path = f"{url}/apis/coordination.k8s.io/v1/namespaces/xling/leases/rel-xling-operator"
    async with aiohttp.ClientSession() as session, session.put(path, json=stolen) as resp:
        assert resp.status == 200, await resp.text()
    stolen_at = time.monotonic()
    code = await asyncio.to_thread(ops.procs["a"].wait, 30)
    assert code == 1  # the Deployment restarts it, as a standby
    assert time.monotonic() - stolen_at <= T.renew_deadline + 10.0  # kopf's shutdown included
    assert ops.holder() == "thief"
