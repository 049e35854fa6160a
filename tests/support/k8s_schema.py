"""Schema helpers shared by the manifest, chart and CRD tests."""

from __future__ import annotations

import copy
import functools
from typing import Any

from xling.operator.crd import json_schema


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules as (apiGroup, resource[/subresource], verb) triples."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


#: A structural OpenAPI v3 schema as JSON Schema (the operator's own converter, which also writes the chart's
#: values schema for trainer.pod).
to_json_schema = json_schema


@functools.cache
def _cel_program(rule: str) -> Any:
    """Compiled once per rule: cel-python's parser is slow, and the emulator evaluates rules on every write."""
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_failures(schema: dict[str, Any], new: Any, old: Any = None) -> list[str]:
    """Messages of the x-kubernetes-validations rules that fail, evaluated where they are attached, as the API
    server does: rules using oldSelf (transition rules) only on update, where the old value exists too."""
    import celpy

    messages: list[str] = []

    def visit(node: dict[str, Any], value: Any, before: Any) -> None:
        if value is None:
            return
        for rule in node.get("x-kubernetes-validations", []):
            transition = "oldSelf" in rule["rule"]
            if transition and before is None:
                continue
            context = {"self": celpy.json_to_cel(value)}
            if transition:
                context["oldSelf"] = celpy.json_to_cel(before)
            if not _cel_program(rule["rule"]).evaluate(context):
                messages.append(rule["message"])
        for key, child in (node.get("properties") or {}).items():
            if isinstance(value, dict) and key in value:
                visit(child, value[key], before.get(key) if isinstance(before, dict) else None)

    visit(schema, new, old)
    return messages


def default_and_prune(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting and pruning, as the API server does on write: unknown fields of objects with
    declared properties are dropped (unless preserved), nulls of non-nullable fields are dropped, missing fields
    with a default get it (and the default's own nested defaults)."""
    if isinstance(value, dict) and node.get("type") == "object":
        props = node.get("properties")
        if props is not None:
            out = {}
            for key, child in value.items():
                if key in props:
                    if child is None and not props[key].get("nullable"):
                        continue
                    out[key] = default_and_prune(props[key], child)
                elif node.get("x-kubernetes-preserve-unknown-fields"):
                    out[key] = child
            for key, prop in props.items():
                if key not in out and "default" in prop:
                    out[key] = default_and_prune(prop, copy.deepcopy(prop["default"]))
            return out
        if isinstance(node.get("additionalProperties"), dict):
            return {k: default_and_prune(node["additionalProperties"], v) for k, v in value.items()}
        return value
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [default_and_prune(node["items"], v) for v in value]
    return value


def admission_errors(schema: dict[str, Any], obj: Any, old: Any = None) -> list[str]:
    """Schema and CEL errors of an already defaulted and pruned object (``old``: the stored one, on update)."""
    import jsonschema

    validator = jsonschema.Draft4Validator(to_json_schema(schema))
    errors = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + cel_failures(schema, obj, old)
