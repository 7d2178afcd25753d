"""Cloud Function entry points (functions-framework), kept thin on purpose.

Three functions deploy from this one source:

- ``on_event``  — pushed by Pub/Sub from the events topic: reconcile the ExternalService named
  by a notice;
- ``on_sweep``  — pushed by Pub/Sub from the sweep topic (Cloud Scheduler): reconcile
  everything, prune orphans, report drift;
- ``repair``    — HTTP (``gcloud functions call`` or authenticated HTTPS):
  ``{"name": optional, "dryRun": bool}`` in, a JSON report out.

Settings are read here, at import, so a bad one stops the instance from starting with a message
naming it; the Kubernetes client is built on the first event (``functions.handlers.Runtime``).
"""

from __future__ import annotations

import os
from typing import Any

import functions_framework

from functions.handlers import Runtime, handle_event, handle_repair, handle_sweep

RUNTIME = Runtime.from_env(os.environ)


@functions_framework.cloud_event
def on_event(event: Any) -> None:
    handle_event(RUNTIME, event)


@functions_framework.cloud_event
def on_sweep(event: Any) -> None:
    handle_sweep(RUNTIME, event)


@functions_framework.http
def repair(request: Any) -> tuple[str, int, dict[str, str]]:
    return handle_repair(RUNTIME, request)
