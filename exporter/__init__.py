"""The in-cluster exporter: watches ExternalServices and gateway Deployments, publishes notices.

It is the only long-running part of the product and is deliberately dumb: it keeps no state
beyond what it needs to tell a real change from a status write, and every restart re-lists and
republishes everything, so losing it (or a notice) never loses a change for long.
"""
