"""The Helm chart (helm/xling), rendered by the real helm binary (bin/helm, from `make tools`).

Every rendered object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
fields are errors), and the RBAC rules are checked against the API calls the operator makes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT
from tests.support.k8s_schema import grants

CHART = ROOT / "helm" / "xling"
HELM = ROOT / "bin" / "helm"
CRD_FILE = "retrievalexperiments.xling.io.yaml"
KUBE_VERSION = "1.32"  # helm 3.17's default capabilities, and the kubectl from `make tools`
RELEASE, NAMESPACE = "rel", "xling"

pytestmark = pytest.mark.skipif(not HELM.is_file(), reason="bin/helm is missing: run `make tools`")

# Value sets rendered in the tests: the default, and one per switch that changes what is rendered.
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-wide": {"operator": {"clusterWide": True}},
    "two-namespaces": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    "mlflow-off": {"mlflow": {"enabled": False}},
    "postgres-s3": {
        "mlflow": {
            "backendStore": {"type": "postgresql", "postgresql": {"existingSecret": "mlflow-db"}},
            "artifactStore": {
                "type": "s3",
                "s3": {
                    "bucketUri": "s3://mlflow/xling",
                    "endpointUrl": "http://minio.storage:9000",
                    "existingSecret": "mlflow-s3",
                },
            },
            "allowedHosts": ["mlflow.example.com"],
        }
    },
    "bring-your-own": {
        "serviceAccount": {"create": False, "name": "xling-sa"},
        "rbac": {"create": False},
        "tests": {"enabled": False},
        "mlflow": {"persistence": {"existingClaim": "mlflow-data"}},
        "operator": {
            "image": {"repository": "registry.example.com/xling-operator", "tag": "dev"},
            "verbose": True,
        },
    },
}


def helm_env() -> dict[str, str]:
    """Keep helm's cache/config/data under .cache/helm (the Makefile exports the same)."""
    env = dict(os.environ)
    for kind in ("CACHE", "CONFIG", "DATA"):
        env.setdefault(f"HELM_{kind}_HOME", str(ROOT / ".cache" / "helm" / kind.lower()))
    return env


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=helm_env(), timeout=60)
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def render(tmp_path: Path, values: dict[str, Any], *extra: str, chart: Path = CHART) -> list[dict[str, Any]]:
    out = helm(
        "template",
        RELEASE,
        str(chart),
        "-n",
        NAMESPACE,
        "--include-crds",
        "-f",
        values_file(tmp_path, values),
        *extra,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return {name: render(tmp_path_factory.mktemp(name), values) for name, values in CASES.items()}


# --- lint and schema ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case: str, tmp_path: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), "-n", NAMESPACE, "-f", values_file(tmp_path, CASES[case]))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("case", CASES)
def test_every_object_validates_against_the_kubernetes_schemas(case: str, rendered: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency")
    docs = rendered[case]
    assert docs
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as err:
            path = ".".join(map(str, err.path))
            pytest.fail(f"{case}: {where} is invalid at {path}: {err.message}")
        except kv.SchemaNotFoundError:
            pytest.fail(f"{case}: no Kubernetes schema for {where} ({doc['apiVersion']})")
        namespaced = doc["kind"] not in {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
        assert ("namespace" in doc["metadata"]) == namespaced, f"{where}: namespace set wrongly"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"replicas": 0}}, "operator.replicas"),
        (
            {"operator": {"leaderElection": {"renewDeadlineSeconds": 15}}},
            "renewDeadlineSeconds must be less than leaseDurationSeconds",
        ),
        ({"mlflow": {"backendStore": {"type": "mysql"}}}, "mlflow.backendStore.type"),
        ({"mlflow": {"backendStore": {"type": "postgresql"}}}, "existingSecret is required for a postgresql"),
        ({"mlflow": {"artifactStore": {"type": "s3"}}}, "bucketUri is required for an s3"),
        ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "watchNamespaces"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(values: dict, message: str, tmp_path: Path) -> None:
    proc = helm("template", RELEASE, str(CHART), "-f", values_file(tmp_path, values), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --- the operator Deployment ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_operator_deployment(case: str, rendered: dict) -> None:
    docs = rendered[case]
    dep = one(docs, "Deployment", f"{RELEASE}-xling-operator")
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    # leader election: a standby is ready, so a rolling update never leaves no operator
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert pod["securityContext"]["runAsNonRoot"] is True
    (box,) = pod["containers"]
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert box["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(box["resources"]["requests"])
    liveness = [a for a in box["args"] if a.startswith("--liveness=")]
    assert liveness == ["--liveness=http://0.0.0.0:8080/healthz"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert box[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in box["ports"]
    assert pod["serviceAccountName"] == (
        "xling-sa" if case == "bring-your-own" else f"{RELEASE}-xling-operator"
    )
    watched = [a.removeprefix("--namespace=") for a in box["args"] if a.startswith("--namespace")]
    expected = {"cluster-wide": [], "two-namespaces": ["team-a", "team-b"]}.get(case, [NAMESPACE])
    assert watched == expected
    env = env_of(box)
    assert env["XLING_LEASE_NAME"] == f"{RELEASE}-xling-operator"
    assert env["XLING_LEASE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    timings = [float(env[f"XLING_LEASE_{t}"]) for t in ("DURATION", "RENEW_DEADLINE", "RETRY_PERIOD")]
    assert timings == [15, 10, 2]


def test_operator_image_defaults_to_the_app_version(rendered: dict) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == "0.1.0"
    images = {
        c["image"]
        for d in by_kind(rendered["default"], "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert f"xling-operator:{chart['appVersion']}" in images
    byo = one(rendered["bring-your-own"], "Deployment", f"{RELEASE}-xling-operator")
    assert (
        byo["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/xling-operator:dev"
    )


# --- RBAC -------------------------------------------------------------------------------------------------------


def operator_grants(docs: list[dict[str, Any]], namespace: str) -> set[tuple[str, str, str]]:
    """What the operator's ServiceAccount may do in `namespace`: its Role there plus its ClusterRoles."""
    out: set[tuple[str, str, str]] = set()
    for binding in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding"):
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        ref = binding["roleRef"]
        role = [d for d in by_kind(docs, ref["kind"]) if d["metadata"]["name"] == ref["name"]]
        assert role, f"{binding['metadata']['name']} binds a missing {ref['kind']} {ref['name']}"
        out |= grants(role[0]["rules"])
    return out


NAMESPACE_DISCOVERY = {("", "namespaces", "list"), ("", "namespaces", "watch")}
LEASES = {("coordination.k8s.io", "leases", verb) for verb in ("get", "create", "update")}


def lease_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Role", f"{RELEASE}-xling-operator-leader-election")


def test_namespaced_rbac_is_one_role_per_watched_namespace(rendered: dict) -> None:
    docs = rendered["two-namespaces"]
    roles = sorted((r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(docs, "Role"))
    assert roles == [
        ("team-a", f"{RELEASE}-xling-operator"),
        ("team-b", f"{RELEASE}-xling-operator"),
        (NAMESPACE, f"{RELEASE}-xling-operator-leader-election"),  # the Lease: in the operator's namespace
    ]
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}-xling-operator", "namespace": NAMESPACE}
        ]
    # Cluster-wide, only kopf's read-only discovery of CRDs and namespaces, and the GPU preflight's node list.
    (role,) = by_kind(docs, "ClusterRole")
    assert grants(role["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "nodes", "list"),
        *NAMESPACE_DISCOVERY,
    }
    assert operator_grants(docs, "team-a") == operator_grants(docs, "team-b")
    # In the release namespace, which is not watched, only the Lease.
    assert operator_grants(docs, NAMESPACE) == grants(role["rules"]) | LEASES


def test_cluster_wide_rbac_is_a_cluster_role(rendered: dict) -> None:
    docs = rendered["cluster-wide"]
    assert by_kind(docs, "Role") == [lease_role(docs)]  # the rest is cluster-wide
    namespaced = operator_grants(rendered["default"], NAMESPACE) - LEASES
    cluster = operator_grants(docs, "anywhere")
    assert operator_grants(docs, NAMESPACE) == cluster | LEASES
    # The same rules, less following namespaces (kopf does that only for a list of namespaces).
    assert namespaced - cluster == NAMESPACE_DISCOVERY
    assert cluster <= namespaced


def test_rbac_has_no_wildcards_and_can_be_left_out(rendered: dict) -> None:
    for docs in rendered.values():
        for role in by_kind(docs, "Role") + by_kind(docs, "ClusterRole"):
            assert not any("*" in t for t in grants(role["rules"])), role["metadata"]["name"]
    byo = rendered["bring-your-own"]
    assert not [
        d
        for d in byo
        if d["kind"] in {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    ]


def recorded_api_calls(cluster_wide: bool, own_namespace: bool) -> set[tuple[str, str, str]]:
    """The operator's API calls (operator/rbac.py) in one mode and namespace (the operator's own: with the
    Lease), as (apiGroup, resource[/subresource], verb)."""
    rbac = pytest.importorskip("xling.operator.rbac", reason="operator/rbac.py not written yet")
    calls = rbac.API_CALLS | rbac.IMPLIED_PERMISSIONS
    if not cluster_wide:
        calls |= rbac.NAMESPACED_MODE_CALLS
    if own_namespace:
        calls |= rbac.LEADER_ELECTION_CALLS
    return {(group, resource, verb) for verb, group, resource in calls}


@pytest.mark.parametrize("case", ["default", "cluster-wide", "two-namespaces"])
def test_rbac_covers_exactly_the_operators_api_calls(case: str, rendered: dict) -> None:
    watched = CASES[case].get("operator", {}).get("watchNamespaces", [NAMESPACE])
    for namespace in watched:
        calls = recorded_api_calls(cluster_wide=case == "cluster-wide", own_namespace=namespace == NAMESPACE)
        granted = operator_grants(rendered[case], namespace)
        missing, unused = calls - granted, granted - calls
        assert not missing, (
            f"{namespace}: the operator makes calls its RBAC does not allow: {sorted(missing)}"
        )
        assert not unused, f"{namespace}: RBAC grants more than the operator uses: {sorted(unused)}"


def test_rbac_rules_match_operator_rbac_rules(rendered: dict) -> None:
    """Namespaced mode: the chart's Role plus discovery ClusterRole are rbac.rules() rule for rule."""
    rbac = pytest.importorskip("xling.operator.rbac", reason="operator/rbac.py not written yet")
    role = one(rendered["default"], "Role", f"{RELEASE}-xling-operator")
    (discovery,) = by_kind(rendered["default"], "ClusterRole")
    chart = [{**r, "verbs": sorted(r["verbs"])} for r in role["rules"] + discovery["rules"]]
    key = lambda r: (r["apiGroups"], r["resources"])  # noqa: E731
    assert sorted(chart, key=key) == sorted(
        rbac.rules(rbac.API_CALLS | rbac.IMPLIED_PERMISSIONS | rbac.NAMESPACED_MODE_CALLS), key=key
    )
    assert lease_role(rendered["default"])["rules"] == rbac.rules(rbac.LEADER_ELECTION_CALLS)


# --- MLflow -----------------------------------------------------------------------------------------------------


def mlflow_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = one(docs, "Deployment", f"{RELEASE}-xling-mlflow")
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_sqlite_on_a_pvc_by_default(rendered: dict) -> None:
    docs = rendered["default"]
    pvc = one(docs, "PersistentVolumeClaim", f"{RELEASE}-xling-mlflow")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    box = mlflow_container(docs)
    env = env_of(box)
    assert env["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////mlflow/mlflow.db"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlflow/artifacts"
    assert {"name": "data", "mountPath": "/mlflow"} in box["volumeMounts"]
    assert "--serve-artifacts" in box["args"]
    svc = one(docs, "Service", f"{RELEASE}-xling-mlflow")
    assert svc["spec"]["ports"][0]["port"] == 5000
    # The in-cluster name experiments use as spec.tracking.trackingUri must pass MLflow's Host check.
    assert f"{RELEASE}-xling-mlflow.{NAMESPACE}.svc:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    dep = one(docs, "Deployment", f"{RELEASE}-xling-mlflow")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_mlflow_postgres_and_s3_from_secrets(rendered: dict) -> None:
    docs = rendered["postgres-s3"]
    assert not by_kind(docs, "PersistentVolumeClaim")
    box = mlflow_container(docs)
    env = env_of(box)
    assert env["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/xling"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.storage:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "mlflow-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "mlflow-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert "mlflow.example.com" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert not any("://" in a for a in box["args"]), "store URIs (credentials) must not appear in args"
    assert "volumeMounts" in box and {m["name"] for m in box["volumeMounts"]} == {"tmp"}
    dep = one(docs, "Deployment", f"{RELEASE}-xling-mlflow")
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate"}


def test_mlflow_off_renders_no_mlflow_objects(rendered: dict) -> None:
    docs = rendered["mlflow-off"]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-mlflow")]
    checks = json.loads(one(docs, "ConfigMap", f"{RELEASE}-xling-test")["data"]["checks.json"])
    assert checks["mlflow"] == ""


def test_existing_claim_is_used_not_created(rendered: dict) -> None:
    docs = rendered["bring-your-own"]
    assert not by_kind(docs, "PersistentVolumeClaim")
    dep = one(docs, "Deployment", f"{RELEASE}-xling-mlflow")
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in dep["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["mlflow-data"]


# --- helm test hook, NOTES, CRDs ------------------------------------------------------------------------------


def test_helm_test_hook_checks_the_operators_permissions(rendered: dict) -> None:
    docs = rendered["default"]
    pod = one(docs, "Pod", f"{RELEASE}-xling-test")
    cm = one(docs, "ConfigMap", f"{RELEASE}-xling-test")
    for obj in (pod, cm):
        assert obj["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-xling-operator"
    assert pod["spec"]["restartPolicy"] == "Never"
    compile(cm["data"]["check.py"], "check.py", "exec")  # the script at least parses
    checks = json.loads(cm["data"]["checks.json"])
    role = one(docs, "Role", f"{RELEASE}-xling-operator")
    assert [(a["namespace"], grants(a["rules"])) for a in checks["access"]] == [
        (NAMESPACE, grants(role["rules"])),
        (NAMESPACE, LEASES),
    ]
    assert {s["groupVersion"] for s in checks["served"]} == {"xling.io/v1alpha1", "ray.io/v1"}
    assert checks["mlflow"] == f"http://{RELEASE}-xling-mlflow.{NAMESPACE}.svc:5000/health"
    assert not [d for d in rendered["bring-your-own"] if d["kind"] == "Pod"]


def render_notes(tmp_path: Path, values: dict[str, Any], *extra: str) -> str:
    """NOTES.txt is not part of `helm template` output: render it through a copy of the chart as a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "notes-as-configmap.yaml").write_text(
        '{{- define "notes" }}' + notes + "{{- end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "notes" . | toJson }}}\n'
    )
    docs = render(tmp_path, values, "--show-only", "templates/notes-as-configmap.yaml", *extra, chart=chart)
    return docs[0]["data"]["notes"]


def test_notes_explain_sample_and_mlflow(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, {})
    assert "KubeRay is a prerequisite" in notes  # no ray.io/v1 RayJob known to `helm template`
    assert f"kubectl -n {NAMESPACE} apply -f manifests/samples/" in notes
    assert f"trackingUri: http://{RELEASE}-xling-mlflow.{NAMESPACE}.svc:5000" in notes
    assert f"port-forward svc/{RELEASE}-xling-mlflow 5000:5000" in notes
    with_kuberay = render_notes(
        tmp_path / "b",
        {"operator": {"clusterWide": True}, "mlflow": {"enabled": False}},
        "--api-versions",
        "ray.io/v1/RayJob",
    )
    assert "KubeRay is a prerequisite" not in with_kuberay
    assert "all namespaces" in with_kuberay and "port-forward" not in with_kuberay


def test_chart_crds_are_a_copy_of_manifests_crds() -> None:
    source = ROOT / "manifests" / "crds" / CRD_FILE
    if not source.is_file():
        pytest.skip(f"manifests/crds/{CRD_FILE} not generated yet (make crds)")
    copies = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert copies == sorted(p.name for p in source.parent.glob("*.yaml"))
    for name in copies:
        assert (CHART / "crds" / name).read_text() == (source.parent / name).read_text(), (
            f"helm/xling/crds/{name} differs from manifests/crds/{name}: run `make crds`"
        )


def test_crd_is_rendered_once_and_valid(rendered: dict) -> None:
    crds = by_kind(rendered["default"], "CustomResourceDefinition")
    assert [c["metadata"]["name"] for c in crds] == ["retrievalexperiments.xling.io"]
    version = crds[0]["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}


# --- docs/install.md shows the rendered chart ------------------------------------------------------------------


def test_rendered_chart_in_the_docs_is_current() -> None:
    """Each ```yaml block of docs/install.md that starts with `# bin/helm template ...` is that command's output."""
    doc = (ROOT / "docs" / "install.md").read_text()
    blocks = re.findall(r"```yaml\n# bin/helm (template [^\n]+)\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 2, "docs/install.md should show the rendered operator Deployment and RBAC"
    for command, shown in blocks:
        out = helm(*shlex.split(command)).stdout
        assert shown.strip() == out.strip(), (
            f"docs/install.md is stale: regenerate the block of `bin/helm {command}`"
        )


def test_namespaced_releases_of_one_name_do_not_clash(tmp_path: Path) -> None:
    """Two teams installing release `rel` in their own namespaces get distinct cluster-scoped objects."""
    names = []
    for ns in ("team-a", "team-b"):
        out = helm("template", RELEASE, str(CHART), "-n", ns, "-f", values_file(tmp_path, {})).stdout
        names.append(
            {d["metadata"]["name"] for d in yaml.safe_load_all(out) if d and "namespace" not in d["metadata"]}
        )
    assert names[0] and not names[0] & names[1]


@pytest.mark.parametrize("case", CASES)
def test_operator_cli_accepts_the_charts_arguments(case: str, rendered: dict) -> None:
    """The Deployment's args parse with the operator's own CLI, and its liveness URL is what the probes hit."""
    from urllib.parse import urlsplit

    from xling.operator.__main__ import parse_args

    dep = one(rendered[case], "Deployment", f"{RELEASE}-xling-operator")
    (box,) = dep["spec"]["template"]["spec"]["containers"]
    args = parse_args(box["args"])
    assert args.namespace == [
        a.removeprefix("--namespace=") for a in box["args"] if a.startswith("--namespace=")
    ]
    url = urlsplit(args.liveness)
    (port,) = [
        p["containerPort"] for p in box["ports"] if p["name"] == box["livenessProbe"]["httpGet"]["port"]
    ]
    assert (url.port, url.path) == (port, box["livenessProbe"]["httpGet"]["path"])


class FakeApiServer(ThreadingHTTPServer):
    """Just enough of an API server for the helm test script: discovery, SelfSubjectAccessReview, /health."""

    def __init__(self, served: dict[str, list[str]], allowed: set[tuple[str, ...]]) -> None:
        """``allowed``: (group, resource, verb) for any object, (group, resource, verb, name) for one."""
        self.served, self.allowed, self.reviews, self.names = served, allowed, [], []
        super().__init__(("127.0.0.1", 0), _FakeApiHandler)


class _FakeApiHandler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def _send(self, code: int, payload: Any) -> None:
        body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            return self._send(200, b"OK")
        gv = self.path.removeprefix("/apis/")
        if gv not in self.server.served:
            return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
        resources = [
            {"name": r, "singularName": "", "namespaced": True, "kind": "X", "verbs": ["get"]}
            for r in self.server.served[gv]
        ]
        return self._send(
            200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
        )

    def do_POST(self) -> None:  # noqa: N802
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        attrs = review["spec"]["resourceAttributes"]
        resource = attrs["resource"] + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        key = (attrs.get("group", ""), resource, attrs["verb"])
        self.server.reviews.append((attrs["namespace"], *key))
        self.server.names.append(attrs.get("name"))
        # as RBAC: a grant without resourceNames allows any object; one with them only the named objects
        allowed = key in self.server.allowed or (*key, attrs.get("name")) in self.server.allowed
        review["status"] = {"allowed": allowed}
        self._send(201, review)

    def log_message(self, *args: Any) -> None:
        pass


def run_test_hook(
    tmp_path: Path, docs: list[dict[str, Any]], server: FakeApiServer
) -> subprocess.CompletedProcess[str]:
    """Run the chart's `helm test` script (from its ConfigMap) against `server`, as a kubeconfig user."""
    cm = one(docs, "ConfigMap", f"{RELEASE}-xling-test")
    checks = json.loads(cm["data"]["checks.json"])
    url = f"http://127.0.0.1:{server.server_address[1]}"
    if checks["mlflow"]:
        checks["mlflow"] = f"{url}/health"
    (tmp_path / "check.py").write_text(cm["data"]["check.py"])
    (tmp_path / "checks.json").write_text(json.dumps(checks))
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "sa", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "sa"}}],
    }))  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        cmd = [sys.executable, str(tmp_path / "check.py"), str(tmp_path / "checks.json")]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    finally:
        server.shutdown()
        server.server_close()


def test_helm_test_script_passes_on_a_ready_cluster(tmp_path: Path, rendered: dict) -> None:
    docs = rendered["default"]
    role = one(docs, "Role", f"{RELEASE}-xling-operator")
    served = {"xling.io/v1alpha1": ["retrievalexperiments"], "ray.io/v1": ["rayjobs", "rayjobs/status"]}
    server = FakeApiServer(served, grants(role["rules"]) | LEASES)
    proc = run_test_hook(tmp_path, docs, server)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {(g, r, v) for _, g, r, v in server.reviews} == grants(role["rules"]) | LEASES
    assert {ns for ns, *_ in server.reviews} == {NAMESPACE}
    assert "ok    MLflow" in proc.stdout and "FAIL" not in proc.stdout


def test_helm_test_script_reports_missing_kuberay_and_permissions(tmp_path: Path, rendered: dict) -> None:
    docs = rendered["mlflow-off"]
    role = one(docs, "Role", f"{RELEASE}-xling-operator")
    allowed = (grants(role["rules"]) | LEASES) - {("ray.io", "rayjobs", "create")}
    proc = run_test_hook(
        tmp_path, docs, FakeApiServer({"xling.io/v1alpha1": ["retrievalexperiments"]}, allowed)
    )
    assert proc.returncode == 1
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert failures == [
        "FAIL  rayjobs.ray.io/v1 is served",
        f"FAIL  can create rayjobs.ray.io in {NAMESPACE}",
    ]
    assert "MLflow" not in proc.stdout


def test_platform_defaults_metrics_and_network_policy(tmp_path: Path) -> None:
    """trainer.* become the operator's defaults file; metrics Service + optional ServiceMonitor; MLflow policy."""
    values = {
        "trainer": {
            "image": "registry.example.com/xling-trainer:0.1.0",
            "storage": {"checkpointUri": "s3://ckpt/xling", "credentialsSecret": "s3"},
            "pod": {"priorityClassName": "batch"},
        },
        "secrets": {"allowed": ["mlflow-auth"], "restrictRbac": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
    }
    docs = render(tmp_path, values)
    cm = one(docs, "ConfigMap", f"{RELEASE}-xling-operator-defaults")
    defaults = yaml.safe_load(cm["data"]["defaults.yaml"])
    assert defaults["spec"]["cluster"] == {
        "image": "registry.example.com/xling-trainer:0.1.0",
        "pod": {"priorityClassName": "batch"},
    }
    assert defaults["spec"]["storage"] == {"checkpointUri": "s3://ckpt/xling", "credentials": {"name": "s3"}}
    assert defaults["spec"]["tracking"] == {
        "trackingUri": f"http://{RELEASE}-xling-mlflow.{NAMESPACE}.svc:5000"
    }
    assert defaults["allowedTrackingHosts"] == [f"{RELEASE}-xling-mlflow.{NAMESPACE}.svc"]
    assert defaults["allowedSecrets"] == ["mlflow-auth"]
    from xling.operator.defaults import Platform

    path = tmp_path / "defaults.yaml"
    path.write_text(cm["data"]["defaults.yaml"])
    assert Platform.load(path).spec == defaults["spec"]  # the operator accepts what the chart writes
    dep = one(docs, "Deployment", f"{RELEASE}-xling-operator")
    env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
    assert (
        env["XLING_PLATFORM_DEFAULTS"] == "/etc/xling-operator/defaults.yaml"
        and env["XLING_METRICS_PORT"] == "9090"
    )
    assert by_kind(docs, "ServiceMonitor") and one(docs, "Service", f"{RELEASE}-xling-operator-metrics")
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][1] == {"namespaceSelector": watched_namespaces([NAMESPACE])}
    role = one(docs, "Role", f"{RELEASE}-xling-operator")
    (secrets,) = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert secrets["resourceNames"] == ["mlflow-auth", "s3"]  # the platform's storage Secret is read too


def test_notes_warn_when_no_trainer_image_or_storage_is_set(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, {})
    assert "WARNING: set trainer.image" in notes and "trainer.storage.checkpointUri is not set" in notes
    values = {"trainer": {"image": "reg/xling:1", "storage": {"checkpointUri": "s3://b"}}}
    set_up = render_notes(tmp_path / "b", values)
    assert (
        "WARNING" not in set_up.replace("WARNING: the ray.io/v1 RayJob API", "") and "reg/xling:1" in set_up
    )


# --- issue 22: pod settings, restricted Secrets, who reaches MLflow, tracking hosts ------------------------------


def watched_namespaces(names: list[str]) -> dict[str, Any]:
    """The MLflow policy's namespace selector: by the name the API server sets, which no user can change."""
    return {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": names}]}


def defaults_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(
        one(docs, "ConfigMap", f"{RELEASE}-xling-operator-defaults")["data"]["defaults.yaml"]
    )


def test_trainer_pod_values_schema_is_the_specs(tmp_path: Path) -> None:
    from tests.support.k8s_emulator import experiment
    from xling.operator.crd import pod_values_schema
    from xling.operator.defaults import Platform
    from xling.operator.manifests import Owner, rayjob

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["trainer"]["properties"]["pod"] == pod_values_schema(), (
        "stale: run `make crds` (python -m xling.operator.crd manifests/crds helm/xling/values.schema.json)"
    )
    taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    pod = {"workers": {"tolerations": [taint], "nodeSelector": {"pool": "gpu"}}, "imagePullSecrets": ["reg"]}
    docs = render(tmp_path, {"trainer": {"pod": pod}})
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(defaults_of(docs)))
    exp = Platform.load(path).experiment(experiment(distributed={"numWorkers": 8, "gpusPerWorker": 1}))
    worker = rayjob(exp, Owner("exp", "default", "u"))["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert taint in worker["template"]["spec"]["tolerations"]
    assert worker["template"]["spec"]["imagePullSecrets"] == [{"name": "reg"}]
    for bad, field in (
        ({"tolerations": [{"key": "a", "effect": "Sometimes"}]}, "effect"),
        ({"bogus": 1}, "bogus"),
    ):
        proc = helm(
            "template",
            RELEASE,
            str(CHART),
            "-f",
            values_file(tmp_path, {"trainer": {"pod": bad}}),
            check=False,
        )
        assert proc.returncode != 0 and field in proc.stderr, proc.stderr


def test_restricted_secrets_include_the_storage_secret_and_helm_test_checks_each(tmp_path: Path) -> None:
    values = {
        "secrets": {"allowed": ["mlflow-auth"], "restrictRbac": True},
        "trainer": {"storage": {"checkpointUri": "s3://ckpt", "credentialsSecret": "s3"}},
    }
    docs = render(tmp_path, values)
    role = one(docs, "Role", f"{RELEASE}-xling-operator")
    (secrets,) = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert secrets["resourceNames"] == ["mlflow-auth", "s3"]
    # what a real API server grants: the unrestricted rules for any object, the Secrets only by name
    allowed: set[tuple[str, ...]] = grants([r for r in role["rules"] if "resourceNames" not in r])
    allowed |= {("", "secrets", "get", name) for name in secrets["resourceNames"]} | LEASES
    served = {"xling.io/v1alpha1": ["retrievalexperiments"], "ray.io/v1": ["rayjobs"]}
    server = FakeApiServer(served, allowed)
    proc = run_test_hook(tmp_path, docs, server)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "ok    can get secrets/s3.core" in proc.stdout
        and "ok    can get secrets/mlflow-auth.core" in proc.stdout
    )
    (tmp_path / "b").mkdir()
    nothing = render(tmp_path / "b", {"secrets": {"restrictRbac": True}})  # no names: no Secret at all
    assert not [
        r for r in one(nothing, "Role", f"{RELEASE}-xling-operator")["rules"] if "secrets" in r["resources"]
    ]


def test_mlflow_admits_namespaces_not_pod_labels(rendered: dict) -> None:
    def sources(case: str) -> list[dict[str, Any]]:
        (policy,) = by_kind(rendered[case], "NetworkPolicy")
        (rule,) = policy["spec"]["ingress"]
        return rule["from"]

    release = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}
    assert sources("default") == [release, {"namespaceSelector": watched_namespaces([NAMESPACE])}]
    assert sources("two-namespaces")[1] == {"namespaceSelector": watched_namespaces(["team-a", "team-b"])}
    assert sources("cluster-wide")[1] == {
        "namespaceSelector": {"matchLabels": {"xling.io/experiments": "true"}}
    }
    assert not by_kind(rendered["mlflow-off"], "NetworkPolicy")


def test_tracking_hosts_fail_closed_without_mlflow(tmp_path: Path, rendered: dict) -> None:
    from xling.operator.defaults import Platform

    assert defaults_of(rendered["mlflow-off"])["allowedTrackingHosts"] == []
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(defaults_of(rendered["mlflow-off"])))
    assert not Platform.load(path).tracking_host_allowed("http://anywhere.example:5000")
    external = {
        "mlflow": {"enabled": False},
        "trainer": {"trackingUri": "https://mlflow.corp.example:8443/x"},
    }
    assert defaults_of(render(tmp_path, external))["allowedTrackingHosts"] == ["mlflow.corp.example"]
    assert "WARNING: no MLflow host is allowed" in render_notes(
        tmp_path / "n", {"mlflow": {"enabled": False}}
    )
