"""Derive the RBAC an identity needs from the requests it actually sends, and compare with infra/.

Why: least privilege written by hand drifts both ways (a verb the code stopped using stays
granted; a new request is refused in production only). Here every request of a scenario is
recorded at the client boundary (``call_api`` of the official client's ``ApiClient`` or of
``core.kubehttp.KubeHttp``, below ``core.kube.Kube``), mapped to the access the API server
authorises (verb, group, resource, namespace, name), and compared with the grants that infra/'s manifests give the identity. The
comparison fails on a missing grant and on anything broader: an unused verb, a namespaced kind
granted cluster-wide, or a wildcard name where the code only ever touches fixed names.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core import constants as c

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, order=True)
class Access:
    """One authorisation check: what the API server asks RBAC for a request."""

    verb: str
    group: str
    resource: str  # plural, with "/subresource" when there is one
    namespace: str  # "" for cluster-scoped objects
    name: str  # "" for collections (list, watch, create)

    def __str__(self) -> str:
        where = f"ns={self.namespace}" if self.namespace else "cluster"
        group = self.group or "core"
        return f"{self.verb} {group}/{self.resource} {where} name={self.name or '*'}"


@dataclass(frozen=True, order=True)
class Grant:
    """One verb on one resource granted by a rule: scope is a namespace or "*" (cluster-wide)."""

    verb: str
    group: str
    resource: str
    scope: str
    name: str  # "*" without resourceNames
    source: str = field(compare=False, default="")

    def covers(self, access: Access) -> bool:
        return (
            self.verb == access.verb
            and self.group == access.group
            and self.resource == access.resource
            and self.scope in ("*", access.namespace or "*")
            and (access.namespace != "" or self.scope == "*")
            and self.name in ("*", access.name)
        )

    def __str__(self) -> str:
        group = self.group or "core"
        return (
            f"{self.verb} {group}/{self.resource} scope={self.scope} name={self.name} "
            f"({self.source})"
        )


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    status: int
    body: Any


class RecordingApiClient:
    """Wraps a kubernetes ``ApiClient``: every ``call_api`` is recorded with its answer's status."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.requests: list[Request] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def call_api(self, path: str, method: str, *args: Any, **kwargs: Any) -> Any:
        query = tuple((str(k), str(v)) for k, v in (kwargs.get("query_params") or []))
        body = kwargs.get("body")
        status = 0
        try:
            response = self._inner.call_api(path, method, *args, **kwargs)
        except Exception as exc:
            status = int(getattr(exc, "status", 0) or 0)
            raise
        else:
            if isinstance(response, tuple):
                status = int(response[1])
            else:
                status = int(getattr(response, "status", 0) or 0)
            return response
        finally:
            with self._lock:
                self.requests.append(Request(method.upper(), path, query, status, body))


def parse_path(path: str) -> tuple[str, str, str, str, str]:
    """(group, resource, subresource, namespace, name) of an API path."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        raise ValueError(f"not a resource path: {path}")
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    sub = rest[2] if len(rest) > 2 else ""
    return group, resource, sub, namespace, name


def accesses(requests: Iterable[Request]) -> set[Access]:
    """What RBAC is asked for these requests (including the implied checks, see below)."""
    out: set[Access] = set()
    for req in requests:
        group, resource, sub, namespace, name = parse_path(req.path)
        full = f"{resource}/{sub}" if sub else resource
        query = dict(req.query)
        if req.method == "GET":
            if name:
                verbs = ["get"]
            else:
                verbs = ["watch"] if query.get("watch") in ("true", "1") else ["list"]
        elif req.method == "POST":
            verbs = ["create"]
        elif req.method == "PUT":
            verbs = ["update"]
        elif req.method == "PATCH":
            # A patch that creates (server-side apply of a missing object, answered 201) is
            # also authorised as create.
            verbs = ["patch", "create"] if req.status == 201 else ["patch"]
        elif req.method == "DELETE":
            verbs = ["delete"] if name else ["deletecollection"]
        else:
            raise ValueError(f"unexpected method {req.method} {req.path}")
        for verb in verbs:
            target_name = "" if verb in ("create", "list", "watch", "deletecollection") else name
            out.add(Access(verb, group, full, namespace, target_name))
        out |= _owner_reference_checks(req)
    return out


def needed_by(requests: Sequence[Request]) -> set[Access]:
    """What ``requests`` needed of RBAC, once it is checked that RBAC refused none of them."""
    refused = [r for r in requests if r.status == 403]
    assert not refused, f"requests refused by RBAC: {refused}"
    return accesses(requests)


def _owner_reference_checks(req: Request) -> set[Access]:
    """Setting an ownerReference with blockOwnerDeletion is authorised as ``update`` of the
    owner's ``finalizers`` subresource where the OwnerReferencesPermissionEnforcement admission
    plugin runs (OpenShift, hardened clusters): no request shows it, the body does."""
    if req.method not in ("POST", "PUT", "PATCH") or not isinstance(req.body, dict):
        return set()
    out: set[Access] = set()
    for ref in (req.body.get("metadata") or {}).get("ownerReferences") or []:
        if not ref.get("blockOwnerDeletion"):
            continue
        api_version = str(ref.get("apiVersion", ""))
        group = api_version.split("/")[0] if "/" in api_version else ""
        if (group, ref.get("kind")) != (c.GROUP, c.KIND):
            raise AssertionError(f"unexpected owner kind {ref!r}: extend the plural mapping")
        out.add(Access("update", group, f"{c.PLURAL}/finalizers", "", str(ref.get("name", ""))))
    return out


# -- the manifests -----------------------------------------------------------------------------


def kustomize(path: Path, replacements: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` as objects (placeholders replaced as the guide does)."""
    res = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{res.stderr}")
    text = res.stdout
    for old, new in (replacements or {}).items():
        text = text.replace(old, new)
    return [d for d in yaml.safe_load_all(text) if d]


