"""The pods of a RayJob (issue 22): per-role settings (head, workers, submitter), tainted GPU nodes, the
submitter's template, workers freed when the job ends, a gs:// key as a file, the job API behind a token and no
API token in Ray pods. Every RayJob is checked against KubeRay v1.7.0's schema and its CEL rules."""

from __future__ import annotations

import datetime

import jsonschema
import pytest
import yaml

from tests.operator.test_reconcile import FakeKube, _cond, _edit_spec, _reconcile
from tests.support import FIXTURES, ROOT
from tests.support.k8s_emulator import experiment, restricted_violations
from tests.support.k8s_schema import cel_failures
from xling.operator import manifests as mf
from xling.operator import reconcile as rc
from xling.operator.checks import cluster_problems
from xling.operator.defaults import Platform
from xling.operator.render import render

OWNER = mf.Owner("exp", "team-a", "0f0f0f0f-1111-2222-3333-444455556666")
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def kuberay_schema() -> dict:
    crd = yaml.load(
        (FIXTURES / "kuberay" / "ray.io_rayjobs.yaml").read_text(),
        Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader),
    )
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _job(kuberay_schema: dict, **spec) -> dict:
    job = mf.rayjob(mf.validate(experiment(**spec)), OWNER)
    errors = list(jsonschema.Draft7Validator(kuberay_schema).iter_errors(job))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]
    assert not cel_failures(kuberay_schema, job)
    return job


def _pods(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return {
        "head": cluster["headGroupSpec"]["template"]["spec"],
        **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]},
        "submitter": job["spec"]["submitterPodTemplate"]["spec"],
    }


