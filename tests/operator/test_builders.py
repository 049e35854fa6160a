"""Pure functions of the operator: manifests, conditions, MLflow summaries, render; RayJobs vs KubeRay's schema."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import FIXTURES, ROOT
from tests.support.k8s_emulator import experiment
from xling.operator import conditions as cnd
from xling.operator import manifests as mf
from xling.operator.progress import language_breakdown, summarize
from xling.operator.render import add_cli, render

KUBERAY_CRD = FIXTURES / "kuberay" / "ray.io_rayjobs.yaml"
OWNER = mf.Owner("exp", "team-a", "0f0f0f0f-1111-2222-3333-444455556666")


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.protocols.Validator:
    """KubeRay v1.7.0's own RayJob openAPIV3Schema (v1)."""
    crd = yaml.load(KUBERAY_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


def _exp(**spec):
    return mf.validate(experiment(**spec))


@pytest.fixture
def platform_defaults(tmp_path) -> Path:
    """What a platform's Helm values give every experiment: an image and shared checkpoint storage."""
    path = tmp_path / "defaults.yaml"
    spec = {
        "cluster": {"image": "registry.example/xling-trainer:0.1.0"},
        "storage": {"checkpointUri": "s3://ckpt"},
    }
    path.write_text(yaml.safe_dump({"spec": spec}))
    return path


def _assert_kuberay_valid(validator, job: dict) -> None:
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_rayjob_basics_and_owner():
    job = mf.rayjob(_exp(), OWNER)
    meta, spec = job["metadata"], job["spec"]
    assert meta["name"] == "exp" and meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "xling.io/v1alpha1",
            "kind": "RetrievalExperiment",
            "name": "exp",
            "uid": OWNER.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == mf.MANAGED_BY
    assert meta["labels"][mf.EXPERIMENT_LABEL] == "exp"
    assert spec["entrypoint"] == "xling run /etc/xling/experiment.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 0 and spec["suspend"] is False
    assert "activeDeadlineSeconds" not in spec and spec["preRunningDeadlineSeconds"] == 3600
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in head["template"]["spec"][
        "volumes"
    ]
    box = head["template"]["spec"]["containers"][0]
    assert {"name": "experiment", "mountPath": "/etc/xling", "readOnly": True} in box["volumeMounts"]
    assert {"name": "XLING_EXPERIMENT_UID", "value": OWNER.uid} in box["env"]
    assert head["template"]["spec"]["volumes"][0]["configMap"]["name"] == "exp-spec"


def test_deadlines_suspend_ttl_and_default_worker_group():
    exp = _exp(
        deadlines={"totalSeconds": 7200, "toRunningSeconds": 600},
        suspend=True,
        distributed={"numWorkers": 32, "gpusPerWorker": 1, "cpusPerWorker": 7.5},
        optimization={"globalBatchSize": 64},
    )
    spec = mf.rayjob(exp, OWNER)["spec"]
    assert (spec["activeDeadlineSeconds"], spec["preRunningDeadlineSeconds"]) == (7200, 600)
    assert spec["suspend"] is True and spec["ttlSecondsAfterFinished"] == 0
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    # 32 ranks of one GPU each: 4 pods (nodes) of 8 GPUs and 8 ranks, CPU and memory sized per GPU.
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 4, 4)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": 8, "cpu": "64", "memory": "512Gi"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in group["template"]["spec"]["volumes"]


