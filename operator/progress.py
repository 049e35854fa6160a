"""What MLflow knows about an experiment's runs: progress for the watchdog, links and results for status.

Contract with the trainer (``xling.api.contracts``): every MLflow run it starts for a RetrievalExperiment
(the parent and each trial) carries the tag ``xling.k8s.uid`` = $XLING_EXPERIMENT_UID; the parent run (no
``mlflow.parentRunId`` tag) holds the final metrics. Only the MLflow REST API is used (stdlib HTTP): the operator image has no mlflow.
"""

from __future__ import annotations

import base64
import datetime
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from xling.api.metrics import LOSS, language_of
from xling.api.spec.base import KNOWN_LANGUAGES
from xling.api.tags import K8S_UID, PARENT_RUN_ID, tag_is


@dataclass(frozen=True)
class RunProgress:
    """One look at MLflow for one experiment."""

    experiment_id: str
    run_id: str | None = None
    last_metric_ms: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    step: int | None = None  # the training step of the run's newest loss


def summarize(experiment_id: str, runs: list[dict[str, Any]]) -> RunProgress:
    """Newest metric over all runs (trials included); final metrics from the parent run."""
    stamps = [m.get("timestamp", 0) for r in runs for m in (r.get("data") or {}).get("metrics", [])]
    parents = [r for r in runs if PARENT_RUN_ID not in _tags(r)]
    parent = max(parents, key=lambda r: r["info"].get("start_time", 0), default=None)
    logged = ((parent or {}).get("data") or {}).get("metrics", [])
    metrics = {m["key"]: float(m["value"]) for m in logged}
    return RunProgress(
        experiment_id=experiment_id,
        run_id=parent["info"]["run_id"] if parent else None,
        last_metric_ms=max(stamps) if stamps else None,
        metrics=metrics,
        step=next((int(m.get("step", 0)) for m in logged if m["key"] == LOSS), None),
    )


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in (run.get("data") or {}).get("tags", [])}


def language_breakdown(metric: str, metrics: dict[str, float]) -> dict[str, float]:
    """Per-language values of ``metric``, named as the evaluator names them: the language code is the
    last part. ``xquad_r/multi/map`` -> ``{"de": <xquad_r/multi/map/de>, ...}``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if (lang := language_of(metric, key)) in KNOWN_LANGUAGES:
            out[lang] = value
    return dict(sorted(out.items()))


def ms_to_iso(ms: int) -> str:
    return (
        datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


class Mlflow:
    """A minimal MLflow REST client (token or basic auth from the experiment's credentials Secret)."""

    def __init__(
        self, base_url: str, credentials: dict[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        creds = credentials or {}
        if creds.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {creds['MLFLOW_TRACKING_TOKEN']}"
        elif creds.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds.get('MLFLOW_TRACKING_PASSWORD', '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()

    @staticmethod
    def supports(uri: str | None) -> bool:
        return bool(uri) and urllib.parse.urlparse(uri).scheme in ("http", "https")

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}/api/2.0/mlflow/{path}"
        data = None
        if method == "GET" and payload:
            url += "?" + urllib.parse.urlencode(payload)
        elif payload is not None:
            data = json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, headers=self.headers, method=method)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) only, see supports)
            return json.loads(resp.read() or b"{}")

    def experiment_id(self, name: str) -> str | None:
        try:
            return self._call("GET", "experiments/get-by-name", {"experiment_name": name})["experiment"][
                "experiment_id"
            ]
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def run_progress(self, experiment_name: str, uid: str) -> RunProgress | None:
        """None until the trainer has created the MLflow experiment."""
        exp_id = self.experiment_id(experiment_name)
        if exp_id is None:
            return None
        found = self._call(
            "POST",
            "runs/search",
            {"experiment_ids": [exp_id], "filter": tag_is(K8S_UID, uid), "max_results": 1000},
        )
        return summarize(exp_id, found.get("runs", []))

    def kill_run(self, run_id: str, end_ms: int) -> None:
        self._call("POST", "runs/update", {"run_id": run_id, "status": "KILLED", "end_time": end_ms})

    def experiment_url(self, experiment_id: str) -> str:
        return f"{self.base_url}/#/experiments/{experiment_id}"

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.base_url}/#/experiments/{experiment_id}/runs/{run_id}"
