"""Cluster DNS: CoreDNS rewrite rules for hijacked gateways, rendered from live Services.

This top-level package shadows the ``dnspython`` distribution's ``dns`` package, so the project
never depends on dnspython; tests query DNS with ``dnslib``. ``render`` and ``corefile`` are pure;
``delivery`` writes the rules ConfigMap through ``core.kube``.
"""