def test_cluster_shape_storage_and_secrets(rayjob_validator):
    exp = _exp(
        cluster={
            "image": "registry.example/xling:1.2",
            "serviceAccountName": "trainer",
            "head": {"cpu": "4", "memory": "32Gi", "nodeSelector": {"pool": "cpu"}},
            "workerGroups": [
                {
                    "name": "h100",
                    "replicas": 2,
                    "gpus": 8,
                    "sharedMemory": "64Gi",
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                }
            ],
        },
        distributed={"numWorkers": 16, "gpusPerWorker": 1},
        storage={"checkpointUri": "pvc://ckpt/xling", "credentials": {"name": "s3"}},
        tracking={"trackingUri": "http://mlflow:5000", "credentials": {"name": "mlflow"}},
    )
    job = mf.rayjob(exp, OWNER)
    _assert_kuberay_valid(rayjob_validator, job)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "trainer"
    box = pod["containers"][0]
    assert box["image"] == "registry.example/xling:1.2"
    assert box["envFrom"] == [{"secretRef": {"name": "mlflow"}}, {"secretRef": {"name": "s3"}}]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in box["env"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    doc = yaml.safe_load(mf.configmap(exp, OWNER)["data"][mf.SPEC_KEY])
    assert doc["spec"]["outputDir"] == "/mnt/checkpoints/xling/exp"
    assert doc["kind"] == "RetrievalExperiment" and doc["metadata"] == {"name": "exp", "namespace": "team-a"}
    s3 = _exp(storage={"checkpointUri": "s3://bucket/runs/"})
    assert mf.output_dir(s3) == "s3://bucket/runs/exp"


def test_spec_rejects_inline_credentials_and_too_few_gpus():
    with pytest.raises(ValueError, match="tracking.credentials"):
        _exp(tracking={"trackingUri": "https://user:pw@mlflow.example"})
    with pytest.raises(ValueError, match="cluster.workerGroups"):
        _exp(
            distributed={"numWorkers": 4, "gpusPerWorker": 2},
            cluster={"workerGroups": [{"name": "g", "gpus": 2}]},
        )


def test_names_are_deterministic_and_short():
    long = "x" * 63
    assert mf.rayjob_name(long) == mf.rayjob_name(long)
    assert len(mf.rayjob_name(long)) <= mf.MAX_RAYJOB_NAME
    assert mf.rayjob_name("a" * 40 + "-" + "b" * 22) != mf.rayjob_name("a" * 40 + "-" + "c" * 22)
    assert mf.configmap_name("exp") == "exp-spec"


def test_user_labels_pass_through_but_ours_win():
    body = experiment()
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu", "app.kubernetes.io/managed-by": "me"}
    labels = mf.rayjob(mf.validate(body), OWNER)["metadata"]["labels"]
    assert (
        labels["kueue.x-k8s.io/queue-name"] == "gpu"
        and labels["app.kubernetes.io/managed-by"] == mf.MANAGED_BY
    )


def test_immutable_changes_name_paths_and_ignore_mutable_fields():
    a = mf.resolved_document(_exp(), OWNER)["spec"]
    b = mf.resolved_document(_exp(suspend=True, deadlines={"totalSeconds": 5}), OWNER)["spec"]
    c = mf.resolved_document(_exp(model={"name": "other"}, sampling={"alpha": 0.9}), OWNER)["spec"]
    assert mf.immutable_changes(a, b) == []
    assert mf.immutable_changes(a, c) == ["spec.model.name", "spec.sampling.alpha"]


@pytest.mark.parametrize(
    "sample", sorted((ROOT / "manifests" / "samples").glob("*.yaml")), ids=lambda p: p.name
)
def test_samples_render_to_valid_rayjobs(sample, rayjob_validator, platform_defaults):
    text = render(sample, namespace="ns1", defaults=platform_defaults)
    cm, job = list(yaml.safe_load_all(text))
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "ns1"
    _assert_kuberay_valid(rayjob_validator, job)


def _names():
    return st.from_regex(r"^[a-z][a-z0-9-]{0,61}[a-z0-9]$", fullmatch=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_names(),
    workers=st.integers(1, 8),
    gpus=st.integers(0, 8),
    groups=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 8)), max_size=3),
    deadline=st.one_of(st.none(), st.integers(1, 10**6)),
    suspend=st.booleans(),
    storage=st.sampled_from([None, "pvc://claim", "pvc://claim/a/b", "s3://bucket/x"]),
)
def test_every_rayjob_validates_against_kuberay(
    rayjob_validator, name, workers, gpus, groups, deadline, suspend, storage
):
    spec = {
        "distributed": {"numWorkers": workers, "gpusPerWorker": gpus},
        "optimization": {"globalBatchSize": workers * 8},
        "suspend": suspend,
        "deadlines": {"totalSeconds": deadline, "toRunningSeconds": deadline},
    }
    if groups:
        spec["cluster"] = {
            "workerGroups": [
                {"name": f"g{i}", "replicas": r, "gpus": max(g, gpus)} for i, (r, g) in enumerate(groups)
            ]
        }
        spec["distributed"]["numWorkers"] = sum(r for r, _ in groups)
        spec["optimization"]["globalBatchSize"] = spec["distributed"]["numWorkers"] * 8
    if storage:
        spec["storage"] = {"checkpointUri": storage}
    body = experiment(name=name, uid=OWNER.uid, **spec)
    job = mf.rayjob(mf.validate(body), mf.Owner.from_body(body))
    _assert_kuberay_valid(rayjob_validator, job)
    assert len(job["metadata"]["name"]) <= mf.MAX_RAYJOB_NAME


def test_render_cli_roundtrip(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(name="cli")))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["render", str(path), "-n", "x"])
    assert args.func(args) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ConfigMap", "RayJob"]
    path.write_text(
        yaml.safe_dump(experiment(name="cli", sampling={"strategy": "xy"}, data={"languages": ["en"]}))
    )
    assert args.func(parser.parse_args(["render", str(path)])) == 2
    assert "sampling.strategy" in capsys.readouterr().err


