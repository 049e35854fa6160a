"""The real kopf operator against the in-process API emulator, with a fake KubeRay controller and MLflow.

Each test starts the emulator and the operator (``kopf.operator`` with the handlers of xling.operator), then
drives RetrievalExperiments over HTTP the way kubectl would.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import kmock
import kopf
import pytest
import yaml

import xling.operator.handlers  # noqa: F401  (registers the handlers)
from tests.support import ROOT
from tests.support.k8s_emulator import Emulator, experiment, kubeconfig, kuberay_submitter_pod
from xling.operator import rbac
from xling.operator import reconcile as rc
from xling.operator.crd import GROUP, PLURAL, VERSION
from xling.operator.defaults import Platform

REXP = f"{GROUP}/{VERSION}/{PLURAL}"
RAYJOBS = "ray.io/v1/rayjobs"
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")
MERGE = {"Content-Type": "application/merge-patch+json"}


class Cluster:
    """The emulator plus helpers to act as a user (kubectl) and as KubeRay."""

    def __init__(self, k8s: Emulator, url: str) -> None:
        self.k8s, self.url = k8s, url

    def get(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        try:
            obj = self.k8s.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def all(self, resource: str) -> list[dict[str, Any]]:
        return [
            o.raw
            for k, o in self.k8s.objects.items()
            if k[0].plural == resource.rsplit("/", 1)[-1] and not o.deleted
        ]

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(REXP, name) or {}).get("status") or {}

    def cond(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def events(self, name: str) -> list[tuple[str, str]]:
        return [
            (e["type"], e["reason"]) for e in self.all("v1/events") if e["involvedObject"]["name"] == name
        ]

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> int:
        # A session per request: pooled connections opened before a kopf operator stopped in this loop hang.
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
            session.request(method, self.url + path, json=body, headers=headers) as resp,
        ):
            return resp.status

    async def create(self, body: dict[str, Any], expect: int = 201) -> None:
        ns = body["metadata"]["namespace"]
        assert await self.request("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}", body) == expect

    async def patch_spec(self, name: str, spec: dict[str, Any], expect: int = 200) -> None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/{name}"
        assert await self.request("PATCH", path, {"spec": spec}, MERGE) == expect

    async def delete(self, resource: str, name: str) -> None:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        assert await self.request("DELETE", f"{prefix}/namespaces/default/{plural}/{name}") == 200

    async def kuberay(self, name: str, **status: Any) -> None:
        """What the KubeRay controller would write into the RayJob's status."""
        path = f"/apis/ray.io/v1/namespaces/default/rayjobs/{name}/status"
        assert await self.request("PATCH", path, {"status": status}, MERGE) == 200

    def operator_calls(self) -> set[tuple[str, str, str]]:
        return self.k8s.requests_made(agents=OPERATOR_AGENTS)


async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)
    return result


@pytest.fixture
async def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    kuberay = getattr(request, "param", True)  # parametrize indirectly with False: a cluster without KubeRay
    async with Emulator(kuberay=kuberay) as k8s, kmock.Server(k8s, host="127.0.0.1") as srv:
        c = Cluster(k8s, str(srv.url).rstrip("/"))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(c.url, tmp_path / "kubeconfig")))
        yield c


