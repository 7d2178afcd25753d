"""Structured JSON logs, one object per line, in the shape Cloud Logging parses from stdout.

Cloud Functions (2nd gen) and Cloud Run turn each JSON line on stdout into a LogEntry: ``severity``
and ``message`` become the entry's severity and text, ``logging.googleapis.com/trace`` links the
line to a trace, ``logging.googleapis.com/labels`` become filterable labels, everything else lands
in ``jsonPayload``. Per-event context (event id, ExternalService, trace) is held in a context
variable so that every line of one invocation carries it without passing it around.

Never log secrets: the only values logged are names, outcomes, field paths and error texts of
our own or of the API server (which never echo credentials).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

LOGGER_NAME = "egress"
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "egress_log_context", default=None
)
_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_CLOUD_TRACE = re.compile(r"^([0-9a-f]{32})(?:/([0-9]+))?")


class JsonFormatter(logging.Formatter):
    def __init__(self, project: str = "") -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "logger": record.name,
        }
        ctx = dict(_context.get() or {})
        trace = ctx.pop("trace", None)
        span = ctx.pop("spanId", None)
        if trace and self.project:
            entry["logging.googleapis.com/trace"] = f"projects/{self.project}/traces/{trace}"
        elif trace:
            entry["trace"] = trace
        if span:
            entry["logging.googleapis.com/spanId"] = span
        labels = {k: str(ctx[k]) for k in ("externalService", "function") if ctx.get(k)}
        if labels:
            entry["logging.googleapis.com/labels"] = labels
        entry.update(ctx)
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        entry["logging.googleapis.com/sourceLocation"] = {
            "file": record.pathname.rsplit("/", 1)[-1],
            "line": str(record.lineno),
            "function": record.funcName,
        }
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup(project: str = "", stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send the ``egress`` loggers to ``stream`` (stdout) as JSON lines; idempotent."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(project))
    logger.addHandler(handler)


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add fields to every log line written inside the block (nested blocks merge)."""
    merged = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def trace_from(traceparent: str | None, cloud_trace: str | None = None) -> tuple[str, str | None]:
    """(trace id, span id) from a W3C ``traceparent`` or an ``X-Cloud-Trace-Context`` value."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match:
            return match.group(1), match.group(2)
    if cloud_trace:
        match = _CLOUD_TRACE.match(cloud_trace.strip().lower())
        if match:
            return match.group(1), None
    return "", None


def log(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    logger.log(level, message, extra={"fields": fields}, stacklevel=2)
