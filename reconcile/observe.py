"""What one gateway looks like live: read object by object for one reconcile, or filed from a
sweep's LISTs and held compressed until the gateway's turn."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from core import constants as c
from core.kube import (
    EXTERNAL_SERVICE,
    GATEWAY_KINDS,
    Obj,
    lean,
)
from reconcile.base import Base, Observed


def pack(obj: Obj) -> bytes:
    """A listed object as a sweep holds it until its turn: compressed JSON, about a
    twentieth of the parsed dict's memory (a sweep holds every gateway at once)."""
    return zlib.compress(json.dumps(lean(obj), separators=(",", ":")).encode(), 1)


def unpack(packed: bytes) -> Obj:
    obj: Obj = json.loads(zlib.decompress(packed))
    return obj


@dataclass(slots=True)
class Listed:
    """One gateway as a sweep listed it, packed (``_pack``) until it is reconciled."""

    external_service: bytes
    deleting: bool
    children: dict[str, bytes] = field(default_factory=dict)
    foreign: dict[str, bytes] = field(default_factory=dict)
    claimed_at: str = ""

    def observed(self) -> Observed:
        return Observed(
            unpack(self.external_service),
            {kind: unpack(obj) for kind, obj in self.children.items()},
            {kind: unpack(obj) for kind, obj in self.foreign.items()},
            self.claimed_at,
        )


def unpacked(listed: dict[str, Listed]) -> Iterator[tuple[str, Observed]]:
    """Each listed gateway unpacked in turn (one at a time in memory); a claim time the
    consumer computed is kept for the gateway's reconcile."""
    for name, gateway in listed.items():
        observed = gateway.observed()
        yield name, observed
        gateway.claimed_at = observed.claimed_at


def ours(obj: Obj, name: str) -> bool:
    return (obj.get("metadata", {}).get("labels") or {}).get(c.LABEL_GATEWAY) == name


class Observing(Base):
    def observe(self, name: str) -> Observed:
        es = self.kube.get(EXTERNAL_SERVICE, name)
        observed = Observed(es)
        if es is None:
            return observed
        for resource in GATEWAY_KINDS:
            live = self.kube.get(resource, name, self.settings.gateway_namespace)
            if live is not None:
                live.setdefault("apiVersion", resource.api_version)
                live.setdefault("kind", resource.kind)
                target = observed.children if ours(live, name) else observed.foreign
                target[resource.kind] = live
        return observed
