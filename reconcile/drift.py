"""Is a live object already what we would apply? Pure comparison, field by field.

A no-op server-side apply still costs a mutating request and does not always leave the
resourceVersion alone (FACTS: defaulted or empty fields), so the reconciler decides locally:

- every field we render must hold the same value live (the API server may add defaults and other
  managers may add fields; both are fine), and
- the hash of what we last applied, kept in an annotation, must equal the hash of what we render
  now; this catches fields we stopped rendering, which the subset check cannot see and which an
  apply would remove.

Only when one of them fails is the object applied, and the differences form the drift report.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from core import constants as c


def _is_quantity(path: str) -> bool:
    return ".resources.requests." in path or ".resources.limits." in path


@dataclass(frozen=True, slots=True)
class FieldDiff:
    path: str
    desired: Any
    live: Any

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.path, "desired": self.desired, "live": self.live}


def applied_hash(obj: dict[str, Any]) -> str:
    """Hash of a rendered object, excluding the annotation that stores it."""
    meta = dict(obj.get("metadata", {}))
    annotations = {
        k: v for k, v in meta.get("annotations", {}).items() if k != c.ANNOTATION_APPLIED_HASH
    }
    meta["annotations"] = annotations
    canonical = json.dumps({**obj, "metadata": meta}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` annotated with its own applied hash."""
    meta = dict(obj["metadata"])
    meta["annotations"] = {
        **meta.get("annotations", {}),
        c.ANNOTATION_APPLIED_HASH: applied_hash(obj),
    }
    return {**obj, "metadata": meta}


def _quantity_equal(desired: Any, live: Any) -> bool:
    from kubernetes.utils.quantity import parse_quantity

    try:
        return bool(parse_quantity(str(desired)) == parse_quantity(str(live)))
    except ValueError:
        return False


def _walk(desired: Any, live: Any, path: str, out: list[FieldDiff]) -> None:
    if isinstance(desired, dict):
        if not desired:
            # The API server may drop an empty object we sent; either form is in sync.
            if live is not None and not isinstance(live, dict):
                out.append(FieldDiff(path, desired, live))
            return
        if not isinstance(live, dict):
            out.append(FieldDiff(path, desired, live))
            return
        for key, value in desired.items():
            _walk(value, live.get(key), f"{path}.{key}" if path else key, out)
        return
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            out.append(FieldDiff(path, desired, live))
            return
        for i, (d, lv) in enumerate(zip(desired, live, strict=True)):
            _walk(d, lv, f"{path}[{i}]", out)
        return
    if desired == live and type(desired) is type(live):
        return
    if _is_quantity(path) and _quantity_equal(desired, live):
        return
    out.append(FieldDiff(path, desired, live))


def diff(desired: dict[str, Any], live: dict[str, Any] | None) -> list[FieldDiff]:
    """Fields of ``desired`` (already carrying its applied hash) that ``live`` does not hold."""
    if live is None:
        return [FieldDiff("", "present", None)]
    out: list[FieldDiff] = []
    _walk(desired, live, "", out)
    return out
