"""``xling render FILE``: print the ConfigMap and RayJob the operator would create, without a cluster.

Validation and manifests are the operator's own (:func:`reconcile.validate`, :mod:`manifests`), so what is
printed is exactly what would be applied; only the owner's uid is a placeholder (the API server assigns it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from xling.operator import manifests as mf
from xling.trainer.spec import KIND, SpecError

UID_PLACEHOLDER = "00000000-0000-0000-0000-000000000000"


def render(path: str | Path, namespace: str | None = None) -> str:
    """Multi-document YAML: ConfigMap, then RayJob. Raises SpecError like ``xling run`` does."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot read a YAML document: {err}") from None
    body = next((d for d in docs if isinstance(d, dict) and d.get("kind") == KIND), docs[0] if docs else None)
    if not isinstance(body, dict):
        raise SpecError(f"{path}: no {KIND} document")
    meta = dict(body.get("metadata") or {})
    meta["namespace"] = namespace or meta.get("namespace") or "default"
    meta.setdefault("uid", UID_PLACEHOLDER)
    body = {**body, "metadata": meta}
    exp = mf.validate(body)
    owner = mf.Owner.from_body(body)
    header = f"# Rendered by `xling render {path}`: what the operator creates for {owner.namespace}/{owner.name}.\n"
    return header + yaml.safe_dump_all([mf.configmap(exp, owner), mf.rayjob(exp, owner)], sort_keys=False)


def run_render(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(render(args.file, args.namespace))
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``render``; the parsed namespace carries ``func=run_render`` (returns the exit code)."""
    parser = subparsers.add_parser(
        "render", help="print the ConfigMap and KubeRay RayJob the operator would create for FILE"
    )
    parser.add_argument("file", help="a RetrievalExperiment YAML file")
    parser.add_argument(
        "-n", "--namespace", default=None, help="namespace to render for (default: the file's)"
    )
    parser.set_defaults(func=run_render)
    return parser