@contextlib.asynccontextmanager
async def operator(
    c: Cluster,
    watchdog_interval: float = 60.0,
    platform: Platform | None = None,
    memo: kopf.Memo | None = None,
) -> AsyncIterator[None]:
    """Run the operator until the block ends; return once it watches both resources. ``memo``: to look into
    what the operator keeps (its metrics)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    memo = memo if memo is not None else kopf.Memo()
    memo.update(watchdog_interval=watchdog_interval, platform=platform or Platform())
    task = asyncio.create_task(
        kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready, memo=memo)
    )
    watching = {("watch", GROUP, PLURAL)} | ({("watch", "ray.io", "rayjobs")} if c.k8s.kuberay else set())
    before = len(c.k8s.log)
    await until(lambda: watching <= c.k8s.requests_made(since=before), 20, "the operator to watch")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@contextlib.asynccontextmanager
async def fake_mlflow(metrics: list[dict[str, Any]]) -> AsyncIterator[str]:
    """An MLflow REST stand-in with one experiment and one parent run carrying ``metrics``."""

    async def by_name(request: aiohttp.web.Request) -> aiohttp.web.Response:
        assert request.headers["Authorization"] == "Bearer s3cret"
        return aiohttp.web.json_response({"experiment": {"experiment_id": "7"}})

    async def search(request: aiohttp.web.Request) -> aiohttp.web.Response:
        run = {"info": {"run_id": "run1", "start_time": 1}, "data": {"metrics": metrics}}
        return aiohttp.web.json_response({"runs": [run]})

    app = aiohttp.web.Application()
    app.router.add_get("/api/2.0/mlflow/experiments/get-by-name", by_name)
    app.router.add_post("/api/2.0/mlflow/runs/search", search)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_full_lifecycle_and_recorded_api_calls_match_rbac(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    old = int((time.time() - 3600) * 1000)
    metrics = [
        {"key": "xquad_r/multi/map", "value": 0.5, "timestamp": old},
        {"key": "xquad_r/multi/map/de", "value": 0.6, "timestamp": old},
        {"key": "xquad_r/multi/map/sw", "value": 0.4, "timestamp": old},
    ]
    async with fake_mlflow(metrics) as mlflow_url, operator(c, watchdog_interval=0.2):
        secret = {  # opted in: the operator reads only Secrets labelled so (or named in its Helm values)
            "metadata": {"name": "mlflow", "namespace": "default", "labels": {rc.SECRET_OPT_IN: "true"}},
            "data": {"MLFLOW_TRACKING_TOKEN": "czNjcmV0"},
        }
        assert await c.request("POST", "/api/v1/namespaces/default/secrets", secret) == 201
        claim = {
            "metadata": {"name": "ckpt", "namespace": "default"},
            "spec": {"accessModes": ["ReadWriteMany"]},
        }
        assert await c.request("POST", "/api/v1/namespaces/default/persistentvolumeclaims", claim) == 201
        tracking = {"trackingUri": mlflow_url, "credentials": {"name": "mlflow"}}
        storage = {"checkpointUri": "pvc://ckpt/xling"}
        await c.create(
            experiment("life", tracking=tracking, storage=storage, deadlines={"noProgressSeconds": 60})
        )
        job = await until(lambda: c.get(RAYJOBS, "life"), what="the RayJob")
        cm = c.get("v1/configmaps", "life-spec")
        owner = c.get(REXP, "life")
        for child in (job, cm):
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["uid"], ref["kind"], ref["controller"]) == (
                owner["metadata"]["uid"],
                "RetrievalExperiment",
                True,
            )
        # a GPU run on a cluster whose nodes offer no GPUs is refused before anything is created
        gpu = experiment("gpu", distributed={"numWorkers": 8, "gpusPerWorker": 1})
        await c.create(gpu)
        await until(lambda: c.cond("gpu", "Validated").get("reason") == "GpuResourceNotFound")
        assert c.get(RAYJOBS, "gpu") is None
        await until(lambda: c.status("life").get("phase") == "Pending")
        await until(lambda: c.cond("life", "Validated").get("status") == "True")

        await c.kuberay("life", jobDeploymentStatus="Initializing", rayClusterName="life-raycluster-x")
        await until(lambda: c.status("life").get("phase") == "Initializing")
        await until(
            lambda: ("list", "", "pods") in c.operator_calls(), what="the watchdog's look at the pods"
        )
        await c.kuberay(
            "life", jobDeploymentStatus="Running", jobStatus="RUNNING", dashboardURL="life-head-svc:8265"
        )
        await until(lambda: c.cond("life", "Running").get("status") == "True")
        assert c.status("life")["dashboardUrl"] == "http://life-head-svc:8265"
        # the watchdog: MLflow's newest metric is an hour old -> Progressing=False, with the MLflow links
        await until(lambda: c.cond("life", "Progressing").get("reason") == "NoProgress", what="the watchdog")
        assert c.status("life")["mlflow"]["runUrl"] == f"{mlflow_url}/#/experiments/7/runs/run1"

        await c.patch_spec("life", {"suspend": True})
        await until(lambda: (c.get(RAYJOBS, "life") or {}).get("spec", {}).get("suspend") is True)
        await c.kuberay("life", jobDeploymentStatus="Suspended", jobStatus=None)
        await until(lambda: c.status("life").get("phase") == "Suspended")
        await c.patch_spec("life", {"suspend": False})
        await until(lambda: c.get(RAYJOBS, "life")["spec"]["suspend"] is False)
        await c.kuberay("life", jobDeploymentStatus="Running", jobStatus="RUNNING")
        await until(lambda: c.status("life").get("phase") == "Running")

        await c.kuberay("life", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
        await until(lambda: c.status("life").get("phase") == "Succeeded")
        await until(lambda: c.status("life").get("best"), what="the final metrics")
        assert c.status("life")["best"] == {"metric": "xquad_r/multi/map", "value": 0.5}
        assert c.status("life")["languages"] == {"de": 0.6, "sw": 0.4}
        assert (
            c.cond("life", "Succeeded")["status"] == "True" and c.cond("life", "Failed")["status"] == "False"
        )
        assert c.status("life")["observedGeneration"] == 3  # two spec edits

        if shutil.which("kubectl"):  # what users run; it reads the condition written above
            cmd = [
                "kubectl",
                "--kubeconfig",
                str(tmp_path / "kubeconfig"),
                "wait",
                "--for=condition=Succeeded",
            ]
            proc = await asyncio.to_thread(
                subprocess.run, [*cmd, "rexp/life", "--timeout=20s"], capture_output=True, text=True
            )
            assert proc.returncode == 0 and "condition met" in proc.stdout, proc.stderr
        await until(lambda: ("Normal", "JobSucceeded") in c.events("life"))
        events = c.events("life")
        for expected in [
            ("Normal", "SpecValid"),
            ("Warning", "NoProgress"),
            ("Normal", "Suspended"),
            ("Normal", "JobRunning"),
        ]:
            assert expected in events, events

        await c.delete(REXP, "life")
        await until(lambda: c.get(REXP, "life") is None, what="the finalizer to be released")
        await until(lambda: c.get(RAYJOBS, "life") is None and c.get("v1/configmaps", "life-spec") is None)
        calls = c.operator_calls()
    assert calls == rbac.API_CALLS, f"unused: {rbac.API_CALLS - calls}, unlisted: {calls - rbac.API_CALLS}"


async def test_failures_and_hand_deleted_rayjob_are_reported(cluster: Cluster) -> None:
    c = cluster
    async with operator(c):
        await c.create(experiment("fails"))
        await c.create(experiment("orphan"))
        await until(lambda: c.get(RAYJOBS, "fails") and c.get(RAYJOBS, "orphan"))
        await c.kuberay(
            "fails", jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", message="OOM"
        )
        await until(lambda: c.status("fails").get("phase") == "Failed")
        cond = c.cond("fails", "Failed")
        assert (cond["status"], cond["reason"], cond["message"]) == ("True", "AppFailed", "OOM")
        await until(lambda: ("Warning", "AppFailed") in c.events("fails"))

        await c.delete(RAYJOBS, "orphan")
        await until(lambda: c.cond("orphan", "Failed").get("reason") == "RayJobDeleted")
        await asyncio.sleep(0.3)
        assert c.get(RAYJOBS, "orphan") is None  # reported, not recreated


async def test_invalid_and_immutable_changes_never_crash_the_operator(cluster: Cluster) -> None:
    c = cluster
    async with operator(c):
        # what the CRD's schema and CEL rules catch never reaches the operator: the API server says 422
        await c.create(experiment("cel", sampling={"strategy": "xy"}, data={"languages": ["en"]}), expect=422)
        await c.create(experiment("1st"), expect=422)  # DNS-1035: KubeRay could not name its Services
        # what only pydantic knows is reported by the operator
        suites = [{"name": "xquad-r", "path": "data/x", "languages": ["sw"]}]
        await c.create(experiment("bad", evaluation={"suites": suites}))
        await until(lambda: c.status("bad").get("phase") == "Invalid")
        cond = c.cond("bad", "Validated")
        assert cond["reason"] == "InvalidSpec" and "evaluation.suites" in cond["message"]
        assert c.get(RAYJOBS, "bad") is None
        await until(lambda: ("Warning", "InvalidSpec") in c.events("bad"))

        await c.create(experiment("good"))
        await until(lambda: c.get(RAYJOBS, "good"))
        # an immutable edit is refused by the API server (CEL self == oldSelf), whatever else it carries
        await c.patch_spec(
            "good", {"model": {"name": "another/model"}, "deadlines": {"totalSeconds": 60}}, 422
        )
        assert "activeDeadlineSeconds" not in c.get(RAYJOBS, "good")["spec"]
        await c.patch_spec("good", {"deadlines": {"totalSeconds": 60}})
        await until(lambda: c.get(RAYJOBS, "good")["spec"].get("activeDeadlineSeconds") == 60)
        assert c.cond("good", "Validated").get("status") == "True"


async def test_operator_restart_creates_no_duplicates(cluster: Cluster) -> None:
    c = cluster
    async with operator(c):
        await c.create(experiment("again"))
        await until(lambda: c.status("again").get("rayJobName"))
    rayjob_creates = [e for e in c.k8s.log if e[:3] == ("create", "ray.io", "rayjobs")]
    patches_before = len(c.k8s.log)
    async with operator(c):
        await until(
            lambda: ("get", GROUP, PLURAL) in c.k8s.requests_made(since=patches_before), what="resume"
        )
        await asyncio.sleep(0.5)
        await c.kuberay("again", jobDeploymentStatus="Running", jobStatus="RUNNING")
        await until(lambda: c.status("again").get("phase") == "Running")
    after = [e for e in c.k8s.log if e[:3] == ("create", "ray.io", "rayjobs")]
    assert len(rayjob_creates) == len(after) == 1 and len(c.all(RAYJOBS)) == 1


async def test_a_secret_the_operator_may_not_read_is_refused_once_not_retried(cluster: Cluster) -> None:
    """Helm's secrets.restrictRbac: the operator may get only the allowed Secrets; any other one a spec names
    is a Validated=False condition naming the field, not an exception kopf retries forever."""
    c = cluster
    c.k8s.readable_secrets = frozenset({"mlflow-auth"})
    for name in ("hf", "mlflow-auth"):
        secret = {"metadata": {"name": name, "namespace": "default"}, "data": {}}
        assert await c.request("POST", "/api/v1/namespaces/default/secrets", secret) == 201
    async with operator(c):
        await c.create(experiment("locked", cluster={"envFrom": [{"name": "hf"}]}))
        await until(lambda: c.cond("locked", "Validated").get("reason") == "SecretNotReadable")
        message = c.cond("locked", "Validated")["message"]
        assert message.startswith("spec.cluster.envFrom[0]: ") and "secrets.allowed" in message
        assert c.status("locked")["phase"] == "Invalid" and c.get(RAYJOBS, "locked") is None
        asked = len([e for e in c.k8s.log if e[:3] == ("get", "", "secrets")])
        await c.create(experiment("open", cluster={"envFrom": [{"name": "mlflow-auth"}]}))
        await until(lambda: c.get(RAYJOBS, "open"), what="the RayJob of an allowed Secret")
        await asyncio.sleep(0.5)
        assert len([e for e in c.k8s.log if e[:3] == ("get", "", "secrets")]) == asked + 1  # no retries


async def test_the_submitter_pod_passes_restricted_pod_security_and_waits_are_not_running(
    cluster: Cluster,
) -> None:
    """KubeRay's default submitter pod has no security context, pull secrets or scheduling; the operator's
    template has the restricted ones and the submitter's own settings. Until it submits, the experiment is not
    Running."""
    c = cluster
    c.k8s.restricted_namespaces = frozenset({"default"})  # pod-security.kubernetes.io/enforce: restricted
    pods = "/api/v1/namespaces/default/pods"
    async with operator(c):
        pod = {"imagePullSecrets": ["regcred"], "submitter": {"nodeSelector": {"pool": "cpu"}}}
        await c.create(experiment("psa", cluster={"pod": pod}))
        job = await until(lambda: c.get(RAYJOBS, "psa"), what="the RayJob")
        submitter = kuberay_submitter_pod(job)  # what KubeRay's Job makes of the RayJob
        assert await c.request("POST", pods, submitter) == 201
        assert submitter["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert submitter["spec"]["nodeSelector"] == {"pool": "cpu"}
        assert submitter["spec"]["automountServiceAccountToken"] is False
        default = {**job, "spec": {k: v for k, v in job["spec"].items() if k != "submitterPodTemplate"}}
        assert (
            await c.request("POST", pods, kuberay_submitter_pod(default)) == 403
        )  # the emulator's PSA bites

        await c.kuberay("psa", jobDeploymentStatus="Running", rayClusterName="psa-raycluster-x")
        await until(lambda: c.cond("psa", "Running").get("reason") == "JobSubmitting")
        assert c.cond("psa", "Running")["status"] == "False" and c.status("psa")["phase"] == "Initializing"
        await c.kuberay("psa", jobDeploymentStatus="Running", jobStatus="RUNNING")
        await until(lambda: c.status("psa").get("phase") == "Running")


async def test_a_restarted_operator_counts_every_experiment_at_once(cluster: Cluster) -> None:
    """The phase gauge comes from what the operator lists, not from status writes (none after a restart)."""
    c = cluster
    async with operator(c):
        for name in ("one", "two"):
            await c.create(experiment(name))
        await until(lambda: all(c.status(n).get("phase") == "Pending" for n in ("one", "two")))
    memo = kopf.Memo()
    before = len(c.k8s.log)
    async with operator(c, memo=memo):
        await until(lambda: ("get", GROUP, PLURAL) in c.k8s.requests_made(since=before), what="resume")
        value = memo.metrics.registry.get_sample_value
        await until(lambda: value("xling_experiments", {"namespace": "default", "phase": "Pending"}) == 2)
        assert ("patch", GROUP, f"{PLURAL}/status") not in c.k8s.requests_made(since=before)


async def test_deleting_an_experiment_never_waits_for_the_operator(cluster: Cluster) -> None:
    """No finalizer: with the operator gone, an experiment (or its namespace) is deleted at once and its
    children follow by ownerReference."""
    c = cluster
    async with operator(c, watchdog_interval=0.1):
        await c.create(experiment("gone"))
        await until(lambda: c.get(RAYJOBS, "gone"), what="the RayJob")
        await asyncio.sleep(0.3)  # a few watchdog rounds
        assert not c.get(REXP, "gone")["metadata"].get("finalizers")
    await c.delete(REXP, "gone")  # the operator is stopped
    await until(lambda: c.get(REXP, "gone") is None, timeout=2, what="the deletion")
    await until(lambda: c.get(RAYJOBS, "gone") is None and c.get("v1/configmaps", "gone-spec") is None)


async def test_an_image_that_cannot_be_pulled_is_reported_at_once(cluster: Cluster) -> None:
    """Not an hour later at the pre-running deadline: the watchdog looks at the pods of a starting experiment."""
    c = cluster
    async with operator(c, watchdog_interval=0.1):
        await c.create(experiment("pull", cluster={"image": "registry.example/xling:typo"}))
        job = await until(lambda: c.get(RAYJOBS, "pull"), what="the RayJob")
        await c.kuberay("pull", jobDeploymentStatus="Initializing", rayClusterName="pull-raycluster-x")
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        waiting = {
            "reason": "ImagePullBackOff",
            "message": 'Back-off pulling image "registry.example/xling:typo"',
        }
        pod = {  # what the kubelet reports for the head pod KubeRay created from the template
            "metadata": {"name": "pull-raycluster-x-head", "labels": head["metadata"]["labels"]},
            "spec": head["spec"],
            "status": {"containerStatuses": [{"name": "ray-head", "state": {"waiting": waiting}}]},
        }
        assert await c.request("POST", "/api/v1/namespaces/default/pods", pod) == 201
        await until(lambda: c.cond("pull", "ClusterReady").get("reason") == "ImagePullFailed")
        message = c.cond("pull", "ClusterReady")["message"]
        assert (
            "pod pull-raycluster-x-head, container ray-head: ImagePullBackOff" in message
            and "typo" in message
        )
        assert c.status("pull")["phase"] == "Initializing"
        await until(lambda: ("Warning", "ImagePullFailed") in c.events("pull"))
        await c.kuberay("pull", jobDeploymentStatus="Initializing", message="still starting")  # a watch event
        await asyncio.sleep(0.3)
        assert c.cond("pull", "ClusterReady")["reason"] == "ImagePullFailed"  # kept: the pods still fail
        path = "/api/v1/namespaces/default/pods/pull-raycluster-x-head"
        running = {"status": {"containerStatuses": [{"name": "ray-head", "state": {"running": {}}}]}}
        assert await c.request("PATCH", path, running, MERGE) == 200
        await until(lambda: c.cond("pull", "ClusterReady").get("reason") == "ClusterInitializing")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
async def test_kubectl_apply_samples_makes_rayjobs(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    samples = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
    assert samples
    for name in ("xling-s3", "hf-token"):  # what the multi-node sample references (the preflight checks)
        secret = {"metadata": {"name": name, "namespace": "default"}, "data": {}}
        assert await c.request("POST", "/api/v1/namespaces/default/secrets", secret) == 201
    node = {"metadata": {"name": "gpu-0"}, "status": {"allocatable": {"cpu": "96", "nvidia.com/gpu": "8"}}}
    assert await c.request("POST", "/api/v1/nodes", node) == 201
    platform = Platform(
        spec={"storage": {"checkpointUri": "s3://platform-ckpt/xling"}}
    )  # Helm's trainer.storage
    async with operator(c, platform=platform):
        for sample in samples:
            cmd = [
                "kubectl",
                "--kubeconfig",
                str(tmp_path / "kubeconfig"),
                "apply",
                "--validate=false",
                "-f",
                str(sample),
            ]
            proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
        for sample in samples:
            name = yaml.safe_load(sample.read_text())["metadata"]["name"]
            await until(lambda name=name: c.get(RAYJOBS, name), what=f"the RayJob of {sample.name}")
            await until(lambda name=name: c.cond(name, "Validated").get("status") == "True")


# --- the API server semantics the operator depends on ------------------------------------------------------


async def test_api_server_admits_custom_resources_like_a_real_one(cluster: Cluster) -> None:
    c = cluster
    body = experiment("adm")
    body["spec"]["model"]["typo"] = "dropped"  # unknown fields are pruned, defaults filled in
    await c.create(body)
    stored = c.get(REXP, "adm")
    assert "typo" not in stored["spec"]["model"] and stored["spec"]["loss"]["temperature"] == 0.05
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/adm"
    assert await c.request("PATCH", path + "/status", {"status": {"phase": "Bogus"}}, MERGE) == 422
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},  # someone wrote since
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
    ]
    json_patch = {"Content-Type": "application/json-patch+json"}
    assert await c.request("PATCH", path, stale, json_patch) == 422  # kopf retries on 422, crashes on 409


async def test_watches_resume_from_their_version_and_relist_after_410(cluster: Cluster) -> None:
    c = cluster
    async with operator(c):
        await c.create(experiment("before"))
        await until(lambda: c.get(RAYJOBS, "before"))
        since = len(c.k8s.log)
        c.k8s.drop_watches()  # connections drop, and (in the same instant) history is compacted:
        c.k8s.compact()  # kopf's reconnect from the last version it saw gets 410 Gone ...
        await until(
            lambda: ("list", GROUP, PLURAL) in c.k8s.requests_made(OPERATOR_AGENTS, since), what="re-list"
        )
        relisted = max(i for i, e in enumerate(c.k8s.log) if e[:3] == ("list", GROUP, PLURAL))
        await until(lambda: ("watch", GROUP, PLURAL) in c.k8s.requests_made(OPERATOR_AGENTS, relisted))
        await asyncio.sleep(0.3)  # KMock subscribes a watch to live events only after its snapshot
        await c.create(experiment("after"))  # ... and it lists again and keeps reconciling
        await until(lambda: c.get(RAYJOBS, "after"), what="the RayJob after the re-list")
    assert len(c.all(RAYJOBS)) == 2


@pytest.mark.parametrize("cluster", [False], indirect=True)
async def test_missing_kuberay_is_reported_then_picked_up_once_installed(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster
    monkeypatch.setattr(rc, "KUBERAY_RETRY_SECONDS", 0.5)  # kopf retries the handler after this
    async with operator(c):
        await c.create(experiment("early"))
        await until(lambda: c.cond("early", "ClusterReady").get("reason") == "KubeRayNotInstalled")
        await until(lambda: ("Warning", "KubeRayNotInstalled") in c.events("early"))
        assert c.status("early")["phase"] == "Pending"
        c.k8s.install_kuberay()
        await until(lambda: c.get(RAYJOBS, "early"), what="the RayJob once KubeRay is there")
        await until(lambda: c.cond("early", "ClusterReady").get("reason") == "Pending")
