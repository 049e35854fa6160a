"""The RetrievalExperiment CRD, generated from the pydantic spec (the single source of truth).

``python -m xling.operator.crd DIR [VALUES_SCHEMA]`` writes ``DIR/retrievalexperiments.xling.io.yaml`` (and the
Helm chart's ``trainer.pod`` schema into VALUES_SCHEMA); a test fails when either committed file is stale. Pydantic's JSON Schema is turned into a *structural* OpenAPI v3 schema, which is what
the API server accepts: no ``$ref``/``anyOf``-null/``additionalProperties: false``, ``nullable`` instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault

from xling.api.spec.base import API_VERSION, KIND
from xling.api.spec.experiment import ExperimentSpec
from xling.operator.conditions import ExperimentStatus

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "retrievalexperiments"
SINGULAR = "retrievalexperiment"
SHORT_NAMES = ["rexp"]
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"

#: Cross-field rules checked by the API server at apply time, mirroring ExperimentSpec._cross_field.
#: Each touches only scalars or size(), so the CEL cost budget holds without maxItems everywhere.
SPEC_RULES: list[dict[str, str]] = [
    {
        "rule": "!(self.sampling.strategy in ['xy', 'hybrid']) || size(self.data.languages) >= 2",
        "message": "sampling.strategy xy and hybrid need at least two data.languages",
        "fieldPath": ".sampling.strategy",
    },
    {
        "rule": "self.optimization.globalBatchSize >= self.distributed.numWorkers",
        "message": "optimization.globalBatchSize must be at least distributed.numWorkers",
        "fieldPath": ".optimization.globalBatchSize",
    },
    {
        "rule": "self.optimization.globalBatchSize % self.distributed.numWorkers == 0",
        "message": "optimization.globalBatchSize must be divisible by distributed.numWorkers",
        "fieldPath": ".optimization.globalBatchSize",
    },
    {
        "rule": "self.optimization.warmupSteps <= self.optimization.maxSteps",
        "message": "optimization.warmupSteps must not exceed optimization.maxSteps",
        "fieldPath": ".optimization.warmupSteps",
    },
]
#: Rules attached to a nested object (evaluated only where that object is present and not null).
NESTED_RULES: dict[str, list[dict[str, str]]] = {
    "DeepSpeedSpec": [
        {  # int-or-string carries no enum: the values are checked here
            "rule": "string(self.stage) in ['0', '1', '2', '3', 'auto']",
            "message": "deepspeed.stage must be 0, 1, 2, 3 or auto",
            "fieldPath": ".stage",
        },
        {
            "rule": "self.offloadParam.device == 'none' || string(self.stage) == '3'",
            "message": "deepspeed.offloadParam needs stage 3",
            "fieldPath": ".offloadParam.device",
        },
    ],
}
ROOT_RULES = [
    {
        "rule": "size(self.metadata.name) <= 63",
        "message": "metadata.name must be at most 63 characters (it names Ray services and DNS labels)",
    },
    {
        "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be a DNS-1035 label: lower-case letters, digits and '-', starting with a "
        "letter (it names the RayJob and its Services)",
    },
]
#: Spec fields that may change after creation; the API server refuses edits of all others (CEL transition
#: rules), so only suspend and the deadlines ever reach the operator as changes.
MUTABLE_SPEC_FIELDS = ("suspend", "deadlines")


def immutability_rules(fields: list[str], optional: list[str]) -> list[dict[str, str]]:
    """``self == oldSelf`` for each immutable field, as one spec-level transition rule per field: present in
    both, equal; an optional field may not be added or removed either."""
    rules = []
    for name in fields:
        same = f"self.{name} == oldSelf.{name}"
        rule = (
            f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || {same})"
            if name in optional
            else same
        )
        rules.append(
            {
                "rule": rule,
                "message": f"spec.{name} is immutable: only spec.suspend and spec.deadlines may change; delete "
                "and re-create the experiment to change it",
                "fieldPath": f".{name}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "Step of maxSteps"},
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "description": "Why the experiment is not Ready (succeeded) yet, or how it succeeded",
    },
    {"name": "Sampling", "type": "string", "jsonPath": ".spec.sampling.strategy"},
    {"name": "Alpha", "type": "number", "jsonPath": ".spec.sampling.alpha"},
    {"name": "Best", "type": "number", "jsonPath": ".status.best.value", "description": "Best metric value"},
    {"name": "Metric", "type": "string", "jsonPath": ".status.best.metric", "priority": 1},
    {"name": "RayJob", "type": "string", "jsonPath": ".status.rayJobName", "priority": 1},
    {"name": "MLflow", "type": "string", "jsonPath": ".status.mlflow.runUrl", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class _FactoryDefaults(GenerateJsonSchema):
    """Emit defaults for ``default_factory`` fields too: ``{}`` for objects, so the API server fills nested
    defaults and ``kubectl get -o yaml`` shows the resolved spec."""

    def get_default_value(self, schema: Any) -> Any:
        if "default_factory" not in schema:
            return super().get_default_value(schema)
        if schema.get("default_factory_takes_data"):
            return NoDefault
        value = schema["default_factory"]()
        return {} if isinstance(value, BaseModel) else value


def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, schema_generator=_FactoryDefaults)


def structural(
    node: dict[str, Any], defs: dict[str, Any], rules: dict[str, list[dict[str, str]]]
) -> dict[str, Any]:
    """Convert one pydantic JSON-Schema node (and its children) into a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        out = structural({**defs[name], **node}, defs, rules)
        if name in rules:
            out["x-kubernetes-validations"] = rules[name]
        return out
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            every = node.pop(key)
            branches = [b for b in every if b.get("type") != "null"]
            nullable = len(branches) < len(every)
            types = {b.get("type") for b in branches}
            if len(branches) == 1:
                merged = structural({**branches[0], **node}, defs, rules)
                if nullable:
                    merged["nullable"] = True
                return merged
            if types == {"integer", "string"}:
                return {**_annotations(node), "x-kubernetes-int-or-string": True}
            raise ValueError(f"no structural form for a union of {sorted(map(str, types))}: {node}")

    out = _annotations(node)
    kind = node.get("type")
    if "const" in node:
        out["enum"] = [node["const"]]
    if kind is None:  # Any: keep whatever the user wrote
        out["x-kubernetes-preserve-unknown-fields"] = True
        return out
    out["type"] = kind
    for key in (
        "enum",
        "pattern",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "format",
        "minimum",
        "maximum",
    ):
        if key in node:
            out[key] = node[key]
    for bound, key in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[key], out[bound] = node[bound], True
    for key in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
        if key in node:
            out[key] = node[key]
    if kind == "array":
        out["items"] = structural(node.get("items", {}), defs, rules)
    elif kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props is not None:
            out["properties"] = {k: structural(v, defs, rules) for k, v in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs, rules)
        elif extra is True or (props is None and not extra):
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def json_schema(node: Any) -> Any:
    """A structural OpenAPI v3 schema as JSON Schema (draft 4 keeps ``exclusiveMinimum: true`` semantics).

    - ``nullable: true`` allows null;
    - int-or-string fields take either;
    - objects with declared properties reject unknown fields, like kubectl's strict field validation, unless
      they preserve unknown fields. CEL rules (x-kubernetes-validations) are dropped.
    """
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"
    }
    if "properties" in node and "properties" in out:
        out["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (
        node.get("type") == "object"
        and "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out.setdefault("additionalProperties", False)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def pod_values_schema() -> dict[str, Any]:
    """The Helm chart's ``trainer.pod`` schema: spec.cluster.pod's, so a value the operator would refuse is
    refused by ``helm install`` already."""
    pod = openapi_schema()["properties"]["spec"]["properties"]["cluster"]["properties"]["pod"]
    schema = json_schema(pod)
    schema.pop("default", None)
    return {
        **schema,
        "description": "spec.cluster.pod defaults of every experiment (PodOverrides, camelCase).",
    }


def write_values_schema(path: Path) -> None:
    """Put :func:`pod_values_schema` into the chart's values.schema.json (the rest of the file is hand-written)."""
    doc = json.loads(path.read_text())
    doc["properties"]["trainer"]["properties"]["pod"] = pod_values_schema()
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _annotations(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if node.get("description"):
        out["description"] = " ".join(str(node["description"]).split())
    if "default" in node and node["default"] is not None:
        out["default"] = node["default"]
    return out


def _schema_of(model: type[BaseModel], rules: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    raw = _json_schema(model)
    return structural({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}), rules)


def openapi_schema() -> dict[str, Any]:
    """The version's ``openAPIV3Schema``."""
    spec = _schema_of(ExperimentSpec, NESTED_RULES)
    fields = [k for k in spec["properties"] if k not in MUTABLE_SPEC_FIELDS]
    optional = [
        k for k in fields if k not in spec.get("required", []) and "default" not in spec["properties"][k]
    ]
    spec["x-kubernetes-validations"] = SPEC_RULES + immutability_rules(fields, optional)
    status = _schema_of(ExperimentStatus, {})
    status["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "type": "object",
        "description": "A multilingual dense-retrieval training experiment, run as a KubeRay RayJob.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": ROOT_RULES,
    }


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "xling"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["xling"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render_crd() -> str:
    header = (
        "# Generated by `python -m xling.operator.crd manifests/crds` from xling.api.spec. Do not edit.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    """``DIR [VALUES_SCHEMA]``: write the CRD into DIR and, if given, trainer.pod into the chart's values schema."""
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0] if args else "manifests/crds")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CRD_FILE
    path.write_text(render_crd())
    print(path)
    if len(args) > 1:
        write_values_schema(Path(args[1]))
        print(args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
