"""Orchestration: the controller that observes an ExternalService, converges its gateway objects
and DNS claim, finalizes deletions and sweeps the cluster, plus the migration from the original
operator.

Layers (enforced by ``.importlinter`` in ``make lint``): ``core`` (spec, settings, names,
errors, the Kubernetes client) at the bottom; ``gateway``, ``dns`` and ``access`` (pure rendering
and the DNS delivery) above it; this package above those; the entry points (``functions``,
``exporter``, ``egressctl``, ``main.py``) on top.
"""
