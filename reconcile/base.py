"""The reconciler's shared state, and the clock every part of it reads.

``reconcile.controller.Reconciler`` is assembled from one module per phase, each a class adding
its methods to the one before: base, observe, status, converge, finalize, sweep, and the
controller's ``reconcile``, which chooses between them. A part calls ``reconcile`` only through
the declaration here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from core.kube import Kube, Obj
from core.settings import Settings
from dns.delivery import (
    DnsDelivery,
    DnsVerdicts,
)
from reconcile.results import Result

Clock = Callable[[], dt.datetime]
# Condition messages stay readable in `kubectl describe` (the API server's own limit is 32 KiB).
MAX_MESSAGE = 1024


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def timestamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return None


@dataclass
class Observed:
    """Live state of one gateway: its ExternalService and our children by kind."""

    external_service: Obj | None
    children: dict[str, Obj] = field(default_factory=dict)
    foreign: dict[str, Obj] = field(default_factory=dict)
    # Computed once per reconcile (or sweep), so the sweep's DNS prediction and the Service it
    # then applies agree.
    claimed_at: str = ""


class Base:
    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        *,
        clock: Clock = utcnow,
        dns: DnsDelivery | None = None,
        force_conflicts: bool = False,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.dns = dns
        # Take fields back even from a manager that keeps rewriting them (see reconcile.fights):
        # what an operator asks for once the other writer is stopped.
        self.force_conflicts = force_conflicts

    def reconcile(
        self, name: str, observed: Observed | None = None, dns_verdicts: DnsVerdicts | None = None
    ) -> Result:
        raise NotImplementedError
