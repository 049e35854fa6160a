"""The kustomize base (manifests/), the samples against the CRD schema, and the Dockerfiles.

Uses the real kubectl (its built-in kustomize), helm and hadolint from bin/ (`make tools`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import ROOT
from tests.support.k8s_schema import grants, to_json_schema

BIN = ROOT / "bin"
MANIFESTS = ROOT / "manifests"
CRD_PATH = MANIFESTS / "crds" / "retrievalexperiments.xling.io.yaml"
SAMPLES = sorted((MANIFESTS / "samples").glob("*.yaml"))
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
NAMESPACE = "xling-system"


def tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"bin/{name} is missing: run `make tools`")
    return path


def run(*args: str | Path) -> str:
    env = dict(os.environ)
    for kind in ("CACHE", "CONFIG", "DATA"):
        env.setdefault(f"HELM_{kind}_HOME", str(ROOT / ".cache" / "helm" / kind.lower()))
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
    )
    return proc.stdout


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `2e-05` (no dot; kustomize writes floats so) is a string. Kubernetes reads
    YAML 1.2, where it is a float: resolve such floats the 1.2 way."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=Yaml12Loader) if d]


# --- the CRD's schema as JSON Schema ----------------------------------------------------------------------------


def crd_object() -> dict[str, Any]:
    """The committed CRD; before it is generated, the generator's output (the same source of truth)."""
    if CRD_PATH.is_file():
        return yaml.safe_load(CRD_PATH.read_text())
    from xling.operator.crd import crd

    return crd()


@pytest.fixture(scope="module")
def cr_validator() -> jsonschema.Draft4Validator:
    crd = crd_object()
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def test_samples_exist() -> None:
    assert SAMPLES, "manifests/samples/ has no samples"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_sample_validates_against_the_crd(sample: Path, cr_validator: jsonschema.Draft4Validator) -> None:
    crd = crd_object()
    experiments = [d for d in docs_of(sample.read_text()) if d.get("kind") == crd["spec"]["names"]["kind"]]
    assert experiments, f"{sample.name} has no {crd['spec']['names']['kind']}"
    served = {f"{crd['spec']['group']}/{v['name']}" for v in crd["spec"]["versions"] if v["served"]}
    for doc in experiments:
        assert doc["apiVersion"] in served
        errors = sorted(cr_validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{sample.name}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )
        # The CRD's CEL rules mirror the spec's cross-field checks: run those.
        from xling.api.spec.loading import parse_experiment

        parse_experiment(doc, sample.name)


def test_crd_schema_catches_typos(cr_validator: jsonschema.Draft4Validator) -> None:
    doc = docs_of(SAMPLES[0].read_text())[0] if SAMPLES else pytest.skip("no samples")
    bad = yaml.safe_load(yaml.safe_dump(doc))
    bad["spec"]["sampling"]["alfa"] = 0.5
    bad["spec"]["sampling"]["strategy"] = "diagonal"
    messages = " ".join(e.message for e in cr_validator.iter_errors(bad))
    assert "alfa" in messages and "diagonal" in messages


# --- the kustomize base -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kustomized() -> list[dict[str, Any]]:
    kubectl = tool("kubectl")
    if not CRD_PATH.is_file():
        pytest.skip(f"{CRD_PATH.relative_to(ROOT)} not generated yet (make crds)")
    return docs_of(run(kubectl, "kustomize", MANIFESTS))


def test_kustomize_renders_crd_rbac_and_operator(kustomized: list[dict[str, Any]]) -> None:
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in kustomized)
    assert kinds == sorted(
        [
            "CustomResourceDefinition/retrievalexperiments.xling.io",
            f"Namespace/{NAMESPACE}",
            "ServiceAccount/xling-operator",
            "Role/xling-operator",
            "RoleBinding/xling-operator",
            "Role/xling-operator-leader-election",
            "RoleBinding/xling-operator-leader-election",
            "ClusterRole/xling-operator-xling-system-discovery",
            "ClusterRoleBinding/xling-operator-xling-system-discovery",
            "Deployment/xling-operator",
            "ConfigMap/xling-operator-defaults",
        ]
    )
    for doc in kustomized:
        if doc["kind"] not in {"CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_kustomized_objects_validate_against_the_kubernetes_schemas(kustomized: list[dict[str, Any]]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for doc in kustomized:
        try:
            kv.validate(doc, "1.32", strict=True)
        except kv.ValidationError as err:
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, err.path))}: {err.message}"
            )