@dataclass(frozen=True)
class Subject:
    kind: str  # User, ServiceAccount, Group
    name: str
    namespace: str = ""

    def matches(self, subject: dict[str, Any]) -> bool:
        return (
            subject.get("kind") == self.kind
            and subject.get("name") == self.name
            and (self.kind != "ServiceAccount" or subject.get("namespace") == self.namespace)
        )


def grants(objects: Sequence[dict[str, Any]], subject: Subject) -> set[Grant]:
    """Every (verb, group, resource, scope, name) the manifests grant ``subject``."""
    roles: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in objects:
        if obj.get("kind") in ("Role", "ClusterRole"):
            meta = obj["metadata"]
            roles[(obj["kind"], meta.get("namespace", ""), meta["name"])] = obj
    out: set[Grant] = set()
    for obj in objects:
        kind = obj.get("kind")
        if kind not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(subject.matches(s) for s in obj.get("subjects") or []):
            continue
        namespace = obj["metadata"].get("namespace", "") if kind == "RoleBinding" else ""
        ref = obj["roleRef"]
        role_ns = namespace if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        if role is None:
            raise AssertionError(f"{kind} {obj['metadata']['name']} refers to missing {ref}")
        scope = namespace or "*"
        source = f"{ref['kind']} {role_ns + '/' if role_ns else ''}{ref['name']}"
        for rule in role.get("rules") or []:
            if rule.get("nonResourceURLs"):
                raise AssertionError(f"{source}: nonResourceURLs are never needed")
            for values in (rule.get("apiGroups"), rule.get("resources"), rule.get("verbs")):
                if not values or "*" in values:
                    raise AssertionError(f"{source}: wildcard or empty rule {rule}")
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or ["*"]:
                            out.add(Grant(verb, group, resource, scope, name, source))
    return out


# Verbs that RBAC cannot restrict by name (the name is unknown or absent when authorising).
UNNAMED_VERBS = frozenset({"create", "list", "watch", "deletecollection"})


def compare(
    needed: set[Access], granted: set[Grant], fixed_names: frozenset[str] = frozenset()
) -> list[str]:
    """Problems, one line each: missing grants, unused grants, grants broader than the need.

    ``fixed_names`` are object names the code only ever touches by name (from settings, such
    as the DNS ConfigMaps): a grant covering only those must list them in resourceNames.
    """
    problems: list[str] = []
    for access in sorted(needed):
        if not any(g.covers(access) for g in granted):
            problems.append(f"missing: {access}")
    for grant in sorted(granted):
        covered = [a for a in needed if grant.covers(a)]
        if not covered:
            problems.append(f"unused: {grant}")
            continue
        if grant.scope == "*" and any(a.namespace for a in covered):
            problems.append(f"cluster-wide but only used in namespaces: {grant}")
        if (
            grant.name == "*"
            and grant.verb not in UNNAMED_VERBS
            and all(a.name in fixed_names for a in covered)
        ):
            names = sorted({a.name for a in covered})
            problems.append(f"not limited to resourceNames {names}: {grant}")
    return problems
