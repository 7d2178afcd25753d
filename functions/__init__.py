"""The Cloud Functions' own code: pipeline settings, credentials and handlers.

``main.py`` stays a thin list of entry points; everything it delegates to lives here so that it
can be tested without functions-framework and reused by ``egressctl`` and the benchmarks.
"""
