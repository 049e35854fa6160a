"""Prometheus metrics of the operator: experiments by phase, reconcile errors, time from creation to Running.

Served by ``prometheus_client`` on ``--metrics-port`` (Helm: operator.metrics; a ServiceMonitor is optional).
Updated from status writes, so they cost no extra API calls.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.phases = Gauge(
            "xling_experiments", "RetrievalExperiments by phase", ["namespace", "phase"], registry=registry
        )
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
        self._phase_of: dict[tuple[str, str], str] = {}

    def observe(self, namespace: str, name: str, old: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
        """After a status write (``old`` body, status ``patch``): move the experiment between the phase gauges,
        and time its first Running."""
        old_phase = (old.get("status") or {}).get("phase")
        phase = patch.get("phase", old_phase)
        key = (namespace, name)
        previous = self._phase_of.get(key)
        if phase != previous:
            if previous:
                self.phases.labels(namespace, previous).dec()
            if phase:
                self.phases.labels(namespace, phase).inc()
                self._phase_of[key] = phase
        created = (old.get("metadata") or {}).get("creationTimestamp")
        if phase == "Running" and old_phase not in ("Running", "Suspended") and created:
            start = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
            self.to_running.observe((datetime.datetime.now(datetime.UTC) - start).total_seconds())

    def forget(self, namespace: str, name: str) -> None:
        if previous := self._phase_of.pop((namespace, name), None):
            self.phases.labels(namespace, previous).dec()

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
