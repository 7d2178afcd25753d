"""What the build uploads: the repository to Cloud Build, and each function's source from there.

Why: ``gcloud functions deploy --source=.`` runs in the build's workspace, where the lint step
has left ``.venv`` (about 270 MiB unpacked) and caches, and where no ``.gitignore`` exists
(``gcloud builds submit`` does not upload it by default), so without an ignore file of its own
every function would upload all of it, near the upload limit, three times. These tests build
such a workspace from this checkout, compute the upload sets by gitignore rules (pathspec),
and, when gcloud is installed, have the SDK itself zip the functions' source and choose the
build's files, and compare.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit import gcloud_sdk

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS_IGNORE = ".gcloudignore-functions"
MiB = 1 << 20
# What the functions may upload: the entry points, their requirements, and packages.
ALLOWED_TOP = {
    "main.py",
    "requirements.txt",
    "functions",
    "core",
    "gateway",
    "reconcile",
    "dns",
    "access",
}


def first_party() -> set[str]:
    """Top-level packages and modules of this repository."""
    names = {p.parent.name for p in REPO.glob("*/__init__.py")}
    return names | {p.stem for p in REPO.glob("*.py")}


def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(start: str) -> dict[str, Path]:
    """Every first-party module ``start`` imports, directly or through others, at module
    level or inside functions (lazy imports run too), with its file."""
    ours = first_party()
    seen: dict[str, Path] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        path = module_file(module)
        if module in seen or path is None:
            continue
        seen[module] = path
        # A package's __init__ runs before any of its modules.
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        package = module if path.name == "__init__.py" else ".".join(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] in ours]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] in ours:
                    todo.append(target)
                    todo += [f"{target}.{a.name}" for a in node.names]  # submodules
    return seen


def cloud_build_workspace(tmp: Path) -> Path:
    """/workspace as the deploy steps see it: what `gcloud builds submit` uploaded from this
    checkout, plus what the lint-and-test and functions-env steps leave behind."""
    workspace = tmp / "workspace"
    for rel in gcloud_sdk.gcloudignore(REPO, REPO / ".gcloudignore"):
        dest = workspace / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    leftovers = {
        ".venv/lib/python3.11/site-packages/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so": 40,
        ".venv/lib/python3.11/site-packages/kubernetes/client/api/core_v1_api.py": 2,
        ".venv/bin/activate": 0,
        "egress_gateways.egg-info/PKG-INFO": 0,
        "core/__pycache__/kube.cpython-311.pyc": 0,
        "functions/__pycache__/handlers.cpython-311.pyc": 0,
        "__pycache__/main.cpython-311.pyc": 0,
        ".mypy_cache/3.11/core/kube.data.json": 8,
        ".pytest_cache/v/cache/nodeids": 0,
        ".ruff_cache/0.17.5/123": 0,
        ".hypothesis/examples/0a/1b": 0,
        ".build/gke-manage-coredns-import/kustomization.yaml": 0,
        "functions-env.yaml": 0,
    }
    for rel, mib in leftovers.items():
        path = workspace / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            fh.write(b"x" * 1024)
            if mib:
                fh.truncate(mib * MiB)  # sparse: big to gcloud, cheap on disk
    return workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cloud_build_workspace(tmp_path_factory.mktemp("cloudbuild"))


def deploy_steps() -> list[dict[str, Any]]:
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    return [
        s
        for s in build["steps"]
        if s.get("entrypoint") == "gcloud" and s.get("args", [])[:2] == ["functions", "deploy"]
    ]


def test_every_function_deploy_uploads_through_the_functions_ignore_file() -> None:
    steps = deploy_steps()
    assert len(steps) == 3
    for step in steps:
        assert "--source=." in step["args"], step["id"]
        assert f"--ignore-file={FUNCTIONS_IGNORE}" in step["args"], step["id"]
    # The file reaches the build's workspace.
    assert FUNCTIONS_IGNORE in gcloud_sdk.gcloudignore(REPO, REPO / ".gcloudignore")


def test_function_upload_is_what_the_functions_import_and_nothing_else(workspace: Path) -> None:
    upload = gcloud_sdk.gcloudignore(workspace, workspace / FUNCTIONS_IGNORE)
    tops = {path.split("/")[0] for path in upload}
    assert tops == ALLOWED_TOP, tops ^ ALLOWED_TOP
    # What the runtime needs: main.py and requirements.txt at the top (the Python runtime
    # refuses a source without them), every module main.py can import (lazy imports
    # included: the access audit's, for one), and no bytecode or caches.
    assert {"main.py", "requirements.txt"} <= set(upload)
    needed = imported_modules("main")
    assert {m.split(".")[0] for m in needed} <= ALLOWED_TOP | {"main"}, sorted(needed)
    missing = [m for m, p in needed.items() if p.relative_to(REPO).as_posix() not in upload]
    assert not missing, f"imported by the functions but not uploaded: {missing}"
    assert "access.model" in needed, "the sweep's access audit imports access lazily"
    assert not [p for p in upload if "__pycache__" in p or p.endswith(".pyc")]
    assert [p for p in upload if not p.endswith(".py")] == ["requirements.txt"]
    size = sum(upload.values())
    assert size < 2 * MiB, f"{size} bytes"


def test_gcloud_zips_the_same_functions_source(workspace: Path) -> None:
    """The SDK's own zip step (not just our reading of the rules) picks the same files."""
    got = gcloud_sdk.function_upload(workspace, FUNCTIONS_IGNORE)
    if got is None:
        pytest.skip("gcloud is not installed: compared by gitignore rules only")
    archive_bytes, files = got
    assert files == gcloud_sdk.gcloudignore(workspace, workspace / FUNCTIONS_IGNORE)
    assert archive_bytes < 1 * MiB, archive_bytes


