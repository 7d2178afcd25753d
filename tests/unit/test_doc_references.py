"""Every repository path the guides and the build name exists.

Why: a guide is followed by hand, in order, by someone deploying for the first time; a
renamed example or script (`kubectl apply -f examples/google.yaml` named a file that never
existed) stops them at that step, and nothing else runs those commands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOPS = sorted(
    p.name
    for p in REPO.iterdir()
    if p.is_dir() and not p.name.startswith(".") and p.name != "build"
)
# A path: a top-level directory of this repository, then path characters; not preceded by a
# path character (so `.cache/dev/env` or `a/infra/x` are not taken for one of ours).
PATH = re.compile(rf"(?<![\w./$-])((?:{'|'.join(map(re.escape, TOPS))})/[\w./-]*[\w/])")
FILES = sorted([*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "cloudbuild.yaml"])


@pytest.mark.parametrize("doc", FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_paths_exist(doc: Path) -> None:
    missing = sorted(
        {m.group(1) for m in PATH.finditer(doc.read_text()) if not (REPO / m.group(1)).exists()}
    )
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_the_check_finds_paths() -> None:
    text = "kubectl apply -f examples/google.yaml; see infra/overlays/gke and $HOME/infra/x"
    assert [m.group(1) for m in PATH.finditer(text)] == [
        "examples/google.yaml",
        "infra/overlays/gke",
    ]