def test_each_role_gets_the_shared_settings_plus_its_own(kuberay_schema):
    pod = {
        "imagePullSecrets": ["regcred"],
        "tolerations": [{"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}],
        "nodeSelector": {"zone": "a"},
        "affinity": {"podAntiAffinity": {}},
        "serviceAccountName": "ray",
        "head": {"nodeSelector": {"pool": "cpu"}, "affinity": {"nodeAffinity": {}}},
        "workers": {
            "tolerations": [GPU_TAINT],
            "nodeSelector": {"pool": "h100"},
            "imagePullSecrets": ["gpu"],
        },
        "submitter": {"serviceAccountName": "submitter", "securityContext": {"runAsNonRoot": True}},
    }
    job = _job(kuberay_schema, distributed={"numWorkers": 8, "gpusPerWorker": 1}, cluster={"pod": pod})
    head, workers, submitter = (_pods(job)[k] for k in ("head", "workers", "submitter"))
    team = {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}
    assert head["nodeSelector"] == {"zone": "a", "pool": "cpu"} and head["tolerations"] == [team]
    assert head["affinity"] == {"nodeAffinity": {}} and head["serviceAccountName"] == "ray"
    assert workers["nodeSelector"] == {"zone": "a", "pool": "h100"}
    assert workers["tolerations"] == [team, GPU_TAINT]  # the role's GPU toleration, once
    assert workers["affinity"] == {"podAntiAffinity": {}}
    assert workers["imagePullSecrets"] == [{"name": "regcred"}, {"name": "gpu"}]
    assert submitter["serviceAccountName"] == "submitter"
    assert submitter["securityContext"] == {"runAsNonRoot": True}
    assert submitter["imagePullSecrets"] == [{"name": "regcred"}] and submitter["nodeSelector"] == {
        "zone": "a"
    }


def test_gpu_pods_tolerate_their_gpu_taint_and_cpu_pods_do_not(kuberay_schema):
    gpu = _pods(_job(kuberay_schema, distributed={"numWorkers": 8, "gpusPerWorker": 1}))
    assert gpu["workers"]["tolerations"] == [GPU_TAINT]
    assert "tolerations" not in gpu["head"] and "tolerations" not in gpu["submitter"]
    cpu = _pods(_job(kuberay_schema))
    assert "tolerations" not in cpu["workers"]


def test_the_submitter_is_a_restricted_pod_of_the_trainer_image(kuberay_schema):
    job = _job(kuberay_schema, cluster={"image": "reg.example/xling:1"})
    template = job["spec"]["submitterPodTemplate"]
    (box,) = template["spec"]["containers"]
    assert box["image"] == "reg.example/xling:1" and "command" not in box  # KubeRay fills in `ray job submit`
    assert template["spec"]["restartPolicy"] == "Never"
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == mf.MANAGED_BY
    for role, pod in _pods(job).items():
        assert restricted_violations({"spec": pod}) == [], role


def test_ray_pods_mount_no_api_token_unless_asked(kuberay_schema):
    pods = _pods(_job(kuberay_schema))
    assert {role: pod["automountServiceAccountToken"] for role, pod in pods.items()} == dict.fromkeys(
        pods, False
    )
    asked = _pods(_job(kuberay_schema, cluster={"pod": {"workers": {"automountServiceAccountToken": True}}}))
    assert asked["workers"]["automountServiceAccountToken"] is True
    assert asked["head"]["automountServiceAccountToken"] is False


def test_the_job_api_demands_a_token(kuberay_schema):
    cluster = _job(kuberay_schema)["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    major, minor = (int(p) for p in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)  # KubeRay refuses token authentication below Ray 2.52


def test_finished_clusters_free_their_gpus_at_once(kuberay_schema):
    spec = _job(kuberay_schema)["spec"]
    assert (spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"]) == (True, 0)
    assert "deletionStrategy" not in spec


def test_keeping_the_head_for_logs_deletes_the_workers_at_once(kuberay_schema):
    spec = _job(kuberay_schema, ttlSecondsAfterFinished=600)["spec"]
    # KubeRay: deletionRules exclude shutdownAfterJobFinishes (and so a TTL of its own)
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec
    rules = {
        (
            tuple(sorted(r["condition"].items() - {("ttlSeconds", r["condition"]["ttlSeconds"])})),
            r["policy"],
        ): r["condition"]["ttlSeconds"]
        for r in spec["deletionStrategy"]["deletionRules"]
    }
    for end in (
        (("jobStatus", "SUCCEEDED"),),
        (("jobStatus", "FAILED"),),
        (("jobDeploymentStatus", "Failed"),),
    ):
        assert rules[end, "DeleteWorkers"] == 0 and rules[end, "DeleteCluster"] == 600


def test_keeping_the_head_cannot_be_combined_with_suspend_or_kueue():
    for body in (
        experiment(ttlSecondsAfterFinished=600, suspend=True),
        experiment(ttlSecondsAfterFinished=600),
    ):
        if not body["spec"].get("suspend"):
            body["metadata"]["labels"] = {mf.KUEUE_QUEUE_LABEL: "gpus"}
        ((reason, message),) = cluster_problems(mf.validate(body), Platform())
        assert reason == "HeadKeptNotSuspendable" and message.startswith("spec.ttlSecondsAfterFinished: ")
        body["spec"]["ttlSecondsAfterFinished"] = 0
        assert not cluster_problems(mf.validate(body), Platform())


def test_a_running_experiment_that_keeps_its_head_is_not_suspended_but_an_older_one_is():
    kube = FakeKube()
    kube.add_experiment(experiment(ttlSecondsAfterFinished=600))
    _reconcile(kube)
    _edit_spec(kube, ttlSecondsAfterFinished=600, suspend=True)
    _reconcile(kube)
    cond = _cond(kube, "Validated")
    assert cond["reason"] == "HeadKeptNotSuspendable" and cond["message"].startswith(
        "spec.suspend: not applied"
    )
    assert kube.objects[("rayjob", "default", "exp")]["spec"]["suspend"] is False  # KubeRay would refuse it
    older = kube.objects[("rayjob", "default", "exp")]["spec"]  # as an earlier release made it (TTL 3600)
    del older["deletionStrategy"]
    older.update(shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=3600)
    _reconcile(kube)
    assert older["suspend"] is True and _cond(kube, "Validated")["status"] == "True"


def test_a_ray_too_old_for_token_auth_is_refused():
    ((reason, message),) = cluster_problems(
        mf.validate(experiment(cluster={"rayVersion": "2.51.1"})), Platform()
    )
    assert reason == "RayTooOld" and message.startswith("spec.cluster.rayVersion: '2.51.1'")
    assert not cluster_problems(mf.validate(experiment(cluster={"rayVersion": "2.52.0"})), Platform())


def test_a_gs_key_is_a_mounted_file_that_google_application_credentials_names(kuberay_schema):
    job = _job(kuberay_schema, storage={"checkpointUri": "gs://bucket/runs", "credentials": {"name": "gcs"}})
    for role in ("head", "workers"):
        pod = _pods(job)[role]
        (box,) = pod["containers"]
        env = {e["name"]: e for e in box["env"]}
        path = env["GOOGLE_APPLICATION_CREDENTIALS"]["value"]
        mount = next(m for m in box["volumeMounts"] if m["name"] == "gcs-key")
        volume = next(v for v in pod["volumes"] if v["name"] == "gcs-key")
        assert path == f"{mount['mountPath']}/{mf.GCS_KEY}" and mount["readOnly"] is True
        assert volume["secret"] == {"secretName": "gcs", "items": [{"key": "key.json", "path": "key.json"}]}
        assert "envFrom" not in box  # the key's content never becomes an environment variable
    s3 = _pods(_job(kuberay_schema, storage={"checkpointUri": "s3://b", "credentials": {"name": "s3"}}))
    assert s3["head"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3"}}]


def test_render_prints_every_object_in_full(tmp_path):
    """Head requests and limits, and the pods' security contexts, are shared objects in the builders: `xling
    render` writes each out where it occurs (no YAML anchors a reader must resolve)."""
    text = render(ROOT / "manifests" / "samples" / "multinode-gpu.yaml", defaults=None)
    assert "&id" not in text and "*id" not in text
    (_, job) = yaml.safe_load_all(text)
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "1",
        "memory": "1Gi",
    }


def test_a_job_never_submitted_is_ended_at_the_to_running_deadline():
    """KubeRay stops the pre-running deadline once the submitter exists; the watchdog ends a RayJob whose
    submitter never submits (a refused or unpullable pod) instead of letting it hold its GPUs."""
    now = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
    kube = FakeKube()
    kube.add_experiment(experiment(deadlines={"toRunningSeconds": 600}))
    _reconcile(kube)
    job = kube.objects[("rayjob", "default", "exp")]

    def look(start: str, **status: str) -> None:
        job["status"] = {"jobDeploymentStatus": "Running", "startTime": start, **status}
        rc.resync(kube, kube.read_experiment("default", "exp"), now)

    look("2026-01-01T11:55:00Z")  # 300 s: still within the deadline
    look("2026-01-01T11:00:00Z", jobStatus="RUNNING")  # submitted: KubeRay's own deadlines apply
    assert "activeDeadlineSeconds" not in job["spec"]
    look("2026-01-01T11:48:20Z")  # 700 s without a submitted job
    assert job["spec"]["activeDeadlineSeconds"] == 700