def test_without_ignore_files_the_workspace_would_be_uploaded_whole(workspace: Path) -> None:
    """The reason for the file: in a directory without .gcloudignore, .git or .gitignore (the
    workspace as `gcloud builds submit` left it before this repository had a .gcloudignore),
    gcloud ignores nothing, so the lint step's .venv went along."""
    everything = gcloud_sdk.gcloudignore(workspace, None)
    assert any(p.startswith(".venv/") for p in everything)
    assert sum(everything.values()) > 40 * MiB


def test_build_upload_is_the_repository_as_git_sees_it() -> None:
    """`gcloud builds submit` from a checkout with a dev stack and a venv uploads the sources
    the build uses and none of what .gitignore ignores."""
    upload = gcloud_sdk.gcloudignore(REPO, REPO / ".gcloudignore")
    for needed in (
        "cloudbuild.yaml",
        "Makefile",
        "pyproject.toml",
        "requirements.txt",
        "requirements-dev.txt",
        "constraints.txt",
        "main.py",
        FUNCTIONS_IGNORE,
        "exporter/Dockerfile",
        "infra/overlays/gke/kustomization.yaml",
        "tests/unit/test_function_source.py",
    ):
        assert needed in upload, needed
    for ignored in (".git/", ".venv/", ".cache/", ".mypy_cache/", "egress_gateways.egg-info/"):
        assert not [p for p in upload if p.startswith(ignored)], ignored
    assert not [p for p in upload if "__pycache__" in p]
    assert sum(upload.values()) < 8 * MiB
    by_gcloud = gcloud_sdk.build_upload(REPO)
    if by_gcloud is not None:
        assert by_gcloud == upload


def test_exporter_build_context_is_what_its_dockerfile_copies() -> None:
    """`docker build .` in the workspace sends the context to the daemon: .dockerignore keeps
    it to what exporter/Dockerfile copies, which holds every module the exporter imports."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is ignored first"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for line in (REPO / "exporter" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= {src.rstrip("/") for src in line.split()[1:-1]}
    assert copied == kept
    packages = {m.split(".")[0] for m in imported_modules("exporter.__main__")}
    assert packages <= copied, packages - copied
