"""`egressctl render` output is accepted by kubectl and by the real API server (dry runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DevStack

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dry_run", ["client", "server"])
def test_rendered_examples_apply(dev_stack: DevStack, dry_run: str) -> None:
    rendered = subprocess.run(
        [
            sys.executable,
            "-m",
            "egressctl",
            "render",
            *map(str, sorted((ROOT / "examples").glob("*.yaml"))),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    applied = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            dev_stack.kubeconfig,
            "apply",
            f"--dry-run={dry_run}",
            "-f",
            "-",
        ],
        input=rendered,
        capture_output=True,
        text=True,
        check=False,
    )
    assert applied.returncode == 0, applied.stderr
    lines = applied.stdout.strip().splitlines()
    assert len(lines) == rendered.count("\nkind: ") + rendered.startswith("kind: ")
    assert all("dry run)" in line for line in lines)
