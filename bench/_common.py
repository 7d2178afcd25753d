"""Small helpers of the pipeline benchmarks: percentiles and memory of processes.

(The stack they run on comes from ``bench.stack``: their own, not a test's or ``make run``'s.)
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float], unit: str = "ms") -> str:
    return (
        f"n={len(values)} p50={percentile(values, 50):.0f}{unit} "
        f"p95={percentile(values, 95):.0f}{unit} max={max(values):.0f}{unit} "
        f"mean={statistics.fmean(values):.0f}{unit}"
    )


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def children_of(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out
