"""Doubles the handlers' tests share: a stub reconciler, a runtime that hands it out, and the
capture of the structured log lines the handlers write.

The Kubernetes side is not under test where these are used (the integration and e2e suites
cover it); the clock is fixed at ``NOW``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from core import logs
from core.settings import Settings
from functions.handlers import Runtime
from functions.settings import PipelineSettings
from reconcile.results import Outcome, Result, SweepReport

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
SWEEP_CALL = "*sweep*"

Step = Result | Exception


@dataclass
class StubReconciler:
    """Stands in for ``reconcile.controller.Reconciler`` and records every call in ``calls``
    (a name per reconcile, ``SWEEP_CALL`` per sweep).

    With ``steps`` planned, each reconcile answers with the next one (a Result, or an exception
    to raise); a reconcile beyond them fails the test. Without (None), every reconcile is in
    sync, or raises ``fail`` when that is set. A sweep answers ``sweep_step`` (or raises it).
    """

    steps: list[Step] | None = None
    sweep_step: SweepReport | Exception = field(default_factory=SweepReport)
    fail: Exception | None = None
    calls: list[str] = field(default_factory=list)

    @property
    def reconciled(self) -> list[str]:
        return [call for call in self.calls if call != SWEEP_CALL]

    @property
    def swept(self) -> int:
        return self.calls.count(SWEEP_CALL)

    def reconcile(self, name: str) -> Result:
        self.calls.append(name)
        if self.steps is None:
            if self.fail is not None:
                raise self.fail
            return Result(name, Outcome.IN_SYNC)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    def sweep(self) -> SweepReport:
        self.calls.append(SWEEP_CALL)
        if isinstance(self.sweep_step, Exception):
            raise self.sweep_step
        return self.sweep_step


@dataclass
class StubRuntime(Runtime):
    """A ``Runtime`` whose reconciler (dry run or not) is ``stub``; sleeps are recorded."""

    stub: StubReconciler = field(default_factory=StubReconciler)
    dry_runs: list[bool] = field(default_factory=list)
    slept: list[float] = field(default_factory=list)

    def reconciler(self, dry_run: bool = False) -> StubReconciler:
        self.dry_runs.append(dry_run)
        return self.stub


def stub_runtime(stub: StubReconciler | None = None) -> StubRuntime:
    """Default settings, the clock at ``NOW``, and ``stub`` (a fresh one if None)."""
    rt = StubRuntime(
        Settings.from_env({}),
        PipelineSettings(),
        env={},
        clock=lambda: NOW,
        stub=stub or StubReconciler(),
    )
    rt.sleep = rt.slept.append
    return rt


@contextlib.contextmanager
def captured() -> Iterator[io.StringIO]:
    """The ``egress`` log lines written inside the block; the previous handlers come back."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    stream = io.StringIO()
    logs.setup("proj", stream)
    try:
        yield stream
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


def outcome_lines(stream: io.StringIO, max_chars: int | None = None) -> list[dict[str, Any]]:
    """The structured lines with an ``outcome`` (how a delivery, or an object in it, ended);
    with ``max_chars``, every line written must be shorter than that."""
    text = stream.getvalue().splitlines()
    if max_chars is not None:
        assert all(len(line) < max_chars for line in text), "a log line carries the payload"
    entries = [json.loads(line) for line in text]
    return [entry for entry in entries if "outcome" in entry]


@contextlib.contextmanager
def captured_outcomes() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """``captured``, read as ``outcome_lines`` whenever the returned function is called."""
    with captured() as stream:
        yield lambda: outcome_lines(stream)
