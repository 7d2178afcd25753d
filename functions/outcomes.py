"""How a delivery ended and the one log line that says so, and the whole sweep with its report.

Shared by the entry handlers (``functions.handlers``) and a sweep in shards
(``functions.shards``): the coordinator runs the whole sweep here when it is small enough, and
a shard logs its part's results as a whole sweep does. Neither of those modules is imported
here, so that they need not import each other.
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from core import logs

if TYPE_CHECKING:  # imported when first used: a cold start that refuses a message needs neither
    from reconcile.results import Outcome, Result, SweepReport

log = logs.get("functions")


class Delivered(StrEnum):
    """How a handler ended, where no reconcile result says it: the ``outcome`` of its log line."""

    MALFORMED = "malformed"  # acknowledged: the message can never be processed
    STALE = "stale"  # acknowledged: older than MAX_EVENT_AGE_SECONDS, the sweep covers it
    TRANSIENT_ERROR = "transient-error"  # raised: Pub/Sub redelivers
    PERMANENT_ERROR = "permanent-error"  # acknowledged: a retry would fail the same way
    ERROR = "error"  # raised: unexpected, logged with its traceback
    SWEPT = "swept"  # the sweep's summary line (a sharded sweep's merged report, once)
    FANNED_OUT = "fanned-out"  # a coordinator published shard messages
    SWEPT_SHARD = "swept-shard"  # one shard's summary line
    DUPLICATE = "duplicate"  # acknowledged: this shard was reported already
    INCOMPLETE = "incomplete"  # a sharded sweep some shard never reported (found at clean-up)
    BUSY = "busy"  # acknowledged unrun: a sharded sweep is still running
    BAD_REQUEST = "bad-request"  # a repair body that cannot be parsed: 400


class Reconciles(Protocol):
    """What the handlers need of ``reconcile.controller.Reconciler`` (tests pass a stub)."""

    def reconcile(self, name: str) -> Result: ...

    def sweep(self) -> SweepReport: ...


class HasReconcilers(Protocol):
    """What a whole sweep needs of ``functions.handlers.Runtime``."""

    def reconciler(self, dry_run: bool = False) -> Reconciles: ...


def log_line(level: int, text: str, outcome: Delivered | Outcome, **fields: Any) -> None:
    """The one line that says how a delivery (or one ExternalService in it) ended."""
    logs.log(log, level, text, outcome=str(outcome), **fields)


def log_malformed(what: str, reason: str, level: int = logging.WARNING, said: str = "") -> None:
    """A message that can never be processed, acknowledged: the line names what it was and why
    (``said``, when the line words the reason otherwise than the ``reason`` field)."""
    log_line(
        level,
        f"malformed {what} acknowledged: {said or reason}",
        Delivered.MALFORMED,
        reason=reason,
    )


def ms_since(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)


def sweep_logged(
    rt: HasReconcilers,
    *,
    dry_run: bool,
    started: float | None = None,
    sweep_id: str | None = None,
) -> dict[str, Any]:
    from core.errors import PermanentError, TransientError

    t0 = started if started is not None else time.monotonic()
    extra: dict[str, Any] = {"sweepId": sweep_id} if sweep_id else {}
    try:
        report = rt.reconciler(dry_run).sweep()
    except (TransientError, PermanentError) as exc:
        return sweep_failed(exc, t0, **extra)
    out: dict[str, Any] = dict(report.to_dict())
    log_results(report, dry_run)
    level = logging.WARNING if out["drift"] or out["errors"] or out["fights"] else logging.INFO
    log_line(
        level,
        f"sweep: {out['externalServices']} ExternalService(s), {len(out['drift'])} drift "
        f"change(s), {len(report.pruned)} orphan(s) pruned, {len(out['errors'])} error(s)"
        + (f", {len(out['fights'])} field manager fight(s)" if out["fights"] else ""),
        Delivered.SWEPT,
        externalServices=out["externalServices"],
        outcomes=out["outcomes"],
        drift=out["drift"],
        errors=out["errors"],
        fights=out["fights"],
        dryRun=dry_run,
        durationMs=ms_since(t0),
        **extra,
    )
    return out


def sweep_failed(exc: Exception, t0: float, step: str = "", **extra: Any) -> dict[str, Any]:
    """A sweep that stopped before reconciling anything (at ``step``, when it is worth naming):
    logged, acknowledged (the next runs)."""
    log_line(
        logging.ERROR,
        f"sweep failed before reconciling anything: {f'{step}: ' if step else ''}{exc}",
        Delivered.ERROR,
        durationMs=ms_since(t0),
        **extra,
    )
    return {"error": str(exc)}


def log_results(report: SweepReport, dry_run: bool) -> None:
    """One line per ExternalService a sweep (or a shard) changed or found not in sync."""
    from reconcile.results import Outcome

    for result in report.results:
        if result.changes or result.outcome != Outcome.IN_SYNC:
            with logs.context(externalService=result.name):
                log_line(
                    logging.WARNING if result.changes or result.fights else logging.INFO,
                    f"sweep: {result.name}: {result.outcome}"
                    + (f" (drift: {len(result.changes)} change(s))" if result.changes else "")
                    + "".join(f"; {f.describe()}" for f in result.fights),
                    result.outcome,
                    changes=[ch.to_dict() for ch in result.changes],
                    fights=[f.to_dict() for f in result.fights],
                    dryRun=dry_run,
                )
