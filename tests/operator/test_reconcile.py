"""The handler logic (xling.operator.reconcile) against an in-memory API: idempotency, refusals, mirroring,
the watchdog, and a hypothesis fuzz test that random specs never crash it."""

from __future__ import annotations

import copy
import datetime
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.k8s_emulator import experiment
from xling.api.spec.loading import parse_experiment
from xling.operator import manifests as mf
from xling.operator import reconcile as rc
from xling.operator.kube import Conflict, NotInstalled
from xling.operator.progress import RunProgress

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)


class FakeKube:
    """Just enough API server: objects by (kind, namespace, name), resourceVersions, 409s, a call log."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[str] = []
        self._rv = itertools.count(1)
        self.kuberay_missing = False
        self.nodes: set[str] | None = None  # allocatable resource names of all nodes; None = may not list

    def _create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        key = (kind, body["metadata"]["namespace"], body["metadata"]["name"])
        self.calls.append(f"create {kind}")
        if key in self.objects:
            raise Conflict("exists")
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def _read(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        self.calls.append(f"get {kind}")
        obj = self.objects.get((kind, ns, name))
        return copy.deepcopy(obj) if obj else None

    def _patch(self, kind: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append(f"patch {kind}")
        obj = self.objects.get((kind, ns, name))
        if obj is None:
            return None
        want = (patch.get("metadata") or {}).get("resourceVersion")
        if want and want != obj["metadata"]["resourceVersion"]:
            raise Conflict("stale")
        meta = {k: v for k, v in (patch.get("metadata") or {}).items() if k != "resourceVersion"}
        _merge(obj, {**{k: v for k, v in patch.items() if k != "metadata"}, "metadata": meta})
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    def add_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        body["metadata"].setdefault("uid", "uid-" + body["metadata"]["name"])
        body["metadata"].setdefault("generation", 1)
        return self._create("rexp", body)

    def create_configmap(self, body):
        return self._create("cm", body)

    def read_configmap(self, ns, name):
        return self._read("cm", ns, name)

    def patch_configmap(self, ns, name, patch):
        return self._patch("cm", ns, name, patch)

    def read_secret(self, ns, name):
        self.calls.append("get secret")
        obj = self.objects.get(("secret", ns, name))
        return None if obj is None else {"metadata": obj["metadata"]}

    def read_secret_data(self, ns, name):
        self.calls.append("get secret")
        obj = self.objects.get(("secret", ns, name)) or {"metadata": {}}
        return obj["metadata"].get("labels") or {}, obj.get("data") or {}

    def add_secret(self, name: str, data: dict[str, str], opted_in: bool = True) -> None:
        labels = {rc.SECRET_OPT_IN: "true"} if opted_in else {}
        self.objects[("secret", "default", name)] = {
            "metadata": {"name": name, "labels": labels},
            "data": data,
        }

    def read_pvc(self, ns, name):
        return self._read("pvc", ns, name)

    def list_pods(self, ns, selector):
        return [p for (kind, n, _), p in self.objects.items() if kind == "pod" and n == ns]

    def node_resources(self):
        return self.nodes

    def create_rayjob(self, body):
        if self.kuberay_missing:
            self.calls.append("create rayjob")
            raise NotInstalled("the ray.io/v1 RayJob API is not served: is KubeRay installed?")
        return self._create("rayjob", body)

    def read_rayjob(self, ns, name):
        return self._read("rayjob", ns, name)

    def patch_rayjob(self, ns, name, patch):
        return self._patch("rayjob", ns, name, patch)

    def read_experiment(self, ns, name):
        return self._read("rexp", ns, name)

    def patch_experiment_status(self, ns, name, patch):
        return self._patch("rexp", ns, name, patch)


def _merge(obj: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            obj.pop(key, None)
        elif isinstance(value, dict) and isinstance(obj.get(key), dict):
            _merge(obj[key], value)
        else:
            obj[key] = copy.deepcopy(value)


def _reconcile(kube: FakeKube, name: str = "exp") -> list[rc.Transition]:
    body = kube.read_experiment("default", name)
    return rc.write_status(kube, "default", name, rc.reconcile(kube, body), now="t")


def _status(kube: FakeKube, name: str = "exp") -> dict[str, Any]:
    return kube.objects[("rexp", "default", name)].get("status", {})


def _cond(kube: FakeKube, type_: str, name: str = "exp") -> dict[str, Any]:
    return next(c for c in _status(kube, name)["conditions"] if c["type"] == type_)


def _edit_spec(kube: FakeKube, **spec: Any) -> None:
    obj = kube.objects[("rexp", "default", "exp")]
    obj["spec"] = experiment(**spec)["spec"]
    obj["metadata"]["generation"] += 1


def test_create_is_idempotent_and_reports():
    kube = FakeKube()
    kube.add_experiment(experiment())
    events = _reconcile(kube)
    assert [(e.type, e.reason) for e in events] == [("Normal", "SpecValid")]
    assert {k[0] for k in kube.objects} == {"rexp", "cm", "rayjob"}
    status = _status(kube)
    assert (
        status["phase"] == "Pending" and status["rayJobName"] == "exp" and status["observedGeneration"] == 1
    )
    assert {c["type"] for c in status["conditions"]} == set(rc.cnd.ConditionType)
    kube.calls.clear()
    assert _reconcile(kube) == []  # a restarted operator: nothing created, nothing written
    assert not [c for c in kube.calls if c.startswith(("create", "patch"))]


def test_restart_between_configmap_and_rayjob_creates_the_rayjob_once():
    kube = FakeKube()
    body = kube.add_experiment(experiment())
    kube.create_configmap(mf.configmap(mf.validate(body), mf.Owner.from_body(body)))
    _reconcile(kube)
    _reconcile(kube)
    assert sum(k[0] == "rayjob" for k in kube.objects) == 1


def test_invalid_spec_is_reported_with_field_path_and_creates_nothing():
    kube = FakeKube()
    kube.add_experiment(experiment(sampling={"strategy": "xy"}, data={"languages": ["en"]}))
    events = _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert (
        cond["status"] == "False"
        and cond["reason"] == "InvalidSpec"
        and "sampling.strategy" in cond["message"]
    )
    assert _status(kube)["phase"] == "Invalid" and events[0].type == "Warning"
    assert {k[0] for k in kube.objects} == {"rexp"}


def test_suspend_and_deadlines_are_applied_other_changes_refused():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    _edit_spec(kube, suspend=True, deadlines={"totalSeconds": 99})
    _reconcile(kube)
    job = kube.objects[("rayjob", "default", "exp")]["spec"]
    assert job["suspend"] is True and job["activeDeadlineSeconds"] == 99
    assert _status(kube)["observedGeneration"] == 2
    _edit_spec(kube, suspend=True, deadlines={"totalSeconds": 99}, model={"name": "other"})
    _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert cond["reason"] == "ImmutableFieldChanged" and "spec.model.name" in cond["message"]
    assert kube.objects[("rayjob", "default", "exp")]["spec"]["suspend"] is True
    _edit_spec(kube, suspend=False)  # reverting the refused change and resuming: accepted again
    _reconcile(kube)
    assert _cond(kube, "Validated")["status"] == "True"
    assert "activeDeadlineSeconds" not in kube.objects[("rayjob", "default", "exp")]["spec"]


def test_rayjob_deleted_by_hand_is_reported_not_recreated():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    del kube.objects[("rayjob", "default", "exp")]
    _reconcile(kube)
    assert ("rayjob", "default", "exp") not in kube.objects
    assert _cond(kube, "Failed")["reason"] == "RayJobDeleted" and _status(kube)["phase"] == "Failed"


def test_foreign_child_is_not_adopted():
    kube = FakeKube()
    body = kube.add_experiment(experiment())
    cm = mf.configmap(mf.validate(body), mf.Owner("exp", "default", "someone-else"))
    kube.create_configmap(cm)
    with pytest.raises(rc.ForeignChild):
        rc.reconcile(kube, kube.read_experiment("default", "exp"))


def test_mirror_follows_the_rayjob_and_stays_terminal():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    job = kube.objects[("rayjob", "default", "exp")]
    assert rc.owner_of(job) == ("default", "exp", "uid-exp")
    seen = []
    for deploy, js in (("Initializing", None), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")):
        job["status"] = {"jobDeploymentStatus": deploy, "jobStatus": js, "dashboardURL": "exp-head-svc:8265"}
        rc.write_status(kube, "default", "exp", rc.mirror_rayjob(job, deleted=False), now=deploy)
        seen.append(_status(kube)["phase"])
    assert seen == ["Initializing", "Running", "Succeeded"]
    assert _status(kube)["dashboardUrl"] == "http://exp-head-svc:8265"
    assert _cond(kube, "Running")["lastTransitionTime"] == "Complete"
    assert rc.write_status(kube, "default", "exp", rc.mirror_rayjob(job, deleted=True)) == []
    assert _status(kube)["phase"] == "Succeeded"


def test_status_writer_retries_on_conflict():
    kube = FakeKube()
    kube.add_experiment(experiment())
    calls = []

    def racing(body):
        calls.append(1)
        if len(calls) == 1:  # someone else writes between our read and our patch
            kube._patch("rexp", "default", "exp", {"status": {"other": 1}})
        return rc.StatusUpdate([rc.Cond("Validated", "True", "SpecValid")])

    rc.write_status(kube, "default", "exp", racing)
    assert len(calls) == 2 and _status(kube)["other"] == 1 and _cond(kube, "Validated")["status"] == "True"


class FakeMlflow:
    def __init__(self, report: RunProgress | None) -> None:
        self._report = report
        self.killed: list[str] = []

    def __call__(self, uri: str, creds: dict[str, str]) -> FakeMlflow:
        assert creds == {"MLFLOW_TRACKING_TOKEN": "t"}
        return self

    def run_progress(self, experiment_name: str, uid: str) -> RunProgress | None:
        assert (experiment_name, uid) == ("exp", "uid-exp")
        return self._report

    def experiment_url(self, e: str) -> str:
        return f"http://mlflow/#/experiments/{e}"

    def run_url(self, e: str, r: str) -> str:
        return f"http://mlflow/#/experiments/{e}/runs/{r}"


def _running(kube: FakeKube, since: str) -> dict[str, Any]:
    tracking = {"trackingUri": "http://mlflow:5000", "credentials": {"name": "mlflow"}}
    kube.add_secret("mlflow", {"MLFLOW_TRACKING_TOKEN": "t"})
    kube.add_experiment(experiment(tracking=tracking, deadlines={"noProgressSeconds": 600}))
    _reconcile(kube)
    job = {"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
    rc.write_status(kube, "default", "exp", rc.mirror_rayjob(job, deleted=False), now=since)
    return kube.read_experiment("default", "exp")


def test_watchdog_fires_when_metrics_stop():
    kube = FakeKube()
    body = _running(kube, since="2026-01-01T11:00:00Z")
    stale = int(datetime.datetime(2026, 1, 1, 11, 30, tzinfo=datetime.UTC).timestamp() * 1000)
    update = rc.watch_progress(kube, body, NOW, client=FakeMlflow(RunProgress("7", "run1", stale, {})))
    events = rc.write_status(kube, "default", "exp", update)
    cond = _cond(kube, "Progressing")
    assert cond["status"] == "False" and cond["reason"] == "NoProgress" and "1800 s" in cond["message"]
    assert [e.type for e in events] == ["Warning"]
    status = _status(kube)
    assert status["mlflow"]["runUrl"] == "http://mlflow/#/experiments/7/runs/run1"
    assert status["lastMetricTime"] == "2026-01-01T11:30:00Z"
    fresh = int(NOW.timestamp() * 1000) - 5000
    update = rc.watch_progress(
        kube, kube.read_experiment("default", "exp"), NOW, client=FakeMlflow(RunProgress("7", "run1", fresh))
    )
    rc.write_status(kube, "default", "exp", update)
    assert _cond(kube, "Progressing")["status"] == "True"


def test_watchdog_without_metrics_counts_from_running_start():
    kube = FakeKube()
    body = _running(kube, since="2026-01-01T11:55:00Z")
    rc.write_status(kube, "default", "exp", rc.watch_progress(kube, body, NOW, client=FakeMlflow(None)))
    assert _cond(kube, "Progressing")["status"] == "True"


def test_finished_experiment_gets_best_metric_and_languages_once():
    kube = FakeKube()
    _running(kube, since="2026-01-01T11:00:00Z")
    job = {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}
    rc.write_status(kube, "default", "exp", rc.mirror_rayjob(job, deleted=False))
    metrics = {"xquad_r/multi/map": 0.5, "xquad_r/multi/map/de": 0.6, "xquad_r/multi/map/sw": 0.3}
    body = kube.read_experiment("default", "exp")
    assert rc.needs_watch(body["status"])
    rc.write_status(
        kube,
        "default",
        "exp",
        rc.watch_progress(kube, body, NOW, client=FakeMlflow(RunProgress("7", "r", 1, metrics))),
    )
    status = _status(kube)
    assert status["best"] == {"metric": "xquad_r/multi/map", "value": 0.5}
    assert status["languages"] == {"de": 0.6, "sw": 0.3} and not rc.needs_watch(status)


def test_deleting_a_running_experiment_kills_its_mlflow_run(monkeypatch):
    kube = FakeKube()
    _running(kube, since="2026-01-01T11:00:00Z")
    kube.objects[("rexp", "default", "exp")]["status"]["mlflow"] = {"runId": "r9"}
    killed = []
    monkeypatch.setattr(rc.Mlflow, "kill_run", lambda self, run_id, end_ms: killed.append(run_id))
    assert rc.close_mlflow_run(kube, kube.read_experiment("default", "exp"), NOW)
    assert killed == ["r9"]


# --- fuzz: random specs never crash the handlers -------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**9) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_sections = st.sampled_from(
    [
        "model",
        "data",
        "sampling",
        "loss",
        "optimization",
        "distributed",
        "evaluation",
        "tracking",
        "sweep",
        "cluster",
        "storage",
        "deadlines",
        "suspend",
        "ttlSecondsAfterFinished",
        "outputDir",
        "junk",
    ]
)
_known = st.fixed_dictionaries(
    {},
    optional={
        "sampling": st.fixed_dictionaries(
            {"strategy": st.sampled_from(["xx", "xy", "hybrid", "mixed", "nope"])},
            optional={"alpha": st.floats(-1, 2, allow_nan=False)},
        ),
        "data": st.fixed_dictionaries(
            {"languages": st.lists(st.sampled_from(["en", "de", "sw", "EN", ""]), max_size=3)}
        ),
        "distributed": st.fixed_dictionaries(
            {}, optional={"numWorkers": st.integers(-1, 9), "gpusPerWorker": st.integers(-1, 9)}
        ),
        "optimization": st.fixed_dictionaries({}, optional={"globalBatchSize": st.integers(-1, 64)}),
        "cluster": st.fixed_dictionaries(
            {},
            optional={
                "workerGroups": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5)}), max_size=2)
            },
        ),
        "storage": st.fixed_dictionaries(
            {"checkpointUri": st.sampled_from(["pvc://c", "s3://b/p", "x", ""])}
        ),
        "suspend": _json,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(known=_known, extra=st.dictionaries(_sections, _json, max_size=3), replace=st.booleans())
def test_fuzz_random_specs_never_crash(known, extra, replace):
    kube = FakeKube()
    body = experiment(**known)
    if replace:
        body["spec"] = {**body["spec"], **extra}
    kube.add_experiment(body)
    _reconcile(kube)
    validated = _cond(kube, "Validated")
    created = ("rayjob", "default", "exp") in kube.objects
    assert (validated["status"] == "True") == created
    if not created:
        if validated["reason"] == "InvalidSpec":
            assert validated["message"].startswith("default/exp: invalid")
        else:  # valid, but refused by the cluster checks or the preflight: they name the field too
            assert validated["message"].startswith("spec."), validated
        assert _status(kube)["phase"] == "Invalid"


@settings(max_examples=60, deadline=None)
@given(spec=st.one_of(st.none(), _json, st.dictionaries(_sections, _json, max_size=5)))
def test_fuzz_non_mapping_specs_are_reported(spec):
    kube = FakeKube()
    body = experiment()
    body["spec"] = spec
    kube.add_experiment(body)
    _reconcile(kube)
    assert _cond(kube, "Validated")["status"] == "False"


def test_ready_summarises_why_not_and_progress_counts_steps():
    """``kubectl get rexp`` shows Progress (step of maxSteps) and Reason (Ready's): Ready is False with the
    reason of what the experiment waits for or what went wrong, and True once it succeeded."""
    kube = FakeKube()
    body = _running(kube, since="2026-01-01T11:55:00Z")
    ready = _cond(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "JobRunning")
    report = RunProgress("7", "run1", int(NOW.timestamp() * 1000), {}, step=5)
    rc.write_status(kube, "default", "exp", rc.watch_progress(kube, body, NOW, client=FakeMlflow(report)))
    steps = parse_experiment(body).spec.optimization.max_steps
    assert _status(kube)["progress"] == f"5/{steps}"
    failed = {"status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"}}
    rc.write_status(kube, "default", "exp", rc.mirror_rayjob(failed, deleted=False))
    ready = _cond(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AppFailed")
    kube = FakeKube()
    _running(kube, since="2026-01-01T11:55:00Z")
    done = {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}
    events = rc.write_status(kube, "default", "exp", rc.mirror_rayjob(done, deleted=False))
    ready = _cond(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "JobSucceeded")
    assert all("Ready" not in e.message for e in events), "Ready posts no events of its own"


def test_the_crd_prints_progress_reason_and_the_mlflow_run():
    from xling.operator.crd import PRINTER_COLUMNS

    paths = {c["name"]: c["jsonPath"] for c in PRINTER_COLUMNS}
    assert paths["Progress"] == ".status.progress"
    assert paths["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert paths["MLflow"] == ".status.mlflow.runUrl"
