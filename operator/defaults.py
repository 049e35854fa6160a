"""Platform defaults: what a platform engineer sets once in Helm values and the operator injects into every
experiment (trainer image, checkpoint storage, tracking URI, pod overrides, deadlines); the CR overrides them.

The file (``$XLING_PLATFORM_DEFAULTS``, a ConfigMap the chart mounts) is YAML::

    spec:                      # a partial RetrievalExperiment spec, merged under the user's
      cluster: {image: registry.example.com/xling-trainer:0.1.0, pod: {priorityClassName: batch}}
      storage: {checkpointUri: s3://ckpt/xling}
      tracking: {trackingUri: http://xling-mlflow.xling.svc:5000}
    allowedSecrets: [mlflow-auth]               # Secrets the operator itself may read, besides labelled ones
    allowedTrackingHosts: [xling-mlflow.xling.svc]   # hosts an experiment may send metrics/credentials to

An allow-list fails closed: a file without hosts allows no http(s) tracking server (``["*"]`` allows any).
Only without a file at all (``xling render`` with no defaults, tests) is nothing restricted.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from xling.api.env import PLATFORM_DEFAULTS_ENV
from xling.api.spec.base import SpecError
from xling.api.spec.experiment import RetrievalExperiment
from xling.operator.manifests import validate

#: The key of the platform-defaults ConfigMap that holds the document (mounted as the file PLATFORM_DEFAULTS_ENV names).
CONFIGMAP_KEY = "defaults.yaml"
#: Spec sections a platform may default (the research settings are the user's). A default only takes
#: effect where the CRD has none (the API server fills those in first): cluster.image, cluster.pod.*,
#: cluster.env/envFrom, cluster.serviceAccountName, storage, tracking.trackingUri/credentials.
DEFAULTABLE = ("cluster", "storage", "tracking")
#: Blocks that carry credentials: taken whole from the platform only when the user sets none of their
#: location, so the platform's Secret never travels to a URI the user picked.
_LOCATION = {"storage": "checkpointUri", "tracking": "trackingUri"}


def merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge recursively, everything else is replaced, except that an
    empty value in ``over`` (None, [], {}) keeps ``base``'s: the API server fills the CRD's empty defaults
    into every spec, and those must not erase a platform's lists (e.g. imagePullSecrets)."""
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = dict(copy.deepcopy(base))
        for key, value in over.items():
            if key in out and value in (None, [], {}):
                continue
            out[key] = merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


@dataclass(frozen=True)
class Platform:
    spec: dict[str, Any] = field(default_factory=dict)
    allowed_secrets: frozenset[str] = frozenset()
    #: None: no defaults file, nothing restricted; otherwise the hosts allowed ("*": any), empty = none.
    allowed_tracking_hosts: frozenset[str] | None = None

    @classmethod
    def parse(cls, doc: Any, source: str) -> Platform:
        doc = doc or {}
        if not isinstance(doc, dict) or set(doc) - {"spec", "allowedSecrets", "allowedTrackingHosts"}:
            raise SpecError(source, "expected keys spec, allowedSecrets, allowedTrackingHosts")
        spec = doc.get("spec") or {}
        extra = set(spec) - set(DEFAULTABLE)
        if extra:
            raise SpecError(
                source, f"not a platform default (allowed: {DEFAULTABLE})", field=f"spec.{sorted(extra)[0]}"
            )
        return cls(
            spec,
            frozenset(doc.get("allowedSecrets") or ()),
            frozenset(doc.get("allowedTrackingHosts") or ()),  # missing or empty: no host (fail closed)
        )

    @classmethod
    def load(cls, path: str | Path | None = None) -> Platform:
        """From ``path`` or $XLING_PLATFORM_DEFAULTS; none = no defaults, no allow-lists. ``path`` is the
        defaults document the operator mounts, or the ConfigMap holding it (``manifests/operator``)."""
        path = path or os.environ.get(PLATFORM_DEFAULTS_ENV)
        if not path:
            return cls()
        try:
            doc = yaml.safe_load(Path(path).read_text())
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":  # the file the docs name, as applied
                doc = yaml.safe_load(((doc.get("data") or {}).get(CONFIGMAP_KEY)) or "")
            return cls.parse(doc, str(path))
        except (OSError, yaml.YAMLError) as err:
            raise SpecError(path, f"cannot read the platform defaults: {err}") from None

    def apply(self, user_spec: Any) -> Any:
        """The user's spec over the platform's; credential-bearing blocks are not mixed (see _LOCATION)."""
        if not isinstance(user_spec, Mapping):
            return user_spec
        base = copy.deepcopy(self.spec)
        for block, location in _LOCATION.items():
            mine = user_spec.get(block)
            if isinstance(mine, Mapping) and location in mine and isinstance(base.get(block), dict):
                base[block].pop("credentials", None)
        return merge(base, user_spec)

    def experiment(self, body: Mapping[str, Any]) -> RetrievalExperiment:
        """The experiment with these defaults under the user's spec; raises SpecError naming the field."""
        return validate({**body, "spec": self.apply(body.get("spec"))})

    def tracking_host_allowed(self, uri: str | None) -> bool:
        hosts = self.allowed_tracking_hosts
        if not uri or hosts is None or "*" in hosts or "://" not in uri or uri.startswith("sqlite:"):
            return True
        return (urlsplit(uri).hostname or "") in hosts
