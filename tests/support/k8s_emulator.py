"""An in-memory Kubernetes API for operator tests: KMock 0.8 plus what a real API server would add.

KMock stores objects and serves CRUD/watch, but has no uid, resourceVersion, generation, generateName,
/status isolation, optimistic concurrency or ownerReference garbage collection (see ../shared/docs/
platform.md, section 7). The operator relies on all of these, so :class:`Emulator` adds them, plus the shims
kubectl needs (201 on create, kind on lists). Run it standalone with ``python -m tests.support.k8s_emulator`` (prints
the URL) for the benchmark or by hand with kubectl.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import secrets
import sys
import uuid
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import dicts as kdicts

from tests.support.k8s_schema import admission_errors, default_and_prune
from xling.operator import crd

NAMESPACED_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def declare(k8s: kmock.KubernetesEmulator) -> None:
    """Discovery: what kopf, kubectl and the operator need to see (KMock serves only declared resources)."""
    res = k8s.resources
    ro = {"get", "list", "watch"}
    res["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=ro | {"create"})
    res["v1/nodes"] = kmock.ResourceInfo(kind="Node", namespaced=False, verbs=ro | {"create"})
    res["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=ro
    )
    core = (
        ("configmaps", "ConfigMap"),
        ("secrets", "Secret"),
        ("events", "Event"),
        ("persistentvolumeclaims", "PersistentVolumeClaim"),
        ("pods", "Pod"),
    )
    for plural, kind in core:
        res[f"v1/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=NAMESPACED_VERBS
        )
    res[f"{crd.GROUP}/{crd.VERSION}/{crd.PLURAL}"] = kmock.ResourceInfo(
        kind=crd.KIND,
        singular=crd.SINGULAR,
        namespaced=True,
        verbs=NAMESPACED_VERBS,
        shortnames=set(crd.SHORT_NAMES),
        subresources={"status"},
    )
    res["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
        kind="Lease", singular="lease", namespaced=True, verbs=NAMESPACED_VERBS
    )
    declare_kuberay(k8s)


def declare_kuberay(k8s: kmock.KubernetesEmulator) -> None:
    """KubeRay's RayJob API: absent until KubeRay is installed (``Emulator(kuberay=False)``)."""
    k8s.resources["ray.io/v1/rayjobs"] = kmock.ResourceInfo(
        kind="RayJob", singular="rayjob", namespaced=True, verbs=NAMESPACED_VERBS, subresources={"status"}
    )


_VERBS = {
    "LIST": "list",
    "WATCH": "watch",
    "FETCH": "get",
    "CREATE": "create",
    "UPDATE": "patch",
    "DELETE": "delete",
}


def _conflict(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=409, reason="Conflict", message=message)


def _invalid(message: str) -> kmock.KubernetesError:
    """422, as for a failed JSON-patch ``test`` or a custom resource its CRD refuses."""
    return kmock.KubernetesError(status=422, reason="Invalid", message=message)


