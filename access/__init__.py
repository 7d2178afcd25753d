"""Who can reach which gateway: an access audit computed the way the cluster enforces it.

``policy`` evaluates Kubernetes NetworkPolicies, ``model`` reads the cluster into a snapshot and
audits it, ``report`` renders the answer for people (tables, a heat map) and machines (JSON,
CSV). Everything but ``model.snapshot_from_kube`` is pure: no I/O, so each rule is unit-tested
case by case and the same answer comes from live state or from plain dicts.
"""
