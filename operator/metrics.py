"""Prometheus metrics of the operator: experiments by phase, reconcile errors, time from creation to Running, and
which replica leads (a standby serves ``xling_leader 0`` and nothing else has samples).

Served by ``prometheus_client`` on ``--metrics-port`` (Helm: operator.metrics; a ServiceMonitor is optional).
The phase gauge is counted at scrape time from the experiments the operator lists and watches (its kopf index),
so a restarted operator reports every experiment at once, without waiting for a status write.
"""

from __future__ import annotations

import datetime
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: (namespace, phase) of every experiment the operator knows, phase "" when it has none yet.
PhaseSource = Callable[[], Iterable[tuple[str, str]]]


class _Phases(Collector):
    def __init__(self, source: PhaseSource) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "xling_experiments", "RetrievalExperiments by phase", labels=["namespace", "phase"]
        )
        for (namespace, phase), count in sorted(Tally(self.source()).items()):
            family.add_metric([namespace, phase or "Pending"], count)
        yield family


class Metrics:
    def __init__(
        self, phases: PhaseSource = tuple, registry: CollectorRegistry | None = None, leader: bool = True
    ) -> None:
        self.registry = registry = registry or CollectorRegistry()
        registry.register(_Phases(phases))
        self.leader = Gauge(
            "xling_leader",
            "1 in the replica that reconciles (holds the leader-election Lease, or runs without one), 0 in a standby",
            registry=registry,
        )
        self.leader.set(int(leader))
        self.errors = Counter(
            "xling_reconcile_errors_total",
            "Reconciles that raised, by handler",
            ["handler"],
            registry=registry,
        )
        self.to_running = Histogram(
            "xling_time_to_running_seconds",
            "From the experiment's creation until its Ray job runs",
            buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
            registry=registry,
        )

    def observe(self, old: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
        """After a status write (``old`` body, status ``patch``): time the experiment's first Running."""
        old_phase = (old.get("status") or {}).get("phase")
        created = (old.get("metadata") or {}).get("creationTimestamp")
        if patch.get("phase") == "Running" and old_phase not in ("Running", "Suspended") and created:
            start = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
            self.to_running.observe((datetime.datetime.now(datetime.UTC) - start).total_seconds())

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