#: The RetrievalExperiment CRD's schema: admission (defaulting, pruning, validation, CEL) as the API server.
EXPERIMENT_SCHEMA = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def admit(obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """The object as the API server stores it, or a 422 naming what the CRD refuses."""
    admitted = default_and_prune(EXPERIMENT_SCHEMA, obj)
    errors = admission_errors(EXPERIMENT_SCHEMA, admitted, old)
    if errors:
        raise _invalid(
            f"{crd.KIND}.{crd.GROUP} {obj.get('metadata', {}).get('name')!r} is invalid: " + "; ".join(errors)
        )
    return admitted


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch that turns ``old`` into ``new`` (None deletes; lists replaced)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old or old[key] != value:
            out[key] = merge_diff(old.get(key), value) if key in old else value
    return out


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    #: False: the cluster has no KubeRay (no ray.io API) until :meth:`install_kuberay`.
    kuberay: bool = True
    #: Restricted RBAC (Helm secrets.restrictRbac): only these Secrets may be read, others answer 403.
    readable_secrets: frozenset[str] | None = None
    #: Namespaces enforcing the ``restricted`` Pod Security Standard: pods that break it answer 403.
    restricted_namespaces: frozenset[str] = frozenset()
    _counter: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _guard: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    #: The newest resourceVersion handed out; watches from versions below ``_compacted`` get 410 Gone.
    _rv: int = attrs.field(default=0, init=False)
    _compacted: int = attrs.field(default=0, init=False)
    #: Set to end every open watch stream (as an API server restart or a load balancer does).
    _drop: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    #: (verb, group, resource[/subresource], user agent) of every Kubernetes API request, as RBAC names them.
    log: list[tuple[str, str, str, str]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace  # KMock itself knows no PUT
        declare(self)
        if not self.kuberay:
            del self.resources["ray.io/v1/rayjobs"]

    def install_kuberay(self) -> None:
        declare_kuberay(self)
        self.kuberay = True

    def compact(self) -> None:
        """Forget history, as etcd compaction does: watches resuming from an older version get 410 Gone."""
        self._compacted = self._rv + 1

    def drop_watches(self) -> None:
        """End every open watch stream now; clients reconnect from the last resourceVersion they saw."""
        self._drop.set()
        self._drop = asyncio.Event()

    def _next_rv(self) -> str:
        self._rv = next(self._counter)
        return str(self._rv)

    def _get_resources(self) -> list[Any]:
        """Declared resources only: KMock also scans every stored object here, on every request (O(n) each)."""
        return [r for r in self.resources if self.kuberay or r.group != "ray.io"]  # KMock autovivifies keys

    def _has_status(self, res: Any) -> bool:
        return res in self.resources and "status" in self.resources[res].subresources

    def _prepare(self, request: kmock.Request) -> None:
        """Fill server-side metadata into the request body, in place, before KMock stores it."""
        data, res = request.data, request.resource
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            now = (
                datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
            )
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now, resourceVersion=self._next_rv())
            meta["generation"] = 1
            if self._has_status(res):
                data.pop("status", None)
            if self._is_experiment(res):
                admitted = admit(data, None)
                data.clear()
                data.update(admitted)
        elif request.action == kmock.action.UPDATE and request.name:
            key = (res, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return  # KMock answers 404
            current = self.objects[key].raw
            rv = self._next_rv()
            if isinstance(data, list):  # JSON patch: its "test" ops see the real resourceVersion
                try:
                    merged = jsonpatch.apply_patch(current, data, in_place=False)
                except jsonpatch.JsonPatchTestFailed as err:
                    raise _invalid(f"the server rejected our request: {err}") from None  # 422, as kube does
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                    raise _invalid(str(err)) from None
                if self._is_experiment(res):
                    merged = admit(merged, current)
                    data += [
                        {"op": "add", "path": f"/{k}", "value": merged[k]}
                        for k in ("spec", "status")
                        if k in merged
                    ]
                gen = current["metadata"].get("generation", 1) + (merged.get("spec") != current.get("spec"))
                data += [
                    {"op": "add", "path": "/metadata/resourceVersion", "value": rv},
                    {"op": "add", "path": "/metadata/generation", "value": gen},
                ]
                return
            wanted_rv = (data.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"].get("resourceVersion"):
                raise _conflict(f"the object has been modified; resourceVersion {wanted_rv} is stale")
            if request.subresource == "status":
                kept = {"status": data.get("status")}
                data.clear()
                data.update(kept)
            elif self._has_status(res):
                data.pop("status", None)
            merged = kdicts.patch_dict(copy.deepcopy(current), data)
            if self._is_experiment(res):
                merged = admit(merged, current)
                data.clear()
                data.update(merge_diff(current, merged))
            gen = current["metadata"].get("generation", 1) + (merged.get("spec") != current.get("spec"))
            data.setdefault("metadata", {}).update(resourceVersion=rv, generation=gen)

    @staticmethod
    def _is_experiment(res: Any) -> bool:
        return res is not None and (res.group, res.plural) == (crd.GROUP, crd.PLURAL)

    @staticmethod
    def _is_replace(request: kmock.Request) -> bool:
        return request.method == kmock.method.PUT and request.resource is not None and bool(request.name)

    def _record(self, request: kmock.Request) -> None:
        replace = self._is_replace(request)
        if request.resource is not None and (request.action or replace) and request.resource.plural:
            agent = {k.lower(): v for k, v in request.headers.items()}.get("user-agent", "")
            name = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            verb = "update" if replace else _VERBS[request.action.value]
            self.log.append((verb, request.resource.group or "", name, agent))

    async def _handle(self, request: kmock.Request) -> Any:
        """Log compactly and keep only in-flight requests in KMock's own list: matching a request against the
        reactions scans that whole list, which made every request O(requests so far) and 500 objects crawl."""
        self._record(request)
        try:
            return await self._handle_k8s(request)
        finally:
            self._requests.remove(request)

    async def _handle_k8s(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.resource.group == "ray.io" and not self.kuberay:
            raise kmock.KubernetesError(
                status=404, reason="NotFound", message="the server could not find the requested resource"
            )
        if (
            self.readable_secrets is not None
            and request.resource is not None
            and request.resource.plural == "secrets"
            and request.action == kmock.action.FETCH
            and request.name not in self.readable_secrets
        ):
            raise kmock.KubernetesError(
                status=403,
                reason="Forbidden",
                message=f'secrets "{request.name}" is forbidden: cannot get resource "secrets" in the namespace',
            )
        if (
            request.resource is not None
            and request.resource.plural == "pods"
            and request.action == kmock.action.CREATE
            and (problems := self._pod_security(request.namespace, request.data))
        ):
            raise kmock.KubernetesError(
                status=403,
                reason="Forbidden",
                message=f'pods is forbidden: violates PodSecurity "restricted:latest": {"; ".join(problems)}',
            )
        if self._is_replace(request):
            async with self._guard:
                return await super()._handle(request)
        if request.resource is None or request.action not in (
            kmock.action.CREATE,
            kmock.action.UPDATE,
            kmock.action.DELETE,
        ):
            return await super()._handle(request)
        async with self._guard:  # one writer at a time, like etcd's serialised revisions
            self._prepare(request)
            response = await super()._handle(request)
            key = (request.resource, request.namespace, request.name)
            if request.action != kmock.action.CREATE and key in self.objects and self.objects[key].deleted:
                await self._collect_garbage()  # only when something vanished: the scan is O(objects)
            return response

    def _pod_security(self, namespace: str | None, pod: Any) -> list[str]:
        """Pod Security admission in the namespaces labelled ``pod-security.kubernetes.io/enforce: restricted``
        (:attr:`restricted_namespaces`: KMock cannot create Namespaces over HTTP)."""
        if namespace not in self.restricted_namespaces or not isinstance(pod, dict):
            return []
        return restricted_violations(pod)

    def _live_uids(self) -> set[str]:
        return {
            obj.raw["metadata"].get("uid")
            for obj in self.objects.values()
            if not obj.deleted and "metadata" in obj.raw
        }

    async def _collect_garbage(self) -> None:
        """Background cascading deletion: dependents of vanished owners go too (finalizers respected)."""
        while True:
            live = self._live_uids()
            orphans = [
                (key, obj)
                for key, obj in self.objects.items()
                if not obj.deleted
                and (refs := obj.raw.get("metadata", {}).get("ownerReferences"))
                and not any(r.get("uid") in live for r in refs)
                and not obj.raw["metadata"].get("deletionTimestamp")
            ]
            if not orphans:
                return
            async with self._lock:
                for (res, _, _), obj in orphans:
                    if obj.raw["metadata"].get("finalizers"):
                        now = datetime.datetime.now(datetime.UTC).isoformat()
                        obj.patch({"metadata": {"deletionTimestamp": now}})
                        await self._buses[res].put({"type": "MODIFIED", "object": obj.raw})
                    else:
                        raw = obj.raw
                        obj.delete()
                        await self._buses[res].put({"type": "DELETED", "object": raw})

    async def _serve_replace(self, request: kmock.Request) -> Any:
        """PUT (update): the body replaces the object; 409 on a stale metadata.resourceVersion (a Lease's
        renewal relies on it). Objects without a /status subresource only, as the operator uses it."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesError(
                    status=404, reason="NotFound", message=f"{request.name} not found"
                )
            obj, data = self.objects[key], request.data
            current = obj.raw["metadata"]
            wanted_rv = (data.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current.get("resourceVersion"):
                raise _conflict(f"the object has been modified; resourceVersion {wanted_rv} is stale")
            meta = data.setdefault("metadata", {})
            meta.update(
                {k: current[k] for k in ("name", "namespace", "uid", "creationTimestamp") if k in current}
            )
            meta.update(resourceVersion=self._next_rv(), generation=current.get("generation", 1))
            obj.create(data)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
            return obj.raw

    async def _serve_create(self, request: kmock.Request) -> Any:
        return kmock.Response(status=201, payload=await super()._serve_create(request))

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """A watch from ``resourceVersion`` N: 410 Gone below the compaction point (kopf then lists again);
        otherwise objects changed after N, then live events (objects unchanged since N are not re-sent).
        Every stream ends on :meth:`drop_watches`."""
        since = request.params.get("resourceVersion")
        since = int(since) if since and since.isdigit() else None
        if since is not None and since < self._compacted:
            yield b""
            gone = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "code": 410,
                "reason": "Expired",
            }
            yield {"type": "ERROR", "object": {**gone, "message": f"too old resource version: {since}"}}
            return
        dropped = asyncio.ensure_future(self._drop.wait())
        events = aiter(super()._serve_watch(request))
        try:
            while True:
                nxt = asyncio.ensure_future(anext(events))
                await asyncio.wait({nxt, dropped}, return_when=asyncio.FIRST_COMPLETED)
                if dropped.done():  # the connection is gone, even if an event was ready: it is not sent
                    nxt.cancel()
                    return
                event = nxt.result()
                if since is not None and isinstance(event, dict) and event.get("type") == "ADDED":
                    version = (event["object"].get("metadata") or {}).get("resourceVersion") or "0"
                    if version.isdigit() and int(version) <= since:
                        continue  # unchanged since the client's version: it has it already
                yield event
        except StopAsyncIteration:
            return
        finally:
            dropped.cancel()

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        payload["metadata"] = {"resourceVersion": str(self._rv)}
        res = request.resource
        kind = self.resources[res].kind if res in self.resources else res.plural.capitalize()
        api_version = f"{res.group}/{res.version}" if res.group else res.version
        return {"apiVersion": api_version, "kind": f"{kind}List", **payload}

    def requests_made(
        self, agents: tuple[str, ...] | None = None, since: int = 0
    ) -> set[tuple[str, str, str]]:
        """(verb, group, resource) of the logged requests; ``agents``: User-Agent prefixes; ``since``: skip N."""
        return {
            (v, g, r) for v, g, r, agent in self.log[since:] if agents is None or agent.startswith(agents)
        }


def kubeconfig(url: str, path: Path) -> Path:
    """A kubeconfig for the emulator: kopf's login, the operator's client and kubectl all read it."""
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
        f"clusters:\n- name: emu\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n"
        "users:\n- name: emu\n  user:\n    token: emulator\n"
        "contexts:\n- name: emu\n  context:\n    cluster: emu\n    user: emu\n    namespace: default\n"
    )
    return path


async def _serve(port: int) -> None:
    async with Emulator() as k8s, kmock.Server(k8s, host="127.0.0.1", port=port) as srv:
        print(str(srv.url).rstrip("/"), flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import sys

    asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))


# --- what the admission and KubeRay do to pods ----------------------------------------------------------------


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the ``restricted`` Pod Security Standard refuses in a pod (its container and pod-level checks)."""
    spec = pod.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    out = [f"host namespaces ({k}=true)" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    for box in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        sc, name = box.get("securityContext") or {}, box.get("name")
        if sc.get("privileged"):
            out.append(f"privileged (container {name!r})")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"allowPrivilegeEscalation != false (container {name!r})")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            out.append(f'unrestricted capabilities (container {name!r} must drop ["ALL"])')
        if (
            not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            or sc.get("runAsUser", pod_sc.get("runAsUser")) == 0
        ):
            out.append(f"runAsNonRoot != true (container {name!r})")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"seccompProfile (container {name!r} must be RuntimeDefault or Localhost)")
    return out


def kuberay_submitter_pod(rayjob: dict[str, Any]) -> dict[str, Any]:
    """The pod KubeRay's submitter Job gets in K8sJobMode (KubeRay 1.7, ``GetDefaultSubmitterTemplate`` and
    ``getSubmitterTemplate``): the RayJob's submitterPodTemplate with KubeRay's command, or, without one,
    KubeRay's default: the head's image, 1 CPU and 1Gi, and nothing else (no security context, pull secrets
    or service account)."""
    spec = rayjob["spec"]
    template = copy.deepcopy(spec.get("submitterPodTemplate") or {})
    if not template:
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        res = {"cpu": "1", "memory": "1Gi"}
        box = {
            "name": "ray-job-submitter",
            "image": head["image"],
            "resources": {"requests": res, "limits": res},
        }
        template = {"spec": {"restartPolicy": "Never", "containers": [box]}}
    box = template["spec"]["containers"][0]
    box.setdefault("command", ["/bin/bash", "-ce", "--"])
    box.setdefault(
        "args", [f"ray job submit --address http://$RAY_DASHBOARD_ADDRESS -- {spec['entrypoint']}"]
    )
    name = rayjob["metadata"]["name"]
    meta = template.setdefault("metadata", {})
    meta.update(generateName=f"{name}-", labels={**(meta.get("labels") or {}), "job-name": name})
    return template


# --- test objects -------------------------------------------------------------------------------------------

BASE_SPEC: dict[str, Any] = {
    "model": {"name": "xling/tiny-random"},
    "data": {"languages": ["de", "en", "sw"], "sources": [{"type": "pairs", "path": "data/pairs.jsonl"}]},
    "sampling": {"strategy": "hybrid", "alpha": 0.25},
    "storage": {"checkpointUri": "s3://ckpt/xling"},  # a cluster run needs shared storage
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (lists and scalars replaced), for spec overrides in tests."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def experiment(
    name: str = "exp", namespace: str = "default", uid: str | None = None, **spec: Any
) -> dict[str, Any]:
    """A RetrievalExperiment body; keyword arguments override parts of BASE_SPEC."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if uid:
        meta["uid"] = uid
    return {
        "apiVersion": f"{crd.GROUP}/{crd.VERSION}",
        "kind": crd.KIND,
        "metadata": meta,
        "spec": merged(BASE_SPEC, spec),
    }
