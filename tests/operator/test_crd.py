"""The generated CRD: fresh, structural, agreeing with pydantic, and its CEL rules doing what they say."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import ROOT
from tests.support.k8s_emulator import experiment
from tests.support.k8s_schema import cel_failures, to_json_schema
from xling.operator import crd, manifests

COMMITTED = ROOT / "manifests" / "crds" / crd.CRD_FILE
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "const", "title", "examples"}


def _version() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]


def test_committed_crd_is_fresh():
    assert COMMITTED.read_text() == crd.render_crd(), (
        "stale CRD: run `python -m xling.operator.crd manifests/crds`"
    )


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}[{key}]")


def test_schema_is_structural():
    """What the API server's structural-schema check demands, node by node."""
    for path, node in _walk(_version()["schema"]["openAPIV3Schema"]):
        assert not FORBIDDEN & set(node), f"{path}: {FORBIDDEN & set(node)}"
        special = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert node.get("type") or special, f"{path}: no type"
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties false"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: both"
        if node.get("x-kubernetes-list-type") == "map":
            required = set(node["items"].get("required", []))
            assert set(node["x-kubernetes-list-map-keys"]) <= required, path
        if node.get("type") == "object" and "default" in node:
            assert isinstance(node["default"], dict), path


def test_names_columns_and_status():
    spec = crd.crd()["spec"]
    assert spec["names"]["shortNames"] == ["rexp"] and spec["names"]["kind"] == "RetrievalExperiment"
    version = _version()
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Sampling"] == ".spec.sampling.strategy"
    assert columns["Alpha"] == ".spec.sampling.alpha" and columns["Best"] == ".status.best.value"
    assert columns["Age"] == ".metadata.creationTimestamp"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


@pytest.fixture(scope="module")
def spec_validator():
    return jsonschema.Draft4Validator(to_json_schema(_version()["schema"]["openAPIV3Schema"]))


def _resolved(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "spec": manifests.validate(body).spec.model_dump(by_alias=True, mode="json")}


@pytest.mark.parametrize(
    "sample", sorted((ROOT / "manifests" / "samples").glob("*.yaml")), ids=lambda p: p.name
)
def test_samples_pass_the_schema_as_written_and_resolved(sample, spec_validator):
    body = yaml.safe_load(sample.read_text())
    spec_validator.validate(body)
    spec_validator.validate(_resolved(body))


def test_schema_rejects_what_pydantic_rejects(spec_validator):
    for bad in (
        experiment(sampling={"strategy": "zz"}),
        experiment(sampling={"alpha": 1.5}),
        experiment(cluster={"workerGroups": [{"name": "Bad_Name"}]}),
        experiment(storage={"checkpointUri": "file:///tmp"}),
    ):
        with pytest.raises(ValueError):
            manifests.validate(bad)
        assert list(spec_validator.iter_errors(bad)), bad["spec"]


CEL_CASES = [
    ({"sampling": {"strategy": "xy"}, "data": {"languages": ["en"]}}, "two data.languages"),
    (
        {"optimization": {"globalBatchSize": 2}, "distributed": {"numWorkers": 4}},
        "at least distributed.numWorkers",
    ),
    ({"optimization": {"globalBatchSize": 6}, "distributed": {"numWorkers": 4}}, "divisible"),
    ({"optimization": {"warmupSteps": 50, "maxSteps": 10}}, "warmupSteps"),
    (
        {"distributed": {"deepspeed": {"stage": 2, "offloadParam": {"device": "cpu"}}}},
        "offloadParam needs stage 3",
    ),
    (
        {"distributed": {"deepspeed": {"stage": "auto", "offloadParam": {"device": "cpu"}}}},
        "offloadParam needs stage 3",
    ),
    ({"distributed": {"deepspeed": {"stage": "fast"}}}, "stage must be 0, 1, 2, 3 or auto"),
    ({"distributed": {"deepspeed": {"stage": 4}}}, "stage must be 0, 1, 2, 3 or auto"),
]


def _cel_failures(doc: dict[str, Any]) -> list[str]:
    """Evaluate every x-kubernetes-validations rule where it is attached, as the API server would (on create)."""
    pytest.importorskip("celpy")
    return cel_failures(_version()["schema"]["openAPIV3Schema"], doc)


def test_cel_rules_accept_valid_specs():
    for sample in sorted((ROOT / "manifests" / "samples").glob("*.yaml")):
        assert _cel_failures(_resolved(yaml.safe_load(sample.read_text()))) == []


@pytest.mark.parametrize(("override", "message"), CEL_CASES)
def test_cel_rules_catch_cross_field_errors_like_pydantic(override, message):
    good = _resolved(experiment())
    bad = copy.deepcopy(good)
    for section, values in override.items():
        bad["spec"][section] = {**(bad["spec"].get(section) or {}), **values}
        if section == "distributed" and "deepspeed" in values:
            ds = _resolved(experiment(distributed={"deepspeed": {"stage": 3}}))["spec"]["distributed"][
                "deepspeed"
            ]
            bad["spec"]["distributed"]["deepspeed"] = {**ds, **values["deepspeed"]}
    failures = _cel_failures(bad)
    assert any(message in m for m in failures), failures
    with pytest.raises(ValueError):
        manifests.validate(bad)
    long_name = {**good, "metadata": {"name": "x" * 64}}
    assert any("63" in m for m in _cel_failures(long_name))