# --- conditions -------------------------------------------------------------------------------------------


def test_merge_conditions_moves_transition_time_only_on_flips():
    conds, changed = cnd.merge_conditions([], [cnd.Cond("Running", "False", "Pending")], 1, "t1")
    assert [c.type for c in changed] == ["Running"] and conds[0]["lastTransitionTime"] == "t1"
    conds, changed = cnd.merge_conditions(
        conds, [cnd.Cond("Running", "False", "ClusterInitializing", "m")], 2, "t2"
    )
    assert (
        changed == []
        and conds[0]["lastTransitionTime"] == "t1"
        and conds[0]["reason"] == "ClusterInitializing"
    )
    assert conds[0]["observedGeneration"] == 2
    conds, changed = cnd.merge_conditions(conds, [cnd.Cond("Running", "True", "JobRunning")], 2, "t3")
    assert len(changed) == 1 and conds[0]["lastTransitionTime"] == "t3"


@pytest.mark.parametrize(
    ("status", "expected", "phase"),
    [
        ({}, {"ClusterReady": "False", "Running": "False"}, "Initializing"),
        ({"jobDeploymentStatus": "Initializing"}, {"ClusterReady": "False"}, "Initializing"),
        (
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            {"ClusterReady": "True", "Running": "True"},
            "Running",
        ),
        ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, {"Running": "False"}, "Initializing"),
        # the submitter has not submitted anything (e.g. its pod is refused): not Running, however long
        ({"jobDeploymentStatus": "Running"}, {"ClusterReady": "True", "Running": "False"}, "Initializing"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, {"Succeeded": "True"}, "Succeeded"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, {"Failed": "True"}, "Failed"),
        ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, {"Failed": "True"}, "Failed"),
        ({"jobDeploymentStatus": "Suspended"}, {"Suspended": "True", "ClusterReady": "False"}, "Suspended"),
        ({"jobDeploymentStatus": "ValidationFailed"}, {"Failed": "True"}, "Failed"),
    ],
)
def test_rayjob_status_maps_to_conditions_and_phase(status, expected, phase):
    seed = [cnd.Cond("Validated", "True", "SpecValid")]
    conds, _ = cnd.merge_conditions([], seed + cnd.from_rayjob(status), 1, "t")
    got = {c["type"]: c["status"] for c in conds}
    assert {k: got[k] for k in expected} == expected
    assert cnd.phase_of(conds, status.get("jobDeploymentStatus") or "New") == phase


def test_failure_reason_and_message_are_copied():
    failed = cnd.from_rayjob(
        {"jobDeploymentStatus": "Failed", "reason": "PreRunningDeadlineExceeded", "message": "slow"}
    )
    (cond,) = [c for c in failed if c.type == "Failed"]
    assert (cond.reason, cond.message, cond.warning) == ("PreRunningDeadlineExceeded", "slow", True)


def test_phase_invalid_only_while_nothing_runs():
    bad = [{"type": "Validated", "status": "False"}]
    assert cnd.phase_of(bad, None) == "Invalid"
    assert cnd.phase_of(bad + [{"type": "Running", "status": "True"}], "Running") == "Running"


# --- MLflow summaries -------------------------------------------------------------------------------------


def test_summarize_uses_parent_metrics_and_newest_timestamp():
    runs = [
        {
            "info": {"run_id": "p", "start_time": 1},
            "data": {"metrics": [{"key": "m", "value": 0.5, "timestamp": 10}]},
        },
        {
            "info": {"run_id": "t1", "start_time": 2},
            "data": {
                "metrics": [{"key": "loss", "value": 1.0, "timestamp": 99}],
                "tags": [{"key": "mlflow.parentRunId", "value": "p"}],
            },
        },
    ]
    report = summarize("7", runs)
    assert (report.run_id, report.last_metric_ms, report.metrics) == ("p", 99, {"m": 0.5})


def test_language_breakdown():
    metrics = {
        "xquad_r/multi/map": 0.5,
        "xquad_r/multi/map/de": 0.6,
        "xquad_r/multi/map/sw": 0.4,
        "xquad_r/multi/mrr/de": 0.1,
    }
    assert language_breakdown("xquad_r/multi/map", metrics) == {"de": 0.6, "sw": 0.4}


@pytest.mark.parametrize(
    ("modules", "banned"),
    [
        ("xling.operator.handlers, xling.operator.crd, xling.operator.__main__", "torch ray deepspeed"),
        # `xling render` also runs in the trainer image, which has no kopf
        ("xling.operator.render", "torch ray deepspeed kopf kubernetes"),
    ],
)
def test_operator_imports_stay_light(modules, banned):
    code = f"import sys, {modules}\nbad = [m for m in {banned.split()!r} if m in sys.modules]\nassert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
