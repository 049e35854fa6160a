"""An in-memory Kubernetes API for operator tests: KMock 0.8 plus what a real API server would add.

KMock stores objects and serves CRUD/watch, but has no uid, resourceVersion, generation, generateName,
/status isolation, optimistic concurrency or ownerReference garbage collection (see ../shared/docs/
platform.md, section 7). The operator relies on all of these, so :class:`Emulator` adds them, plus the shims
kubectl needs (201 on create, kind on lists). Run it standalone with ``python tests/k8s_emulator.py`` (prints
the URL) for the benchmark or by hand with kubectl.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import secrets
import uuid
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import dicts as kdicts

from xling.operator import crd

NAMESPACED_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def declare(k8s: kmock.KubernetesEmulator) -> None:
    """Discovery: what kopf, kubectl and the operator need to see (KMock serves only declared resources)."""
    res = k8s.resources
    ro = {"get", "list", "watch"}
    res["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=ro | {"create"})
    res["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=ro
    )
    for plural, kind in (("configmaps", "ConfigMap"), ("secrets", "Secret"), ("events", "Event")):
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
    res["ray.io/v1/rayjobs"] = kmock.ResourceInfo(
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


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _counter: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _guard: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    #: (verb, group, resource[/subresource], user agent) of every Kubernetes API request, as RBAC names them.
    log: list[tuple[str, str, str, str]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        declare(self)

    def _get_resources(self) -> list[Any]:
        """Declared resources only: KMock also scans every stored object here, on every request (O(n) each)."""
        return list(self.resources)

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
            meta.update(
                uid=str(uuid.uuid4()), creationTimestamp=now, resourceVersion=str(next(self._counter))
            )
            meta["generation"] = 1
            if self._has_status(res):
                data.pop("status", None)
        elif request.action == kmock.action.UPDATE and request.name:
            key = (res, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return  # KMock answers 404
            current = self.objects[key].raw
            rv = str(next(self._counter))
            if isinstance(data, list):  # JSON patch: its "test" ops see the real resourceVersion
                try:
                    merged = jsonpatch.apply_patch(current, data, in_place=False)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                    raise _conflict(str(err)) from None
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
            gen = current["metadata"].get("generation", 1) + (merged.get("spec") != current.get("spec"))
            data.setdefault("metadata", {}).update(resourceVersion=rv, generation=gen)

    def _record(self, request: kmock.Request) -> None:
        if request.resource is not None and request.action is not None and request.resource.plural:
            agent = {k.lower(): v for k, v in request.headers.items()}.get("user-agent", "")
            name = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            self.log.append((_VERBS[request.action.value], request.resource.group or "", name, agent))

    async def _handle(self, request: kmock.Request) -> Any:
        """Log compactly and keep only in-flight requests in KMock's own list: matching a request against the
        reactions scans that whole list, which made every request O(requests so far) and 500 objects crawl."""
        self._record(request)
        try:
            return await self._handle_k8s(request)
        finally:
            self._requests.remove(request)

    async def _handle_k8s(self, request: kmock.Request) -> Any:
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

    async def _serve_create(self, request: kmock.Request) -> Any:
        return kmock.Response(status=201, payload=await super()._serve_create(request))

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
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
