"""``xling render FILE``: print the ConfigMap and RayJob the operator would create, without a cluster.

Validation with the platform defaults (``Platform.experiment``, i.e. ``manifests.validate``), cluster checks and
manifests are the operator's own, so what is printed is exactly what would be applied (or refused); only the
owner's uid is a placeholder (the API server assigns it).
The header says how the spec maps to pods. ``--defaults`` reads the platform defaults (Helm's
``platformDefaults``), else $XLING_PLATFORM_DEFAULTS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from xling.api.errors import Problem, command
from xling.api.spec.base import KIND, SpecError
from xling.operator import manifests as mf
from xling.operator.checks import cluster_problems
from xling.operator.cluster_sizing import describe_pods
from xling.operator.defaults import Platform

UID_PLACEHOLDER = "00000000-0000-0000-0000-000000000000"


class _Plain(yaml.SafeDumper):
    """Every mapping written out where it occurs: no ``&id001``/``*id001`` for objects the builders share."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def render(path: str | Path, namespace: str | None = None, defaults: str | Path | None = None) -> str:
    """Multi-document YAML: ConfigMap, then RayJob. Raises SpecError like ``xling run`` does, and for what
    the operator would refuse (Validated=False)."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(path, f"cannot read a YAML document: {err}") from None
    body = next((d for d in docs if isinstance(d, dict) and d.get("kind") == KIND), docs[0] if docs else None)
    if not isinstance(body, dict):
        raise SpecError(path, f"no {KIND} document")
    meta = dict(body.get("metadata") or {})
    meta["namespace"] = namespace or meta.get("namespace") or "default"
    meta.setdefault("uid", UID_PLACEHOLDER)
    body = {**body, "metadata": meta}
    platform = Platform.load(defaults)
    exp = platform.experiment(body)
    if problems := cluster_problems(exp, platform):
        raise SpecError(
            path, "the operator would refuse this experiment:", problems=[Problem(m) for _, m in problems]
        )
    owner = mf.Owner.from_body(body)
    lines = [
        f"Rendered by `xling render {path}`: what the operator creates for {owner.namespace}/{owner.name}."
    ]
    lines += [f"  {line}" for line in describe_pods(exp.spec)]
    header = "".join(f"# {line}\n" for line in lines)
    docs = [mf.configmap(exp, owner, body.get("spec")), mf.rayjob(exp, owner)]
    return header + yaml.dump_all(docs, Dumper=_Plain, sort_keys=False)


@command
def run_render(args: argparse.Namespace) -> int:
    sys.stdout.write(render(args.file, args.namespace, args.defaults))
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
    parser.add_argument(
        "--defaults",
        default=None,
        help="platform defaults YAML (default: $XLING_PLATFORM_DEFAULTS; see docs/operator.md)",
    )
    parser.set_defaults(func=run_render)
    return parser
