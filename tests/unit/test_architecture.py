"""Rules of the code's shape that no linter knows: all Kubernetes I/O goes through ``core.kube``.

``Kube`` is the one place that speaks HTTP to the API server: retries, dry run, request
counters (what RBAC must allow, what the benchmarks count) and field managers live there. A
raw ``request(...)`` or ``call_api(...)`` anywhere else in the product would bypass all of it;
product code uses ``Kube``'s named operations (get, list_all, watch, apply, create, replace,
merge_patch, json_patch, delete). Tests and benchmarks may use ``Kube.request`` as an escape
hatch for set-up. The import layers themselves are checked by import-linter (``make lint``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("core", "gateway", "dns", "access", "reconcile", "functions", "exporter", "egressctl")
THE_CLIENT = REPO / "core" / "kube.py"
RAW = {"request", "call_api"}


def product_modules() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py") if p != THE_CLIENT)


def raw_calls(source: str, where: str) -> list[str]:
    """``x.request(...)``/``x.call_api(...)`` calls whose receiver reads as a Kubernetes client."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in RAW:
            continue
        receiver = ast.unparse(node.func.value)
        if node.func.attr == "call_api" or "kube" in receiver.lower() or "admin" in receiver:
            found.append(f"{where}:{node.lineno}: {receiver}.{node.func.attr}(...)")
    return found


def test_product_code_talks_to_kubernetes_only_through_named_operations() -> None:
    offenders = [
        line
        for path in product_modules()
        for line in raw_calls(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert offenders == [], "\n".join(offenders)


@pytest.mark.parametrize(
    "source",
    ['kube.request("GET", "/api")', 'self.kube.request("PATCH", p)', "api.call_api(p, 'GET')"],
)
def test_the_rule_sees_a_raw_call(source: str) -> None:
    assert raw_calls(f"def f(kube, self, api, p):\n    {source}\n", "probe.py")


def test_the_rule_leaves_other_requests_alone() -> None:
    assert not raw_calls("def f(conn, session):\n    conn.request('GET', '/')\n", "probe.py")
