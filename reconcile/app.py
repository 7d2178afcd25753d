"""Wiring: the one place that assembles a Reconciler from a client and settings.

Entry points (the Cloud Functions, ``egressctl``, the benchmarks) call ``build_reconciler`` so that
they all run the same reconciler, including its cluster-DNS delivery.
"""

from __future__ import annotations

from core.kube import Kube
from core.settings import Settings
from dns.delivery import DnsDelivery
from reconcile.base import Clock, utcnow
from reconcile.controller import Reconciler


def build_reconciler(kube: Kube, settings: Settings, *, clock: Clock = utcnow) -> Reconciler:
    return Reconciler(kube, settings, clock=clock, dns=DnsDelivery(settings, clock=clock))
