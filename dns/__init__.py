"""Cluster DNS: CoreDNS rewrite rules for hijacked gateways, rendered from live Services.

This top-level package shadows the ``dnspython`` distribution's ``dns`` package, so the project
never depends on dnspython; tests query DNS with ``dnslib``. The renderer and its delivery to the
CoreDNS ConfigMaps are built under the cluster-DNS issue.
"""