def test_kustomize_crd_is_the_generated_one(kustomized: list[dict[str, Any]]) -> None:
    (crd,) = [d for d in kustomized if d["kind"] == "CustomResourceDefinition"]
    assert crd["spec"] == yaml.safe_load(CRD_PATH.read_text())["spec"]


def test_kustomize_base_matches_the_helm_chart(kustomized: list[dict[str, Any]]) -> None:
    """Same operator pod and the same RBAC rules as `helm template` with matching names."""
    helm = tool("helm")
    values = ["--set", "fullnameOverride=xling,mlflow.enabled=false,tests.enabled=false"]
    charted = docs_of(run(helm, "template", "xling", ROOT / "helm" / "xling", "-n", NAMESPACE, *values))

    def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
        (obj,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return obj

    for kind, name in [
        ("Role", "xling-operator"),
        ("Role", "xling-operator-leader-election"),
        ("ClusterRole", "xling-operator-xling-system-discovery"),
    ]:
        assert grants(find(kustomized, kind, name)["rules"]) == grants(find(charted, kind, name)["rules"]), (
            kind,
            name,
        )
    pod_k = find(kustomized, "Deployment", "xling-operator")["spec"]["template"]["spec"]
    pod_h = find(charted, "Deployment", "xling-operator")["spec"]["template"]["spec"]
    assert pod_k == pod_h
    for dep in (
        find(kustomized, "Deployment", "xling-operator"),
        find(charted, "Deployment", "xling-operator"),
    ):
        assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"


# --- container images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    run(hadolint, "--no-color", dockerfile.relative_to(ROOT))


def dockerignore_allows(path: str) -> bool:
    """`.dockerignore` semantics, enough for ours: the last matching pattern wins, a directory covers its files."""
    rules = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    allowed, path = True, path.rstrip("/")
    for rule in rules:
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            allowed = rule.startswith("!")
    return allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_in_the_build_context(dockerfile: Path) -> None:
    """Docker cannot run here: at least check every COPY source is in the repo and not excluded by .dockerignore."""
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words[1:-1] if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repository"
            assert dockerignore_allows(src), f"{dockerfile.name}: COPY {src}: excluded by .dockerignore"


def test_base_images_are_pinned() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        for arg, image in re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, flags=re.M):
            name, _, tag = image.rpartition(":")
            assert name and re.fullmatch(r"v?\d+(\.\d+)+[-\w.]*", tag), (
                f"{dockerfile.name}: {arg}={image} is not pinned"
            )


def test_operator_image_gets_no_torch() -> None:
    """The operator image installs `.[operator]`: base dependencies + the operator extra, none of them heavy."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["operator"]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in wanted}
    assert not names & {"torch", "ray", "deepspeed", "transformers", "faiss-cpu", "faiss-gpu", "mlflow"}
    assert '".[operator]"' in (ROOT / "docker" / "operator.Dockerfile").read_text()


# --- docs/install.md: the command that submits a sample ------------------------------------------------------------


def test_docs_patch_command_yields_a_valid_experiment(cr_validator: jsonschema.Draft4Validator) -> None:
    """Run docs/install.md's `kubectl patch --local ... | kubectl apply` up to the pipe: offline, it must print a
    RetrievalExperiment with the image and tracking URI set, still valid against the CRD."""
    kubectl = tool("kubectl")
    doc = (ROOT / "docs" / "install.md").read_text()
    (command,) = re.findall(
        r"^(kubectl patch --local .*?)\s*\|\s*kubectl .*? apply -f -$", doc, flags=re.S | re.M
    )
    script = f"REGISTRY=registry.example.com/ml\n{command.replace('kubectl ', f'{kubectl} ', 1)}"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (exp,) = docs_of(proc.stdout)
    assert exp["spec"]["cluster"]["image"] == "registry.example.com/ml/xling:0.1.0"
    assert exp["spec"]["tracking"]["trackingUri"] == "http://xling-mlflow.xling.svc:5000"
    assert not list(cr_validator.iter_errors(exp))
