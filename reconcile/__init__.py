"""The reconciler: from an ExternalService and settings to the gateway objects a cluster must hold.

Pure parts (spec parsing, settings, rendering) never touch the network or ``os.environ`` beyond
``Settings.from_env``; Kubernetes I/O lives in one module of its own.
"""
