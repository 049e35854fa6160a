"""What a real cluster needs from the operator (issue 17): shared storage, terminal phases that stay, a missing
KubeRay reported, pods shaped per GPU node, Kueue left alone, immutability of what the user set, level-based
mirroring, the privilege model, sweep-sized clusters and platform defaults. Against the in-memory fake API."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.operator.test_reconcile import NOW, FakeKube, FakeMlflow, _cond, _edit_spec, _reconcile, _status
from tests.support import FIXTURES, ROOT
from tests.support.k8s_emulator import experiment
from tests.support.k8s_schema import cel_failures
from xling.api.spec.base import SpecError
from xling.operator import conditions as cnd
from xling.operator import crd
from xling.operator import manifests as mf
from xling.operator import reconcile as rc
from xling.operator.cluster_sizing import worker_groups
from xling.operator.defaults import Platform
from xling.operator.progress import RunProgress
from xling.operator.render import render

KUBERAY_CRD = FIXTURES / "kuberay" / "ray.io_rayjobs.yaml"


def _job(kube: FakeKube, name: str = "exp") -> dict:
    return kube.objects[("rayjob", "default", name)]


def _mirror(kube: FakeKube, deploy: str, job: str | None, **extra) -> None:
    rj = _job(kube)
    rj["status"] = {"jobDeploymentStatus": deploy, "jobStatus": job, **extra}
    rc.write_status(kube, "default", "exp", rc.mirror_rayjob(rj, deleted=False))


# 1 --------------------------------------------------------------------------------------------------------


def test_multi_pod_run_without_shared_storage_is_refused_naming_the_field():
    kube = FakeKube()
    body = experiment()
    del body["spec"]["storage"]
    kube.add_experiment(body)
    events = _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert cond["status"] == "False" and cond["reason"] == "SharedStorageRequired"
    assert cond["message"].startswith("spec.storage: required") and "2 pods" in cond["message"]
    assert ("rayjob", "default", "exp") not in kube.objects and events[0].type == "Warning"


def test_a_model_only_xling_plan_knows_is_refused_before_any_gpu():
    kube = FakeKube()
    body = experiment(model={"name": "xling/xlm-roberta-30b"})
    kube.add_experiment(body)
    _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert cond["status"] == "False" and cond["reason"] == "PlanOnlyModel"
    assert cond["message"].startswith("spec.model.name: 'xling/xlm-roberta-30b' is not a built-in model")
    assert ("rayjob", "default", "exp") not in kube.objects
    for name in ("xling/tiny-random", "xling/multilingual-e5-small", "FacebookAI/xlm-roberta-large"):
        assert mf.validate(experiment(model={"name": name})).spec.model.plan_only() is None, name


def test_platform_storage_default_is_used_and_a_read_write_once_claim_is_refused():
    kube = FakeKube()
    body = experiment(storage={"checkpointUri": "pvc://ckpt/xling"})
    kube.add_experiment(body)
    kube.objects[("pvc", "default", "ckpt")] = {
        "metadata": {"name": "ckpt"},
        "spec": {"accessModes": ["ReadWriteOnce"]},
    }
    _reconcile(kube)
    assert _cond(kube, "Validated")["reason"] == "ClaimNotShared"
    assert ("rayjob", "default", "exp") not in kube.objects

    kube = FakeKube()
    body = experiment()
    del body["spec"]["storage"]
    kube.add_experiment(body)
    platform = Platform(spec={"storage": {"checkpointUri": "s3://platform-ckpt/xling"}})
    update = rc.reconcile(kube, kube.read_experiment("default", "exp"), platform)
    assert update.conditions[0].status == "True"
    doc = yaml.safe_load(kube.objects[("cm", "default", "exp-spec")]["data"][mf.SPEC_KEY])
    assert doc["spec"]["outputDir"] == "s3://platform-ckpt/xling/exp"


# 2 --------------------------------------------------------------------------------------------------------


def test_finished_experiment_stays_finished_when_kuberay_deleted_its_rayjob():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    _mirror(kube, "Complete", "SUCCEEDED")
    del kube.objects[("rayjob", "default", "exp")]  # KubeRay's DELETE_RAYJOB_CR_AFTER_JOB_FINISHES
    _reconcile(kube)  # the operator restarts: @kopf.on.resume
    assert _status(kube)["phase"] == "Succeeded" and _cond(kube, "Failed")["status"] == "False"
    assert ("rayjob", "default", "exp") not in kube.objects  # and never re-runs the training


# 3 --------------------------------------------------------------------------------------------------------


def test_missing_kuberay_is_reported_and_retried_until_installed():
    kube = FakeKube()
    kube.kuberay_missing = True
    kube.add_experiment(experiment())
    update = rc.reconcile(kube, kube.read_experiment("default", "exp"))
    assert update.retry_after == rc.KUBERAY_RETRY_SECONDS
    events = rc.write_status(kube, "default", "exp", update, now="t")
    cond = _cond(kube, "ClusterReady")
    assert cond["status"] == "False" and cond["reason"] == "KubeRayNotInstalled"
    assert ("Warning", "KubeRayNotInstalled") in [(e.type, e.reason) for e in events]
    kube.kuberay_missing = False  # KubeRay installed; kopf runs the handler again after retry_after
    update = rc.reconcile(kube, kube.read_experiment("default", "exp"))
    rc.write_status(kube, "default", "exp", update, now="t")
    assert update.retry_after is None and ("rayjob", "default", "exp") in kube.objects
    assert _cond(kube, "ClusterReady")["reason"] == "Pending"


# 4 --------------------------------------------------------------------------------------------------------


def test_cluster_env_and_env_from_reach_every_pod():
    exp = mf.validate(
        experiment(
            cluster={
                "env": [
                    {"name": "HF_ENDPOINT", "value": "https://hf-mirror.internal"},
                    {"name": "HF_TOKEN", "secretKeyRef": {"name": "hf", "key": "token"}},
                ],
                "envFrom": [{"name": "extra"}],
            }
        )
    )
    spec = mf.rayjob(exp, mf.Owner("exp", "default", "u"))["spec"]["rayClusterSpec"]
    for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        box = pod["template"]["spec"]["containers"][0]
        assert {"name": "HF_ENDPOINT", "value": "https://hf-mirror.internal"} in box["env"]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in box[
            "env"
        ]
        assert {"secretRef": {"name": "extra"}} in box["envFrom"]
        assert not any(e["name"] == "HF_HUB_OFFLINE" for e in box["env"])
    with pytest.raises(SpecError, match="exactly one of value, secretKeyRef"):
        mf.validate(experiment(cluster={"env": [{"name": "X"}]}))


# 5 --------------------------------------------------------------------------------------------------------


def test_platform_image_is_injected_and_the_cr_wins():
    platform = Platform(spec={"cluster": {"image": "registry.example/xling-trainer:0.1.0"}})

    def box(exp):
        head = mf.rayjob(exp, mf.Owner("exp", "d", "u"))["spec"]["rayClusterSpec"]["headGroupSpec"]
        return head["template"]["spec"]["containers"][0]

    assert box(platform.experiment(experiment()))["image"] == "registry.example/xling-trainer:0.1.0"
    mine = experiment(cluster={"image": "mine:1"})
    assert box(platform.experiment(mine))["image"] == "mine:1"


def test_platform_credentials_never_follow_a_user_chosen_location():
    platform = Platform(
        spec={"storage": {"checkpointUri": "s3://platform", "credentials": {"name": "platform-s3"}}}
    )
    exp = platform.experiment(experiment(storage={"checkpointUri": "s3://mine"}))
    assert exp.spec.storage.credentials is None
    exp = platform.experiment(
        {**experiment(), "spec": {k: v for k, v in experiment()["spec"].items() if k != "storage"}}
    )
    assert exp.spec.storage.credentials.name == "platform-s3"


def test_cluster_ready_says_why_the_cluster_is_not_up():
    status = {
        "jobDeploymentStatus": "Initializing",
        "rayClusterStatus": {
            "conditions": [
                {
                    "type": "RayClusterProvisioned",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu",
                },  # fmt: skip
                {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady"},
            ]
        },
    }
    ready = next(c for c in cnd.from_rayjob(status) if c.type == "ClusterReady")
    assert ready.status == "False" and "Insufficient nvidia.com/gpu" in ready.message and ready.warning
    assert "HeadPodReady" not in ready.message
    quiet = next(
        c for c in cnd.from_rayjob({"jobDeploymentStatus": "Initializing"}) if c.type == "ClusterReady"
    )
    assert not quiet.warning


# 6 is in tests/operator/test_resume.py (real MLflow) ---------------------------------------------------------


# 7 --------------------------------------------------------------------------------------------------------


def test_kueue_may_suspend_the_rayjob_the_operator_only_applies_user_changes():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    _job(kube)["spec"]["suspend"] = True  # Kueue holds the job until quota is free
    kube.calls.clear()
    _reconcile(kube)
    assert "patch rayjob" not in kube.calls and _job(kube)["spec"]["suspend"] is True
    _edit_spec(kube, deadlines={"totalSeconds": 99})  # a user change: only that field is patched
    _reconcile(kube)
    assert _job(kube)["spec"]["activeDeadlineSeconds"] == 99 and _job(kube)["spec"]["suspend"] is True
    _job(kube)["spec"]["suspend"] = False  # Kueue admits it
    _edit_spec(kube, deadlines={"totalSeconds": 99}, suspend=True)  # the user suspends
    _reconcile(kube)
    assert _job(kube)["spec"]["suspend"] is True


# 8 --------------------------------------------------------------------------------------------------------


def test_an_immutable_edit_is_refused_but_suspend_is_still_applied():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    _edit_spec(kube, suspend=True, model={"name": "other"})
    _reconcile(kube)
    assert _cond(kube, "Validated")["reason"] == "ImmutableFieldChanged"
    assert _job(kube)["spec"]["suspend"] is True


def test_a_default_added_by_a_new_release_is_not_an_edit():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    cm = kube.objects[("cm", "default", "exp-spec")]
    # the next release's CRD defaults a field the old one did not have; the API server fills it in
    obj = kube.objects[("rexp", "default", "exp")]
    obj["spec"]["loss"] = {"temperature": 0.05, "symmetric": False}
    obj["metadata"]["generation"] += 1
    assert "loss" not in json.loads(cm["metadata"]["annotations"][mf.USER_SPEC_ANNOTATION])
    _reconcile(kube)
    assert _cond(kube, "Validated")["status"] == "True"


def _schema() -> dict:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_the_api_server_refuses_immutable_edits_with_cel_and_allows_suspend():
    old = {**experiment(), "spec": rc._resolved(experiment()["spec"])}
    suspended = json.loads(json.dumps(old))
    suspended["spec"]["suspend"] = True
    suspended["spec"]["deadlines"] = {"totalSeconds": 5}
    assert cel_failures(_schema(), suspended, old) == []
    changed = json.loads(json.dumps(old))
    changed["spec"]["model"]["name"] = "other"
    assert any("spec.model is immutable" in m for m in cel_failures(_schema(), changed, old))
    removed = json.loads(json.dumps(old))
    del removed["spec"]["storage"]
    assert any("spec.storage is immutable" in m for m in cel_failures(_schema(), removed, old))


# 9 --------------------------------------------------------------------------------------------------------


def test_a_name_with_a_leading_digit_is_refused_by_spec_and_crd():
    with pytest.raises(SpecError, match="metadata.name"):
        mf.validate(experiment(name="1exp"))
    body = {**experiment(name="1exp"), "spec": rc._resolved(experiment()["spec"])}
    assert any("DNS-1035" in m for m in cel_failures(_schema(), body))
    assert not any("DNS-1035" in m for m in cel_failures(_schema(), {**body, "metadata": {"name": "exp1"}}))


# 10 -------------------------------------------------------------------------------------------------------


def test_multinode_gpu_sample_renders_to_the_documented_pod_shape():
    text = render(ROOT / "manifests" / "samples" / "multinode-gpu.yaml", namespace="ml")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "#   group workers: 2 pod(s) x (64 CPU, 512Gi, 8 nvidia.com/gpu), 8 rank(s) each" in header
    cm, job = list(yaml.safe_load_all(text))
    crd_doc = yaml.safe_load(KUBERAY_CRD.read_text())
    schema = next(v for v in crd_doc["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(job))
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-gpus": "0", "num-cpus": "0"}
    assert any(v["name"] == "dshm" for v in head["template"]["spec"]["volumes"])
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    box = pod["containers"][0]
    assert box["resources"]["limits"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": 8}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in box["volumeMounts"]
    assert pod["priorityClassName"] == "training" and pod["securityContext"]["runAsNonRoot"] is True
    assert box["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert {"secretRef": {"name": "hf-token"}} in box["envFrom"] and {
        "secretRef": {"name": "xling-s3"}
    } in box["envFrom"]
    doc = yaml.safe_load(cm["data"][mf.SPEC_KEY])
    assert doc["spec"]["outputDir"] == "s3://xling-checkpoints/runs/multinode-gpu-e5-large"
    assert doc["spec"]["distributed"]["deepspeed"]["stage"] == "auto"  # resolved at run start, on the GPUs


def test_gpus_per_worker_above_one_and_partial_nodes_are_refused():
    kube = FakeKube()
    kube.add_experiment(experiment(distributed={"numWorkers": 2, "gpusPerWorker": 4}))
    _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert cond["reason"] == "GpusIdle" and "numWorkers: 8" in cond["message"]
    kube = FakeKube()
    kube.add_experiment(
        experiment(distributed={"numWorkers": 12, "gpusPerWorker": 1}, optimization={"globalBatchSize": 48})
    )
    _reconcile(kube)
    assert _cond(kube, "Validated")["reason"] == "PartialNode"


# 11 -------------------------------------------------------------------------------------------------------


def test_a_lost_rayjob_event_is_caught_by_the_periodic_resync():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    _mirror(kube, "Running", "RUNNING")
    _job(kube)["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}  # event lost
    assert _status(kube)["phase"] == "Running"
    rc.write_status(kube, "default", "exp", rc.resync(kube, kube.read_experiment("default", "exp")))
    assert _status(kube)["phase"] == "Succeeded"
    assert rc.resync(kube, kube.read_experiment("default", "exp")) is None  # terminal: nothing more to read


# 12 -------------------------------------------------------------------------------------------------------


def test_credentials_only_from_opted_in_secrets_and_to_allowed_hosts():
    kube = FakeKube()
    tracking = {"trackingUri": "http://mlflow:5000", "credentials": {"name": "team-secret"}}
    kube.add_secret("team-secret", {"MLFLOW_TRACKING_TOKEN": "t"}, opted_in=False)
    exp = mf.validate(experiment(tracking=tracking))
    assert rc.tracking_credentials(kube, "default", exp, Platform()) == {}
    assert rc.tracking_credentials(
        kube, "default", exp, Platform(allowed_secrets=frozenset({"team-secret"}))
    ) == {"MLFLOW_TRACKING_TOKEN": "t"}
    kube.add_secret("team-secret", {"MLFLOW_TRACKING_TOKEN": "t"}, opted_in=True)
    assert rc.tracking_credentials(kube, "default", exp, Platform()) == {"MLFLOW_TRACKING_TOKEN": "t"}
    elsewhere = Platform(allowed_tracking_hosts=frozenset({"xling-mlflow.xling.svc"}))
    assert rc.tracking_credentials(kube, "default", exp, elsewhere) == {}
    kube.add_experiment(experiment(tracking=tracking))
    rc.write_status(
        kube, "default", "exp", rc.reconcile(kube, kube.read_experiment("default", "exp"), elsewhere)
    )
    assert _cond(kube, "Validated")["reason"] == "TrackingHostNotAllowed"


def test_preflight_reports_a_missing_secret_before_any_pod():
    kube = FakeKube()
    kube.add_experiment(experiment(cluster={"envFrom": [{"name": "hf-token"}]}))
    _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert cond["reason"] == "SecretNotFound" and "'hf-token'" in cond["message"]
    kube.add_secret("hf-token", {"HF_TOKEN": "x"}, opted_in=False)
    _reconcile(kube)
    assert ("rayjob", "default", "exp") in kube.objects


def test_preflight_refuses_a_gpu_run_no_node_can_take():
    kube = FakeKube()
    kube.nodes = {"cpu", "memory"}
    kube.add_experiment(experiment(distributed={"numWorkers": 8, "gpusPerWorker": 1}))
    _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert cond["reason"] == "GpuResourceNotFound" and "nvidia.com/gpu" in cond["message"]
    kube.nodes |= {"nvidia.com/gpu"}
    _reconcile(kube)
    assert ("rayjob", "default", "exp") in kube.objects


# 13 -------------------------------------------------------------------------------------------------------


def test_a_sweep_gets_a_cluster_for_its_concurrent_trials(tmp_path):
    sweep = {
        "parameters": {"sampling.alpha": {"grid": [0.0, 0.25, 0.5, 0.75]}},
        "seeds": [0, 1],
        "maxConcurrentTrials": 4,
        "metric": "train/loss",
        "mode": "min",
    }
    spec = {
        "sweep": sweep,
        "distributed": {"numWorkers": 8, "gpusPerWorker": 1},
        "optimization": {"globalBatchSize": 64},
    }
    exp = mf.validate(experiment(**spec))
    (group,) = worker_groups(exp.spec)
    assert (group.replicas, group.gpus) == (4, 8)  # 4 trials x one 8-GPU pod each
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(experiment(**spec)))
    assert "#   sweep: 8 trial(s), 4 at once (32 GPUs at once), 2 round(s)" in render(path)
    cpu = mf.validate(experiment(sweep=sweep, distributed={"numWorkers": 2, "cpusPerWorker": 2}))
    (group,) = worker_groups(cpu.spec)
    assert (group.replicas, group.cpu) == (8, "3")  # 4 trials x 2 ranks; +1 CPU for the trial drivers


# 14 -------------------------------------------------------------------------------------------------------


def test_phase_stays_running_until_kuberay_reports_the_end():
    kube = FakeKube()
    kube.add_experiment(experiment())
    _reconcile(kube)
    _mirror(kube, "Running", "RUNNING")
    _mirror(kube, "Running", "SUCCEEDED")  # the Ray job ended; KubeRay has not written Complete yet
    assert _status(kube)["phase"] == "Running"


def test_no_progress_watchdog_is_off_when_set_to_null():
    kube = FakeKube()
    kube.add_secret("mlflow", {"MLFLOW_TRACKING_TOKEN": "t"})
    tracking = {"trackingUri": "http://mlflow:5000", "credentials": {"name": "mlflow"}}
    kube.add_experiment(experiment(tracking=tracking, deadlines={"noProgressSeconds": None}))
    _reconcile(kube)
    _mirror(kube, "Running", "RUNNING")
    body = kube.read_experiment("default", "exp")
    update = rc.watch_progress(kube, body, NOW, client=FakeMlflow(RunProgress("7", "r", 1, {})))
    assert not [c for c in update.conditions if c.type == "Progressing"]


# platform controls --------------------------------------------------------------------------------------


def test_platform_defaults_file_is_checked_and_empty_defaults_keep_platform_lists(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump({"spec": {"sampling": {"alpha": 1.0}}}))
    with pytest.raises(SpecError, match="spec.sampling: not a platform default"):
        Platform.load(path)
    path.write_text(
        yaml.safe_dump(
            {
                "spec": {"cluster": {"pod": {"imagePullSecrets": ["regcred"], "priorityClassName": "batch"}}},
                "allowedSecrets": ["mlflow"],
            }
        )
    )
    platform = Platform.load(path)
    # the API server fills the CRD's empty defaults into every spec; they must not erase the platform's list
    body = experiment(cluster={"pod": {"imagePullSecrets": [], "annotations": {"team": "a"}}})
    pod = platform.experiment(body).spec.cluster.pod
    assert pod.image_pull_secrets == ["regcred"] and pod.priority_class_name == "batch"
    assert pod.annotations == {"team": "a"} and platform.allowed_secrets == {"mlflow"}


def test_metrics_count_phases_and_time_to_running():
    from xling.operator.metrics import Metrics

    known = [("ns", "Running"), ("ns", "Running"), ("ns", ""), ("other", "Failed")]
    m = Metrics(phases=lambda: known)
    value = m.registry.get_sample_value
    assert value("xling_experiments", {"namespace": "ns", "phase": "Running"}) == 2
    assert value("xling_experiments", {"namespace": "ns", "phase": "Pending"}) == 1  # no phase written yet
    assert value("xling_experiments", {"namespace": "other", "phase": "Failed"}) == 1
    body = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Pending"}}
    m.observe(body, {"phase": "Running"})
    m.observe({**body, "status": {"phase": "Running"}}, {"phase": "Running"})
    assert value("xling_time_to_running_seconds_count") == 1
    known.pop()  # deleted: gone from the operator's index, so from the gauge
    assert value("xling_experiments", {"namespace": "other", "phase": "Failed"}) is None
