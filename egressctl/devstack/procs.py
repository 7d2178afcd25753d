"""Start, identify and stop the dev stack's processes.

Why: `dev down` must stop exactly the processes `dev up` started, never a process that
merely reused a pid. Each process is recorded with its pid and its kernel start time
(``/proc/<pid>/stat`` field 22); a pid whose start time differs is someone else's.
Processes run in their own session so a terminal's Ctrl-C does not take the stack down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class DevStackError(RuntimeError):
    """A part of the stack failed; the message names the part and why."""


@dataclass(frozen=True)
class ProcRecord:
    """One started process as written to state.json."""

    name: str
    pid: int
    start_time: int
    argv: list[str]
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcRecord:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            argv=[str(a) for a in data["argv"]],
            log=str(data["log"]),
        )


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Field 2 (comm) is parenthesised and may contain spaces: split after its last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def start_time_of(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks, or None if it does not exist."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def is_running(rec: ProcRecord) -> bool:
    """True if the recorded process is still the same live (non-zombie) process."""
    fields = _stat_fields(rec.pid)
    if fields is None or int(fields[19]) != rec.start_time:
        return False
    if fields[0] in ("Z", "X"):
        _reap(rec.pid)
        return False
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcRecord:
    """Start ``argv`` detached (own session), output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%F %T')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise DevStackError(f"{name}: cannot start {argv[0]}: {exc}") from exc
    st = start_time_of(proc.pid)
    if st is None:
        raise DevStackError(f"{name}: exited immediately; see {log_path}")
    # The Popen object is dropped: the process outlives us. Keep it from being reaped
    # with a ResourceWarning by telling subprocess it is done with it.
    proc.returncode = 0
    return ProcRecord(name=name, pid=proc.pid, start_time=st, argv=list(argv), log=str(log_path))


def stop(rec: ProcRecord, timeout: float = 15.0) -> bool:
    """Stop the recorded process (and its process group) if it is still ours.

    Returns True if something was stopped.
    """
    if not is_running(rec):
        return False
    _signal(rec, signal.SIGTERM)
    if wait_for(lambda: not is_running(rec), timeout):
        return True
    if is_running(rec):
        _signal(rec, signal.SIGKILL)
        wait_for(lambda: not is_running(rec), 5.0)
    return True


def _signal(rec: ProcRecord, sig: signal.Signals) -> None:
    try:
        # Started with start_new_session: its pgid is its pid, and the group holds only
        # its own children (the emulator's JVM helpers, for instance).
        if os.getpgid(rec.pid) == rec.pid:
            os.killpg(rec.pid, sig)
        else:
            os.kill(rec.pid, sig)
    except ProcessLookupError:
        pass


def wait_for(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, max_interval: float = 1.0
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (backing off)."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, max_interval)


def tail(path: str | Path, lines: int = 15) -> str:
    """The last lines of a log, for error messages."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])
