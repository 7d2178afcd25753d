"""The base layer: the ExternalService spec, settings, names and constants, errors, the one
Kubernetes client, and the notice format the exporter and the functions share.

Nothing here imports another package of this project; everything above may import it. The
exporter's image ships this package and ``exporter/`` only (see ``.importlinter``).
"""
